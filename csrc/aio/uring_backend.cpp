// io_uring backend through raw syscalls (no liburing). One service thread owns the ring: it moves
// queued pieces into free slots (at most queue_depth in flight), submits them, and reaps
// completions in the same io_uring_enter call. A slot owns the piece and its bounce buffer until
// the piece is done, so short transfers are resubmitted from the same slot.
//
// Registered buffers: memory registered with the ring (register_buffer) is pinned once, and a
// piece that lies inside it goes out as READ_FIXED / WRITE_FIXED, so the kernel neither pins and
// unpins its pages nor marks them dirty on every transfer. The table is sparse, registered empty at
// setup and filled slot by slot from the caller's thread (io_uring_register and io_uring_enter
// serialize in the kernel). The lookup the service thread makes is under mu_, and a slot is
// registered before it enters the lookup and leaves the lookup before it is cleared; the caller
// unregisters only memory no request is using, so a fixed piece always names its own memory.
#include <sys/mman.h>
#include <sys/uio.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>

#include "backend.h"

#if __has_include(<linux/io_uring.h>) && defined(__NR_io_uring_setup)
#include <linux/io_uring.h>
#define MEMFIT_HAVE_URING 1
#endif

namespace memfit::aio {

#ifdef MEMFIT_HAVE_URING

namespace {

int sys_uring_setup(unsigned entries, io_uring_params* params) {
  return static_cast<int>(::syscall(__NR_io_uring_setup, entries, params));
}

int sys_uring_register(int ring_fd, unsigned opcode, const void* arg, unsigned num_args) {
  return static_cast<int>(::syscall(__NR_io_uring_register, ring_fd, opcode, arg, num_args));
}

int sys_uring_enter(int ring_fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return static_cast<int>(::syscall(__NR_io_uring_enter, ring_fd, to_submit, min_complete, flags, nullptr, 0));
}

// The mapped submission and completion rings.
class Ring {
 public:
  explicit Ring(unsigned entries) {
    io_uring_params params;
    std::memset(&params, 0, sizeof(params));
    fd_ = sys_uring_setup(entries, &params);
    if (fd_ < 0) throw std::system_error(errno, std::generic_category(), "io_uring_setup");
    if (!(params.features & IORING_FEAT_RW_CUR_POS)) {  // kernels before 5.6 lack IORING_OP_READ/WRITE
      ::close(fd_);
      throw std::system_error(ENOSYS, std::generic_category(), "io_uring without IORING_OP_READ");
    }
    sq_bytes_ = params.sq_off.array + params.sq_entries * sizeof(unsigned);
    cq_bytes_ = params.cq_off.cqes + params.cq_entries * sizeof(io_uring_cqe);
    single_mmap_ = params.features & IORING_FEAT_SINGLE_MMAP;
    if (single_mmap_) sq_bytes_ = cq_bytes_ = std::max(sq_bytes_, cq_bytes_);
    sq_ring_ = map(sq_bytes_, IORING_OFF_SQ_RING);
    cq_ring_ = single_mmap_ ? sq_ring_ : map(cq_bytes_, IORING_OFF_CQ_RING);
    sqes_bytes_ = params.sq_entries * sizeof(io_uring_sqe);
    sqes_ = static_cast<io_uring_sqe*>(map(sqes_bytes_, IORING_OFF_SQES));

    auto* sq = static_cast<char*>(sq_ring_);
    sq_tail_ = reinterpret_cast<unsigned*>(sq + params.sq_off.tail);
    sq_mask_ = *reinterpret_cast<unsigned*>(sq + params.sq_off.ring_mask);
    sq_array_ = reinterpret_cast<unsigned*>(sq + params.sq_off.array);
    auto* cq = static_cast<char*>(cq_ring_);
    cq_head_ = reinterpret_cast<unsigned*>(cq + params.cq_off.head);
    cq_tail_ = reinterpret_cast<unsigned*>(cq + params.cq_off.tail);
    cq_mask_ = *reinterpret_cast<unsigned*>(cq + params.cq_off.ring_mask);
    cqes_ = reinterpret_cast<io_uring_cqe*>(cq + params.cq_off.cqes);
  }

  ~Ring() {
    ::munmap(sqes_, sqes_bytes_);
    if (!single_mmap_) ::munmap(cq_ring_, cq_bytes_);
    ::munmap(sq_ring_, sq_bytes_);
    ::close(fd_);
  }

