// The engine's backend interface: a backend accepts pieces and eventually reports each one to its
// request. Both native backends keep at most queue_depth pieces in flight.
//
// No exception ever leaves a backend thread: a piece that cannot run (no memory for its bounce
// buffer, a ring that refuses it) is reported to its request with an errno, which Python raises
// as OSError(errno, path) from wait(). Only the constructors and Engine::submit, which run on the
// caller's thread before anything is queued, may throw.
#pragma once

#include <cerrno>
#include <cstddef>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "piece.h"

namespace memfit::aio {

class Backend {
 public:
  virtual ~Backend() = default;
  // Never throws: pieces that cannot be queued are reported to their request with ENOMEM.
  virtual void submit(std::vector<Piece>&& pieces) noexcept = 0;
  virtual const char* name() const = 0;
  // Registers memory for fixed-buffer transfers (pinned until unregistered): returns an entry >= 0,
  // or -errno (-EOPNOTSUPP where the backend or kernel has none). Unregister only memory that no
  // request is using.
  virtual int register_buffer(char* address, std::size_t num_bytes) noexcept {
    static_cast<void>(address), static_cast<void>(num_bytes);
    return -EOPNOTSUPP;
  }
  virtual int unregister_buffer(int entry) noexcept {
    static_cast<void>(entry);
    return -EOPNOTSUPP;
  }
};

std::unique_ptr<Backend> make_thread_backend(std::size_t block_size, int queue_depth);
// Throws std::system_error when the kernel refuses io_uring (old kernel, seccomp, sysctl).
std::unique_ptr<Backend> make_uring_backend(std::size_t block_size, int queue_depth);
bool uring_available();

// Stages a piece's next system call: returns the address to transfer from or into, copying the
// caller's bytes into the bounce buffer first for a write.
char* stage_piece(Piece& piece, char* bounce);
// Completes a staged call: copies bytes read into the bounce buffer back, then advances the piece.
Progress finish_call(Piece& piece, char* bounce, long result, int* err);

// Moves pieces onto queue (the caller holds the queue's lock) and returns how many it moved; it
// stops early only when memory runs out. The caller then reports the rest with fail_pieces, after
// releasing the lock.
std::size_t queue_pieces(std::deque<Piece>& queue, std::vector<Piece>& pieces) noexcept;
void fail_pieces(std::vector<Piece>& pieces, std::size_t first, int err) noexcept;

class Engine {
 public:
  Engine(const std::string& backend, std::size_t block_size, int queue_depth);
  ~Engine();
  std::shared_ptr<Request> submit(const Transfer& transfer, bool allow_short);
  const char* backend_name() const { return backend_->name(); }
  int register_buffer(char* address, std::size_t num_bytes) { return backend_->register_buffer(address, num_bytes); }
  int unregister_buffer(int entry) { return backend_->unregister_buffer(entry); }
  std::size_t block_size() const { return block_size_; }
  int queue_depth() const { return queue_depth_; }

 private:
  std::size_t block_size_;
  int queue_depth_;
  int owner_pid_;  // the process whose threads serve this engine
  std::unique_ptr<Backend> backend_;
};

}  // namespace memfit::aio
