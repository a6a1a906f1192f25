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
    workers_.reserve(static_cast<std::size_t>(queue_depth));
    try {
      for (int i = 0; i < queue_depth; ++i) workers_.emplace_back([this] { work(); });
    } catch (...) {
      stop();  // a joinable std::thread destroyed during unwinding would call std::terminate
      throw;
    }
  }

  ~ThreadBackend() override { stop(); }

  void submit(std::vector<Piece>&& pieces) noexcept override {
    std::size_t num_queued;
    {
      std::lock_guard<std::mutex> lock(mu_);
      num_queued = queue_pieces(queue_, pieces);
    }
    cv_.notify_all();
    fail_pieces(pieces, num_queued, ENOMEM);
  }

  const char* name() const override { return "threads"; }

 private:
  void work() noexcept {
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
      if (piece.needs_bounce && bounce == nullptr) {
        piece.request->piece_done(0, ENOMEM);  // the next piece that needs one tries again
        continue;
      }
      run_piece(piece, bounce);
    }
    std::free(bounce);
  }

  void stop() noexcept {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& worker : workers_) worker.join();
  }

  static void run_piece(Piece& piece, char* bounce) noexcept {
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