  // An empty table of num_entries registered buffers; false where the kernel has no sparse tables
  // (before 5.19), and then no transfer is ever fixed.
  bool register_sparse_buffers(unsigned num_entries) noexcept {
#ifdef IORING_RSRC_REGISTER_SPARSE
    io_uring_rsrc_register reg;
    std::memset(&reg, 0, sizeof(reg));
    reg.nr = num_entries;
    reg.flags = IORING_RSRC_REGISTER_SPARSE;
    return sys_uring_register(fd_, IORING_REGISTER_BUFFERS2, &reg, sizeof(reg)) == 0;
#else
    static_cast<void>(num_entries);
    return false;
#endif
  }

  // Fills (address, num_bytes) or clears (nullptr, 0) one entry of the table; 0 or an errno.
  int update_buffer(unsigned entry, char* address, std::size_t num_bytes) noexcept {
#ifdef IORING_RSRC_REGISTER_SPARSE
    iovec iov{address, num_bytes};
    io_uring_rsrc_update2 update;
    std::memset(&update, 0, sizeof(update));
    update.offset = entry;
    update.data = reinterpret_cast<std::uint64_t>(&iov);
    update.nr = 1;
    int rc = sys_uring_register(fd_, IORING_REGISTER_BUFFERS_UPDATE, &update, sizeof(update));
    return rc >= 0 ? 0 : errno;
#else
    static_cast<void>(entry), static_cast<void>(address), static_cast<void>(num_bytes);
    return EOPNOTSUPP;
#endif
  }

  // Only the service thread produces submissions, so the tail needs no read barrier. fixed_entry
  // is the registered buffer holding address, or -1.
  void push(const Piece& piece, char* address, std::uint64_t user_data, int fixed_entry) noexcept {
    unsigned tail = *sq_tail_;
    unsigned index = tail & sq_mask_;
    io_uring_sqe* sqe = &sqes_[index];
    std::memset(sqe, 0, sizeof(*sqe));
    if (fixed_entry >= 0) {
      sqe->opcode = piece.is_read ? IORING_OP_READ_FIXED : IORING_OP_WRITE_FIXED;
      sqe->buf_index = static_cast<std::uint16_t>(fixed_entry);
    } else {
      sqe->opcode = piece.is_read ? IORING_OP_READ : IORING_OP_WRITE;
    }
    sqe->fd = piece.fd;
    sqe->addr = reinterpret_cast<std::uint64_t>(address);
    sqe->len = static_cast<unsigned>(piece.remaining());
    sqe->off = piece.cursor_offset();
    sqe->user_data = user_data;
    sq_array_[index] = index;
    __atomic_store_n(sq_tail_, tail + 1, __ATOMIC_RELEASE);
  }

  // Submits to_submit entries and, if wait is set, blocks for at least one completion. Returns 0, or
  // the errno of a failure the kernel reports as lasting; *num_submitted says how many of the
  // entries it took before that.
  int enter(unsigned to_submit, bool wait, unsigned* num_submitted) noexcept {
    *num_submitted = 0;
    for (;;) {
      int rc = sys_uring_enter(fd_, to_submit - *num_submitted, wait ? 1 : 0, wait ? IORING_ENTER_GETEVENTS : 0);
      if (rc >= 0) {
        *num_submitted += static_cast<unsigned>(rc);
        if (*num_submitted == to_submit) return 0;
        continue;
      }
      if (errno != EINTR && errno != EAGAIN && errno != EBUSY) return errno;
    }
  }

  // Takes back the last num_entries pushed entries, which the kernel refused. Safe because the
  // kernel reads the submission tail only inside io_uring_enter (there is no SQPOLL thread).
  void unpush(unsigned num_entries) noexcept { __atomic_store_n(sq_tail_, *sq_tail_ - num_entries, __ATOMIC_RELEASE); }

  template <typename Fn>
  void reap(Fn&& on_completion) noexcept {
    unsigned head = *cq_head_;
    unsigned tail = __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE);
    for (; head != tail; ++head) {
      const io_uring_cqe& cqe = cqes_[head & cq_mask_];
      on_completion(cqe.user_data, cqe.res);
    }
    __atomic_store_n(cq_head_, head, __ATOMIC_RELEASE);
  }

