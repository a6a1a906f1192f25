#include "adam/thread_pool.h"

#include <pthread.h>

namespace memfit::adam {

void ThreadPool::run(int num_tasks, const std::function<void(int)>& task) {
  if (num_tasks <= 1) {
    task(0);
    return;
  }
  std::lock_guard<std::mutex> one_run(run_mutex_);
  grow(num_tasks - 1);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    task_ = &task;
    num_tasks_ = num_tasks;
    pending_ = num_tasks - 1;
    ++generation_;
  }
  start_.notify_all();
  task(0);
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [this] { return pending_ == 0; });
  task_ = nullptr;
}

void ThreadPool::grow(int num_workers) {
  std::uint64_t generation;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation = generation_;
  }
  while (static_cast<int>(workers_.size()) < num_workers) {
    int task_index = static_cast<int>(workers_.size()) + 1;
    workers_.emplace_back([this, task_index, generation] { work(task_index, generation); });
  }
}

void ThreadPool::work(int task_index, std::uint64_t seen_generation) {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    start_.wait(lock, [&] { return generation_ != seen_generation; });
    seen_generation = generation_;
    // run() holds every generation open until its pending tasks finish, so a worker that owns a
    // task always sees the generation that posted it.
    if (task_index >= num_tasks_) continue;
    const std::function<void(int)>* task = task_;
    lock.unlock();
    (*task)(task_index);
    lock.lock();
    if (--pending_ == 0) done_.notify_one();
  }
}

namespace {

// Leaked on purpose: joining parked threads during interpreter shutdown can hang, and after a fork
// the parent's objects may hold locks that no thread in the child will release.
ThreadPool* pool = nullptr;
std::mutex* pool_mutex = new std::mutex();
std::once_flag fork_handler_installed;

void forget_parent_pool() {
  pool = nullptr;
  pool_mutex = new std::mutex();
}

}  // namespace

ThreadPool& shared_pool() {
  std::call_once(fork_handler_installed, [] { pthread_atfork(nullptr, nullptr, forget_parent_pool); });
  std::lock_guard<std::mutex> lock(*pool_mutex);
  if (pool == nullptr) pool = new ThreadPool();
  return *pool;
}

}  // namespace memfit::adam
