// All-reduce (and all-gather) through a shared-memory segment, for tensor-parallel ranks on one
// host (CPU).
//
// gloo's all-reduce goes over loopback TCP: ~1.5 ms a call on a 2-core VM, and a Qwen 3.5
// decode step makes two per layer. Here each rank copies its partial sum into its slot of a
// segment every rank has mapped (a file in /dev/shm, parallel/shm.py), publishes a sequence
// number, waits until every rank has published the same one, and sums all slots into its
// tensor in rank order, in fp32 (bf16 / fp16 round once at the end): every rank computes the
// same sum from the same bytes, so every rank gets the bit-identical result.
//
// Segment: a header (one sequence counter per rank, each on its own cache line; each rank's
// pid), then two buffers of `size` slots. Call number s (each chunk of a tensor larger than a
// slot is one) uses buffer s % 2: a rank writes buffer b again at s + 2 only after every rank
// published s + 1, i.e. had finished reading s, so one wait per chunk is the whole protocol.
// A wait spins (_mm_pause), then yields; it fails with an error naming the rank when that
// process is gone (checked every few ms) or after `timeout_s`, instead of hanging.
//
// The per-step message of rank 0 (pickled bytes, parallel/group.py `broadcast`) goes through a
// broadcast region after the buffers: rank 0 waits until every rank has acknowledged the last
// message (one counter per rank), writes the bytes and their length, and publishes the next
// broadcast number; a rank waits for that number, copies the bytes out and acknowledges. A
// message larger than the region is published with length -1: every rank then takes it from
// gloo. Workers wait there while idle, possibly for ever: that wait has no timeout (as gloo's
// control group), it sleeps once the message is late, and fails only when rank 0 is gone.
#include <ATen/Parallel.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include "torch_ext.h"
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "vec_avx2.h"

namespace {

constexpr int64_t kMaxRanks = 64;

struct alignas(64) Counter {
  std::atomic<uint64_t> seq;  // the last call number this rank's slot holds
};
struct Header {
  Counter published[kMaxRanks];
  Counter acked[kMaxRanks];  // the last broadcast this rank has read
  Counter bcast;             // the last broadcast rank 0 has written
  int64_t bcast_len;         // its bytes in the region, or -1: too large, sent over gloo
  int64_t pid[kMaxRanks];
};
static_assert(std::atomic<uint64_t>::is_always_lock_free, "cross-process atomics need lock-free");

constexpr int64_t header_bytes() { return (sizeof(Header) + 4095) / 4096 * 4096; }

int64_t segment_bytes(int64_t size, int64_t slot_bytes, int64_t bcast_bytes) {
  return header_bytes() + 2 * size * slot_bytes + bcast_bytes;
}

using Clock = std::chrono::steady_clock;

class ShmComm {
 public:
  ShmComm(const std::string& path, int64_t rank, int64_t size, int64_t slot_bytes,
          int64_t bcast_bytes, double timeout_s)
      : rank_(rank), size_(size), slot_(slot_bytes), bcast_(bcast_bytes), timeout_s_(timeout_s) {
    TORCH_CHECK(size >= 1 && size <= kMaxRanks && rank >= 0 && rank < size, "bad rank/size");
    TORCH_CHECK(slot_bytes > 0 && slot_bytes % 64 == 0, "slot bytes: a multiple of 64");
    TORCH_CHECK(bcast_bytes >= 0, "broadcast bytes: not negative");
    bytes_ = segment_bytes(size, slot_bytes, bcast_bytes);
    const int fd = ::open(path.c_str(), O_RDWR);
    TORCH_CHECK(fd >= 0, "cannot open ", path, ": ", std::strerror(errno));
    struct stat st;
    if (::fstat(fd, &st) != 0 || st.st_size < bytes_) {
      ::close(fd);
      TORCH_CHECK(false, path, " is smaller than ", bytes_, " bytes");
    }
    void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    ::close(fd);  // the mapping keeps the segment; the file is unlinked once all mapped it
    TORCH_CHECK(p != MAP_FAILED, "cannot map ", path, ": ", std::strerror(errno));
    base_ = static_cast<char*>(p);
    hdr_ = reinterpret_cast<Header*>(base_);
    hdr_->pid[rank] = ::getpid();
  }
  ~ShmComm() { ::munmap(base_, bytes_); }

  // every peer's process is visible from here (same host and pid namespace)
  bool peers_alive() const {
    for (int64_t r = 0; r < size_; ++r) {
      if (r != rank_ && !alive(r)) return false;
    }
    return true;
  }