 private:
  void* map(std::size_t num_bytes, off_t offset) {
    void* ptr = ::mmap(nullptr, num_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, offset);
    if (ptr == MAP_FAILED) throw std::system_error(errno, std::generic_category(), "io_uring mmap");
    return ptr;
  }

  int fd_ = -1;
  bool single_mmap_ = false;
  std::size_t sq_bytes_ = 0, cq_bytes_ = 0, sqes_bytes_ = 0;
  void *sq_ring_ = nullptr, *cq_ring_ = nullptr;
  io_uring_sqe* sqes_ = nullptr;
  unsigned *sq_tail_ = nullptr, *sq_array_ = nullptr, sq_mask_ = 0;
  unsigned *cq_head_ = nullptr, *cq_tail_ = nullptr, cq_mask_ = 0;
  io_uring_cqe* cqes_ = nullptr;
};

struct Slot {
  Piece piece;
  char* bounce = nullptr;
  int err = 0;
  int fixed_entry = -1;  // the registered buffer holding the piece's memory, or -1
};

struct FixedBuffer {
  char* address = nullptr;  // nullptr: the entry is free
  std::size_t num_bytes = 0;
};

constexpr unsigned kNumFixedBuffers = 64;

class UringBackend final : public Backend {
 public:
  UringBackend(std::size_t block_size, int queue_depth)
      : block_size_(block_size), ring_(static_cast<unsigned>(queue_depth)), slots_(queue_depth) {
    for (int i = queue_depth - 1; i >= 0; --i) free_slots_.push_back(i);
    if (ring_.register_sparse_buffers(kNumFixedBuffers)) fixed_.resize(kNumFixedBuffers);
    service_ = std::thread([this] { serve(); });
  }

  ~UringBackend() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    service_.join();
    for (auto& slot : slots_) std::free(slot.bounce);
  }

  void submit(std::vector<Piece>&& pieces) noexcept override {
    std::size_t num_queued;
    {
      std::lock_guard<std::mutex> lock(mu_);
      num_queued = queue_pieces(queue_, pieces);
    }
    cv_.notify_all();
    fail_pieces(pieces, num_queued, ENOMEM);
  }

  const char* name() const override { return "io_uring"; }

