#include "piece.h"

#include <cerrno>
#include <cstdlib>

namespace memfit::aio {

namespace {

std::uint64_t align_up(std::uint64_t value) { return (value + kAlignment - 1) / kAlignment * kAlignment; }
std::uint64_t align_down(std::uint64_t value) { return value / kAlignment * kAlignment; }

void append_range(std::vector<Piece>& pieces, const Transfer& t, const std::shared_ptr<Request>& request,
                  std::uint64_t begin, std::uint64_t end, std::size_t block_size, bool direct) {
  for (std::uint64_t offset = begin; offset < end; offset += block_size) {
    Piece piece;
    piece.request = request;
    piece.fd = direct ? t.direct_fd : t.buffered_fd;
    piece.fallback_fd = t.buffered_fd;
    piece.buffer = t.buffer + (offset - t.file_offset);
    piece.file_offset = offset;
    piece.num_bytes = static_cast<std::size_t>(std::min<std::uint64_t>(block_size, end - offset));
    piece.is_read = t.is_read;
    piece.direct = direct;
    piece.needs_bounce = direct && reinterpret_cast<std::uintptr_t>(piece.buffer) % kAlignment != 0;
    pieces.push_back(piece);
  }
}

}  // namespace

int64_t Request::result_locked() const {
  if (err_ != 0) return -static_cast<int64_t>(err_);
  if (bytes_ < num_bytes_ && !(is_read_ && allow_short_)) return -ENODATA;
  return static_cast<int64_t>(bytes_);
}

std::vector<Piece> split_transfer(const Transfer& t, std::size_t block_size,
                                  const std::shared_ptr<Request>& request) {
  std::vector<Piece> pieces;
  const std::uint64_t begin = t.file_offset;
  const std::uint64_t end = t.file_offset + t.num_bytes;
  const std::uint64_t mid_begin = align_up(begin);
  const std::uint64_t mid_end = align_down(end);
  if (t.direct_fd < 0 || mid_end <= mid_begin) {
    append_range(pieces, t, request, begin, end, block_size, false);
  } else {
    append_range(pieces, t, request, begin, mid_begin, block_size, false);
    append_range(pieces, t, request, mid_begin, mid_end, block_size, true);
    append_range(pieces, t, request, mid_end, end, block_size, false);
  }
  request->set_num_pieces(static_cast<int>(pieces.size()));
  return pieces;
}

Progress advance_piece(Piece& piece, long result, int* err) {
  if (result < 0) {
    if (result == -EINTR || result == -EAGAIN) return Progress::kContinue;
    *err = static_cast<int>(-result);
    return Progress::kDone;
  }
  if (result == 0) {
    // End of file for a read; a write that makes no progress would loop forever.
    if (!piece.is_read) *err = EIO;
    return Progress::kDone;
  }
  piece.num_done += static_cast<std::size_t>(result);
  if (piece.remaining() == 0) return Progress::kDone;
  if (piece.direct && (piece.cursor_offset() % kAlignment != 0 || piece.remaining() % kAlignment != 0)) {
    // A short direct transfer ends unaligned (end of file for reads): finish on the buffered fd.
    piece.direct = false;
    piece.needs_bounce = false;
    piece.fd = piece.fallback_fd;
  }
  return Progress::kContinue;
}

char* alloc_aligned(std::size_t num_bytes) noexcept {
  void* ptr = nullptr;
  if (posix_memalign(&ptr, kAlignment, num_bytes) != 0) return nullptr;
  return static_cast<char*>(ptr);
}

}  // namespace memfit::aio