  // x (contiguous, fp32 / bf16 / fp16) <- the sum of every rank's x, in place
  void all_reduce_(torch::Tensor x) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "a contiguous CPU tensor expected");
    vec8::dispatch(x.scalar_type(), "shm all_reduce", [&](auto t) {
      using T = decltype(t);
      T* data = x.data_ptr<T>();
      const int64_t n = x.numel(), per = slot_ / int64_t(sizeof(T));
      pybind11::gil_scoped_release nogil;  // rank 0's watchdog thread keeps running
      for (int64_t off = 0; off < n; off += per) chunk(data + off, std::min(per, n - off));
    });
  }

  // outs[r] <- rank r's x, for every rank (same shapes and dtype on every rank; any dtype)
  void all_gather(torch::Tensor x, std::vector<torch::Tensor> outs) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && int64_t(outs.size()) == size_,
                "a contiguous CPU tensor and one output per rank expected");
    const int64_t n = x.numel() * x.element_size();
    std::vector<char*> dst;
    for (auto& o : outs) {
      TORCH_CHECK(o.is_contiguous() && o.numel() * o.element_size() == n, "output shape");
      dst.push_back(static_cast<char*>(o.data_ptr()));
    }
    const char* data = static_cast<const char*>(x.data_ptr());
    pybind11::gil_scoped_release nogil;
    for (int64_t off = 0; off < n; off += slot_) {
      const int64_t len = std::min(slot_, n - off);
      const uint64_t seq = exchange(data + off, len);
      for (int64_t r = 0; r < size_; ++r) std::memcpy(dst[r] + off, slot<char>(seq, r), len);
    }
  }

  int64_t calls() const { return int64_t(seq_); }

  // rank 0: send `data` to every other rank through the region; false where it does not fit
  // (the ranks are told to take it from gloo: the caller broadcasts it there)
  bool bcast_send(pybind11::bytes data) {
    TORCH_CHECK(rank_ == 0, "only rank 0 broadcasts");
    char* p = nullptr;
    Py_ssize_t n = 0;
    TORCH_CHECK(PyBytes_AsStringAndSize(data.ptr(), &p, &n) == 0, "bytes expected");
    const bool fits = n <= bcast_;
    pybind11::gil_scoped_release nogil;  // `data` stays alive (the caller holds it)
    for (int64_t r = 1; r < size_; ++r) wait_peer(hdr_->acked[r].seq, bseq_, r);
    if (fits) std::memcpy(base_ + header_bytes() + 2 * size_ * slot_, p, n);
    hdr_->bcast_len = fits ? int64_t(n) : -1;
    hdr_->bcast.seq.store(++bseq_, std::memory_order_release);
    return fits;
  }

  // another rank: rank 0's next message, or None when it comes over gloo
  pybind11::object bcast_recv() {
    TORCH_CHECK(rank_ != 0, "rank 0 sends");
    std::string buf;
    int64_t len;
    {
      pybind11::gil_scoped_release nogil;
      const uint64_t seq = ++bseq_;
      wait_peer(hdr_->bcast.seq, seq, 0);
      len = hdr_->bcast_len;
      if (len >= 0) buf.assign(base_ + header_bytes() + 2 * size_ * slot_, len);
      hdr_->acked[rank_].seq.store(seq, std::memory_order_release);  // rank 0 may write again
    }
    if (len < 0) return pybind11::none();
    return pybind11::bytes(buf);
  }

 private:
  template <typename T>
  T* slot(uint64_t seq, int64_t r) const {
    return reinterpret_cast<T*>(base_ + header_bytes() + ((seq & 1) * size_ + r) * slot_);
  }

  bool alive(int64_t r) const {
    const pid_t pid = pid_t(hdr_->pid[r]);
    return pid > 0 && (::kill(pid, 0) == 0 || errno == EPERM) && !zombie(pid);
  }

  // exited but not yet reaped by its parent (kill(pid, 0) still succeeds); false without /proc
  static bool zombie(pid_t pid) {
    char path[64], buf[512];
    std::snprintf(path, sizeof path, "/proc/%d/stat", int(pid));
    FILE* f = std::fopen(path, "r");
    if (f == nullptr) return false;
    const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = 0;
    const char* p = std::strrchr(buf, ')');  // "pid (comm) state ...": comm may hold ')'
    return p != nullptr && p[1] == ' ' && p[2] == 'Z';
  }

  // publish this rank's n items as the next call and wait until every rank has published it
  template <typename T>
  uint64_t exchange(const T* data, int64_t n) {
    const uint64_t seq = ++seq_;
    std::memcpy(slot<T>(seq, rank_), data, n * sizeof(T));
    hdr_->published[rank_].seq.store(seq, std::memory_order_release);
    for (int64_t r = 0; r < size_; ++r) wait(r, seq);
    return seq;
  }

  template <typename T>
  void chunk(T* data, int64_t n) {
    const uint64_t seq = exchange(data, n);
    const T* src[kMaxRanks];
    for (int64_t r = 0; r < size_; ++r) src[r] = slot<T>(seq, r);
    at::parallel_for(0, (n + 7) / 8, 8192, [&](int64_t b0, int64_t b1) {
      const int64_t i1 = std::min(n, b1 * 8);
      int64_t i = b0 * 8;
      if constexpr (vec8::kVec8<T>) {
        for (; i + 8 <= i1; i += 8) {
          __m256 acc = vec8::load8(src[0] + i);
          for (int64_t r = 1; r < size_; ++r) acc = _mm256_add_ps(acc, vec8::load8(src[r] + i));
          vec8::store8(data + i, acc);
        }
      }
      for (; i < i1; ++i) {
        float acc = static_cast<float>(src[0][i]);
        for (int64_t r = 1; r < size_; ++r) acc += static_cast<float>(src[r][i]);
        data[i] = static_cast<T>(acc);
      }
    });
  }

  // until rank r has published call `seq`
  void wait(int64_t r, uint64_t seq) const {
    const std::atomic<uint64_t>& c = hdr_->published[r].seq;
    for (int i = 0; i < 4096; ++i) {  // the common case: a peer a few microseconds behind
      if (c.load(std::memory_order_acquire) >= seq) return;
      _mm_pause();
    }
    const auto t0 = Clock::now();
    auto checked = t0;
    while (c.load(std::memory_order_acquire) < seq) {
      sched_yield();
      const auto now = Clock::now();
      if (now - checked > std::chrono::milliseconds(5)) {
        checked = now;
        TORCH_CHECK(alive(r), "shared-memory all-reduce: tensor-parallel rank ", r, " (pid ",
                    hdr_->pid[r], ") is gone");
      }
      const double waited = std::chrono::duration<double>(now - t0).count();
      TORCH_CHECK(waited < timeout_s_, "shared-memory all-reduce: tensor-parallel rank ", r,
                  " did not arrive within ", timeout_s_, " s (call ", seq, ")");
      if (waited > 0.1) ::usleep(50);  // a long wait (a peer descheduled): stop burning a core
    }
  }

  // until counter c (rank r's) reaches seq, however long: a waiting worker may be idle for
  // hours. Spins, yields for a millisecond, then sleeps (50 us, then 1 ms once 100 ms late:
  // an idle rank wakes ~1000 times a second). Fails only when rank r's process is gone.
  void wait_peer(const std::atomic<uint64_t>& c, uint64_t seq, int64_t r) const {
    for (int i = 0; i < 4096; ++i) {
      if (c.load(std::memory_order_acquire) >= seq) return;
      _mm_pause();
    }
    const auto t0 = Clock::now();
    auto checked = t0;
    while (c.load(std::memory_order_acquire) < seq) {
      const auto now = Clock::now();
      if (now - checked > std::chrono::milliseconds(5)) {
        checked = now;
        TORCH_CHECK(alive(r), "shared-memory broadcast: tensor-parallel rank ", r, " (pid ",
                    hdr_->pid[r], ") is gone");
      }
      const auto waited = now - t0;
      if (waited < std::chrono::milliseconds(1)) {
        sched_yield();
      } else {
        ::usleep(waited < std::chrono::milliseconds(100) ? 50 : 1000);
      }
    }
  }

  int64_t rank_, size_, slot_, bcast_, bytes_;
  double timeout_s_;
  char* base_ = nullptr;
  Header* hdr_ = nullptr;
  uint64_t seq_ = 0;
  uint64_t bseq_ = 0;  // broadcasts sent (rank 0) or received (the others)
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("segment_bytes", &segment_bytes, "bytes of the segment for `size` ranks and a slot size");
  pybind11::class_<ShmComm>(m, "ShmComm")
      .def(pybind11::init<const std::string&, int64_t, int64_t, int64_t, int64_t, double>())
      .def("peers_alive", &ShmComm::peers_alive)
      .def("all_reduce_", &ShmComm::all_reduce_)
      .def("all_gather", &ShmComm::all_gather)
      .def("calls", &ShmComm::calls)
      .def("bcast_send", &ShmComm::bcast_send)
      .def("bcast_recv", &ShmComm::bcast_recv);
}
