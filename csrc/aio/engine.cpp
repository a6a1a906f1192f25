#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "backend.h"

namespace memfit::aio {

char* stage_piece(Piece& piece, char* bounce) {
  if (!piece.needs_bounce) return piece.cursor();
  if (!piece.is_read) std::memcpy(bounce, piece.cursor(), piece.remaining());
  return bounce;
}

Progress finish_call(Piece& piece, char* bounce, long result, int* err) {
  if (piece.needs_bounce && piece.is_read && result > 0) {
    std::memcpy(piece.cursor(), bounce, static_cast<std::size_t>(result));
  }
  return advance_piece(piece, result, err);
}

std::size_t queue_pieces(std::deque<Piece>& queue, std::vector<Piece>& pieces) noexcept {
  std::size_t num_queued = 0;
  try {
    // push_back has the strong guarantee: a piece it fails to queue is left intact in pieces.
    for (; num_queued < pieces.size(); ++num_queued) queue.push_back(std::move(pieces[num_queued]));
  } catch (...) {
  }
  return num_queued;
}

void fail_pieces(std::vector<Piece>& pieces, std::size_t first, int err) noexcept {
  for (std::size_t i = first; i < pieces.size(); ++i) pieces[i].request->piece_done(0, err);
}

Engine::Engine(const std::string& backend, std::size_t block_size, int queue_depth)
    : block_size_(block_size), queue_depth_(queue_depth), owner_pid_(::getpid()) {
  if (block_size == 0 || block_size % kAlignment != 0) {
    throw std::invalid_argument("block_size must be a positive multiple of 4096");
  }
  if (queue_depth < 1) throw std::invalid_argument("queue_depth must be at least 1");
  if (backend == "io_uring") {
    backend_ = make_uring_backend(block_size, queue_depth);
  } else if (backend == "threads") {
    backend_ = make_thread_backend(block_size, queue_depth);
  } else {
    throw std::invalid_argument("unknown backend '" + backend + "'");
  }
}

// Throws std::bad_alloc only before any piece is queued; from then on every failure is reported
// through the request.
Engine::~Engine() {
  // A child of fork() has a copy of the backend but none of its threads: joining them would hang
  // or crash, so the child leaves the copy alone.
  if (::getpid() != owner_pid_) static_cast<void>(backend_.release());
}

std::shared_ptr<Request> Engine::submit(const Transfer& transfer, bool allow_short) {
  auto request = std::make_shared<Request>(transfer.num_bytes, transfer.is_read, allow_short);
  auto pieces = split_transfer(transfer, block_size_, request);
  if (pieces.empty()) return request;  // zero bytes: already complete
  backend_->submit(std::move(pieces));
  return request;
}

}  // namespace memfit::aio
