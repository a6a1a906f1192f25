// Pieces: the unit a backend works on. A request is cut so that every piece sent to the O_DIRECT
// descriptor is 4 KiB aligned in file offset and length; the unaligned head and tail of a request
// go to the buffered descriptor of the same file. A direct piece whose memory is not aligned is
// staged through an aligned bounce buffer owned by the backend.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "request.h"

namespace memfit::aio {

constexpr std::size_t kAlignment = 4096;

struct Transfer {
  int direct_fd;    // -1 when the file is not open with O_DIRECT
  int buffered_fd;  // always valid
  char* buffer;
  std::size_t num_bytes;
  std::uint64_t file_offset;
  bool is_read;
};

struct Piece {
  std::shared_ptr<Request> request;
  int fd;
  int fallback_fd;  // buffered descriptor, used if a short transfer leaves an unaligned remainder
  char* buffer;
  std::uint64_t file_offset;
  std::size_t num_bytes;
  std::size_t num_done = 0;
  bool is_read;
  bool direct;
  bool needs_bounce;

  char* cursor() const { return buffer + num_done; }
  std::uint64_t cursor_offset() const { return file_offset + num_done; }
  std::size_t remaining() const { return num_bytes - num_done; }
};

std::vector<Piece> split_transfer(const Transfer& transfer, std::size_t block_size,
                                  const std::shared_ptr<Request>& request);

// Outcome of one system call on a piece; decides whether the piece is finished.
enum class Progress { kDone, kContinue };
Progress advance_piece(Piece& piece, long result, int* err);

// nullptr when memory is short: a backend thread must never throw, so the caller fails the piece.
char* alloc_aligned(std::size_t num_bytes) noexcept;

}  // namespace memfit::aio
