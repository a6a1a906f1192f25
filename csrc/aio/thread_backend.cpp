// Fallback backend: queue_depth worker threads, each doing blocking pread/pwrite on one piece at a
// time. Works on any kernel and file system, including where io_uring is refused.
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <thread>

#include "backend.h"

namespace memfit::aio {

namespace {

class ThreadBackend final : public Backend {
 public:
  ThreadBackend(std::size_t block_size, int queue_depth) : block_size_(block_size) {
    for (int i = 0; i < queue_depth; ++i) workers_.emplace_back([this] { work(); });
  }

  ~ThreadBackend() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  void submit(std::vector<Piece>&& pieces) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& piece : pieces) queue_.push_back(std::move(piece));
    }
    cv_.notify_all();
  }

  const char* name() const override { return "threads"; }

 private:
  void work() {
    char* bounce = nullptr;
    for (;;) {
      Piece piece;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) break;  // stopping, and every queued piece is done
        piece = std::move(queue_.front());
        queue_.pop_front();
      }
      if (piece.needs_bounce && bounce == nullptr) bounce = alloc_aligned(block_size_);
      run_piece(piece, bounce);
    }
    std::free(bounce);
  }

  static void run_piece(Piece& piece, char* bounce) {
    int err = 0;
    for (;;) {
      char* address = stage_piece(piece, bounce);
      long result = piece.is_read ? ::pread(piece.fd, address, piece.remaining(), piece.cursor_offset())
                                  : ::pwrite(piece.fd, address, piece.remaining(), piece.cursor_offset());
      if (result < 0) result = -errno;
      if (finish_call(piece, bounce, result, &err) == Progress::kDone) break;
    }
    piece.request->piece_done(piece.num_done, err);
  }

  const std::size_t block_size_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Piece> queue_;
  bool stopping_ = false;
  std::vector<std::thread> workers_;
};

}  // namespace

std::unique_ptr<Backend> make_thread_backend(std::size_t block_size, int queue_depth) {
  return std::make_unique<ThreadBackend>(block_size, queue_depth);
}

}  // namespace memfit::aio
