// A small persistent pool for the Adam kernel: waking parked threads costs microseconds where
// starting them costs tens, which matters for the many mid-sized tensors of one optimizer step.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace memfit::adam {

class ThreadPool {
 public:
  // Runs task(0) .. task(num_tasks - 1), task 0 on the calling thread, and returns when all have
  // finished. Tasks must not throw. Calls from several threads run one after another.
  void run(int num_tasks, const std::function<void(int)>& task);

 private:
  void grow(int num_workers);
  void work(int task_index, std::uint64_t seen_generation);

  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable start_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;  // worker k runs task k + 1
  std::uint64_t generation_ = 0;
  const std::function<void(int)>* task_ = nullptr;
  int num_tasks_ = 0;
  int pending_ = 0;
};

// The process's pool. A child process made by fork gets a fresh one (the parent's threads do not
// exist there); the old pool is leaked, never joined, for the same reason.
ThreadPool& shared_pool();

}  // namespace memfit::adam