  int register_buffer(char* address, std::size_t num_bytes) noexcept override {
    std::lock_guard<std::mutex> registering(register_mu_);
    if (fixed_.empty()) return -EOPNOTSUPP;
    unsigned entry = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (entry < fixed_.size() && fixed_[entry].address != nullptr) ++entry;
    }
    if (entry == fixed_.size()) return -ENOSPC;
    int err = ring_.update_buffer(entry, address, num_bytes);  // pins the pages
    if (err != 0) return -err;
    std::lock_guard<std::mutex> lock(mu_);
    fixed_[entry] = FixedBuffer{address, num_bytes};
    return static_cast<int>(entry);
  }

  int unregister_buffer(int entry) noexcept override {
    std::lock_guard<std::mutex> registering(register_mu_);
    if (entry < 0 || static_cast<std::size_t>(entry) >= fixed_.size()) return -EINVAL;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (fixed_[entry].address == nullptr) return -EINVAL;
      fixed_[entry] = FixedBuffer{};
    }
    return -ring_.update_buffer(static_cast<unsigned>(entry), nullptr, 0);
  }

 private:
  // Each round: take queued pieces into free slots, push them and the short transfers to resume,
  // submit, and reap. The three index lists never hold more than queue_depth entries, so they are
  // reserved once and no allocation can fail inside the loop.
  void serve() noexcept {
    std::vector<int> resubmit, claimed, pushed;
    for (auto* list : {&resubmit, &claimed, &pushed}) list->reserve(slots_.size());
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (in_flight_ == 0 && resubmit.empty()) {
          cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
          if (queue_.empty()) return;  // stopping with nothing left
        }
        while (!queue_.empty() && !free_slots_.empty()) {
          int index = free_slots_.back();
          free_slots_.pop_back();
          slots_[index].piece = std::move(queue_.front());
          slots_[index].err = 0;
          slots_[index].fixed_entry = find_fixed(slots_[index].piece);
          queue_.pop_front();
          claimed.push_back(index);
        }
      }
      for (int index : resubmit) push_slot(index, pushed);
      for (int index : claimed) push_slot(index, pushed);
      resubmit.clear();
      claimed.clear();
      if (in_flight_ > 0) submit_and_wait(pushed);
      pushed.clear();
      ring_.reap([&](std::uint64_t index, int res) { on_completion(static_cast<int>(index), res, resubmit); });
    }
  }

  // The registered buffer that holds all of a direct piece's memory, or -1; the caller holds mu_.
  int find_fixed(const Piece& piece) const noexcept {
    if (!piece.direct || piece.needs_bounce) return -1;
    for (std::size_t entry = 0; entry < fixed_.size(); ++entry) {
      const FixedBuffer& fixed = fixed_[entry];
      if (fixed.address != nullptr && piece.buffer >= fixed.address &&
          piece.buffer + piece.num_bytes <= fixed.address + fixed.num_bytes) {
        return static_cast<int>(entry);
      }
    }
    return -1;
  }

  void push_slot(int index, std::vector<int>& pushed) noexcept {
    Slot& slot = slots_[index];
    if (slot.piece.needs_bounce && slot.bounce == nullptr) {
      slot.bounce = alloc_aligned(block_size_);
      if (slot.bounce == nullptr) {
        finish_slot(index, ENOMEM);  // the next piece in this slot tries again
        return;
      }
    }
    // A short transfer that fell back to the buffered descriptor stays inside the same memory, but
    // keeps to the plain opcode like every buffered piece.
    int fixed_entry = slot.piece.direct ? slot.fixed_entry : -1;
    ring_.push(slot.piece, stage_piece(slot.piece, slot.bounce), static_cast<std::uint64_t>(index), fixed_entry);
    ++in_flight_;
    pushed.push_back(index);
  }

  void submit_and_wait(const std::vector<int>& pushed) noexcept {
    unsigned num_submitted = 0;
    int err = ring_.enter(static_cast<unsigned>(pushed.size()), true, &num_submitted);
    if (err == 0) return;
    // The entries the kernel did not take were never started: fail them, leaving the ring and the
    // pieces already in flight as they were.
    ring_.unpush(static_cast<unsigned>(pushed.size()) - num_submitted);
    for (std::size_t i = num_submitted; i < pushed.size(); ++i) {
      --in_flight_;
      finish_slot(pushed[i], err);
    }
    if (pushed.size() == num_submitted) {
      // Only the wait failed. In-flight buffers stay owned by the kernel until their completions
      // arrive, so keep waiting for them, without spinning, until the ring recovers.
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  void on_completion(int index, int res, std::vector<int>& resubmit) noexcept {
    --in_flight_;
    Slot& slot = slots_[index];
    if (finish_call(slot.piece, slot.bounce, res, &slot.err) == Progress::kContinue) {
      resubmit.push_back(index);
      return;
    }
    finish_slot(index, 0);
  }

  // Reports the slot's piece to its request (with err if the piece has no error yet) and frees it.
  void finish_slot(int index, int err) noexcept {
    Slot& slot = slots_[index];
    if (slot.err == 0) slot.err = err;
    auto request = std::move(slot.piece.request);
    request->piece_done(slot.piece.num_done, slot.err);
    std::lock_guard<std::mutex> lock(mu_);
    free_slots_.push_back(index);
  }

  const std::size_t block_size_;
  Ring ring_;
  std::vector<Slot> slots_;
  std::vector<int> free_slots_;
  int in_flight_ = 0;  // touched by the service thread only
  std::vector<FixedBuffer> fixed_;  // empty where the kernel has no sparse buffer tables; under mu_
  std::mutex register_mu_;          // one registration at a time
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Piece> queue_;
  bool stopping_ = false;
  std::thread service_;
};

}  // namespace

bool uring_available() {
  try {
    Ring ring(4);
    return true;
  } catch (const std::system_error&) {
    return false;
  }
}

std::unique_ptr<Backend> make_uring_backend(std::size_t block_size, int queue_depth) {
  return std::make_unique<UringBackend>(block_size, queue_depth);
}

#else  // no io_uring headers at build time

bool uring_available() { return false; }

std::unique_ptr<Backend> make_uring_backend(std::size_t, int) {
  throw std::system_error(ENOSYS, std::generic_category(), "memfit was built without io_uring");
}

#endif

}  // namespace memfit::aio
