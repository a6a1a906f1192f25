// A user request (one read or write of a contiguous buffer) is split into pieces; the request
// completes when its last piece does. wait() is the only blocking call and is made with the GIL
// released by the binding.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>

namespace memfit::aio {

class Request {
 public:
  Request(std::size_t num_bytes, bool is_read, bool allow_short)
      : num_bytes_(num_bytes), is_read_(is_read), allow_short_(allow_short) {}

  // Called once, before any piece is handed to a backend.
  void set_num_pieces(int num_pieces) { pending_ = num_pieces; }

  // A piece finished: bytes_done of it were transferred; err is 0 or an errno value.
  void piece_done(std::size_t bytes_done, int err) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    bytes_ += bytes_done;
    if (err != 0 && err_ == 0) err_ = err;
    if (--pending_ == 0) cv_.notify_all();
  }

  // Blocks until every piece has finished. Returns the bytes transferred, or -errno. A read that
  // stops at end of file before num_bytes is an error (-ENODATA) unless allow_short was set.
  int64_t wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return pending_ == 0; });
    return result_locked();
  }

  bool done() {
    std::lock_guard<std::mutex> lock(mu_);
    return pending_ == 0;
  }

  std::size_t num_bytes() const { return num_bytes_; }
  bool is_read() const { return is_read_; }

 private:
  int64_t result_locked() const;

  std::mutex mu_;
  std::condition_variable cv_;
  const std::size_t num_bytes_;
  const bool is_read_;
  const bool allow_short_;
  int pending_ = 0;
  std::size_t bytes_ = 0;
  int err_ = 0;
};

}  // namespace memfit::aio
