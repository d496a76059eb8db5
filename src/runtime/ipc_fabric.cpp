// Processes sharing GPUs through CUDA IPC (openep/testing.hpp, IpcFabric). A testing facility.
//
// Each process is one rank. Its window is CUDA virtual memory (cuMemCreate) exportable as a POSIX file
// descriptor; the descriptors travel to every peer over Unix-domain sockets (SCM_RIGHTS) in a directory the
// launcher gives, and each peer maps them into its own address space. The imported handles keep the memory alive
// after its owner dies (the driver counts references), so a survivor's stores into a killed rank's window stay
// valid: what a shrink-mode test of a SIGKILLed rank needs on one GPU (NCCL refuses two ranks of one
// communicator on one GPU, and across fake nodes it offers no load/store path).
//
// Rendezvous: every rank listens on <dir>/openep-ipc-<rank>.sock. An exchange (numbered, the same on every rank)
// sends one message to every peer (connect, sendmsg, close) and then accepts one from every peer; messages of
// a later exchange that arrive early are kept. Every wait is bounded by the rendezvous timeout.
#include <cuda.h>
#include <cuda_runtime.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "openep/testing.hpp"
#include "runtime/check.hpp"
#include "runtime/fabric.hpp"

namespace openep::detail {
namespace {

using Clock = std::chrono::steady_clock;

// Driver entry points through the runtime (the core links only cudart).
struct Driver {
  CUresult (*mem_create)(CUmemGenericAllocationHandle*, size_t, const CUmemAllocationProp*, unsigned long long);
  CUresult (*mem_release)(CUmemGenericAllocationHandle);
  CUresult (*address_reserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*address_free)(CUdeviceptr, size_t);
  CUresult (*map)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
  CUresult (*unmap)(CUdeviceptr, size_t);
  CUresult (*set_access)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);
  CUresult (*granularity)(size_t*, const CUmemAllocationProp*, CUmemAllocationGranularity_flags);
  CUresult (*export_handle)(void*, CUmemGenericAllocationHandle, CUmemAllocationHandleType, unsigned long long);
  CUresult (*import_handle)(CUmemGenericAllocationHandle*, void*, CUmemAllocationHandleType);
  CUresult (*get_error_string)(CUresult, const char**);
};

template <typename Fn>
void entry(const char* name, Fn& fn) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult q{};
  OPENEP_CUDA_CHECK(cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &q));
  OPENEP_CHECK(q == cudaDriverEntryPointSuccess && p != nullptr, ErrorCode::kCuda, "IPC fabric: the driver has no ", name);
  fn = reinterpret_cast<Fn>(p);
}

const Driver& driver() {
  static const Driver d = [] {
    Driver x{};
    entry("cuMemCreate", x.mem_create);
    entry("cuMemRelease", x.mem_release);
    entry("cuMemAddressReserve", x.address_reserve);
    entry("cuMemAddressFree", x.address_free);
    entry("cuMemMap", x.map);
    entry("cuMemUnmap", x.unmap);
    entry("cuMemSetAccess", x.set_access);
    entry("cuMemGetAllocationGranularity", x.granularity);
    entry("cuMemExportToShareableHandle", x.export_handle);
    entry("cuMemImportFromShareableHandle", x.import_handle);
    entry("cuGetErrorString", x.get_error_string);
    return x;
  }();
  return d;
}

#define OPENEP_CU_CHECK(call)                                                                                   \
  do {                                                                                                         \
    const CUresult r_ = (call);                                                                                \
    if (r_ != CUDA_SUCCESS) {                                                                                  \
      const char* s_ = nullptr;                                                                                \
      driver().get_error_string(r_, &s_);                                                                      \
      OPENEP_CHECK(false, ErrorCode::kCuda, "IPC fabric: ", #call, " failed: ", s_ ? s_ : "unknown error (",     \
                   static_cast<int>(r_), ")");                                                                 \
    }                                                                                                          \
  } while (0)

// One mapping of a window (own or imported) in this process.
struct Mapping {
  CUdeviceptr ptr = 0;
  size_t bytes = 0;
  CUmemGenericAllocationHandle handle = 0;
};

Mapping map_handle(CUmemGenericAllocationHandle h, size_t bytes, size_t granularity, int device) {
  Mapping m;
  m.handle = h;
  m.bytes = bytes;
  OPENEP_CU_CHECK(driver().address_reserve(&m.ptr, bytes, granularity, 0, 0));
  bool mapped = false;
  try {
    OPENEP_CU_CHECK(driver().map(m.ptr, bytes, 0, h, 0));
    mapped = true;
    CUmemAccessDesc access{};
    access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    access.location.id = device;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    OPENEP_CU_CHECK(driver().set_access(m.ptr, bytes, &access, 1));
  } catch (...) {  // the handle stays the caller's
    if (mapped) driver().unmap(m.ptr, bytes);
    driver().address_free(m.ptr, bytes);
    throw;
  }
  return m;
}

void unmap(Mapping& m) noexcept {
  if (m.ptr) {
    driver().unmap(m.ptr, m.bytes);
    driver().address_free(m.ptr, m.bytes);
  }
  if (m.handle) driver().mem_release(m.handle);
  m = Mapping{};
}

// The message of one exchange: who, which exchange, a small payload, optionally a file descriptor.
struct Header {
  uint32_t magic = 0x4f504950;  // "OPIP"
  int32_t from = -1;
  uint64_t seq = 0;
  uint64_t value = 0;  // the payload (the window size for window exchanges)
  int32_t has_fd = 0;
};

struct Received {
  uint64_t value = 0;
  int fd = -1;
};

}  // namespace

// The rendezvous of one process: its listening socket and the messages received so far.
class IpcEndpoint {
 public:
  IpcEndpoint(const testing::IpcFabricOptions& o) : o_(o) {
    const std::string path = socket_path(o.rank);
    OPENEP_CHECK_ARG(path.size() < sizeof(sockaddr_un::sun_path), "IpcFabricOptions::rendezvous_dir is too long for a "
                     "Unix socket path (", path.size(), " bytes with the file name, at most ",
                     sizeof(sockaddr_un::sun_path) - 1, "): ", path);
    listen_fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    OPENEP_CHECK(listen_fd_ >= 0, ErrorCode::kInternal, "IPC fabric: socket(): ", std::strerror(errno));
    ::unlink(path.c_str());
    sockaddr_un a = address(path);
    OPENEP_CHECK(::bind(listen_fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0, ErrorCode::kInternal,
                 "IPC fabric: bind(", path, "): ", std::strerror(errno), " (IpcFabricOptions::rendezvous_dir must be "
                 "an existing, writable directory)");
    OPENEP_CHECK(::listen(listen_fd_, 256) == 0, ErrorCode::kInternal, "IPC fabric: listen(): ", std::strerror(errno));
  }
  ~IpcEndpoint() {
    if (listen_fd_ >= 0) ::close(listen_fd_);
    ::unlink(socket_path(o_.rank).c_str());
    for (auto& [key, r] : stash_)
      if (r.fd >= 0) ::close(r.fd);
  }
  IpcEndpoint(const IpcEndpoint&) = delete;
  IpcEndpoint& operator=(const IpcEndpoint&) = delete;

  int rank() const noexcept { return o_.rank; }
  int num_ranks() const noexcept { return o_.num_ranks; }
  int device() const noexcept { return o_.device; }

  // All-to-all of (value, fd) with every peer; returns what each rank sent (own entry: `value`, fd -1). The fds
  // returned are the caller's to close. Throws kTimeout naming the ranks that did not arrive within the timeout.
  std::vector<Received> exchange(uint64_t value, int fd, const char* what) {
    const uint64_t seq = ++seq_;
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                             std::chrono::duration<double>(o_.rendezvous_timeout_seconds));
    for (int peer = 0; peer < o_.num_ranks; ++peer)
      if (peer != o_.rank) send_to(peer, seq, value, fd, deadline, what);
    std::vector<Received> out(o_.num_ranks);
    out[o_.rank].value = value;
    for (;;) {
      std::vector<int> missing;
      for (int peer = 0; peer < o_.num_ranks; ++peer)
        if (peer != o_.rank && stash_.find({seq, peer}) == stash_.end()) missing.push_back(peer);
      if (missing.empty()) break;
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) {
        std::string names;
        for (int m : missing) names += (names.empty() ? "" : ", ") + std::to_string(m);
        OPENEP_CHECK(false, ErrorCode::kTimeout, "IPC fabric: rank ", o_.rank, " waited ",
                     o_.rendezvous_timeout_seconds, " s in ", what, " (exchange ", seq, ") for rank(s) ", names);
      }
      pollfd p{listen_fd_, POLLIN, 0};
      const int n = ::poll(&p, 1, static_cast<int>(std::min<long long>(left, 1000)));
      if (n > 0) receive_one();
    }
    for (int peer = 0; peer < o_.num_ranks; ++peer) {
      if (peer == o_.rank) continue;
      auto it = stash_.find({seq, peer});
      out[peer] = it->second;
      stash_.erase(it);
    }
    return out;
  }

 private:
  std::string socket_path(int rank) const { return o_.rendezvous_dir + "/openep-ipc-" + std::to_string(rank) + ".sock"; }
  static sockaddr_un address(const std::string& path) {
    sockaddr_un a{};
    a.sun_family = AF_UNIX;
    std::memcpy(a.sun_path, path.c_str(), path.size() + 1);
    return a;
  }

  void send_to(int peer, uint64_t seq, uint64_t value, int fd, Clock::time_point deadline, const char* what) {
    const std::string path = socket_path(peer);
    const sockaddr_un a = address(path);
    for (;;) {
      const int s = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      OPENEP_CHECK(s >= 0, ErrorCode::kInternal, "IPC fabric: socket(): ", std::strerror(errno));
      if (::connect(s, reinterpret_cast<const sockaddr*>(&a), sizeof(a)) == 0) {
        Header h;
        h.from = o_.rank;
        h.seq = seq;
        h.value = value;
        h.has_fd = fd >= 0 ? 1 : 0;
        iovec io{&h, sizeof(h)};
        alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
        msghdr m{};
        m.msg_iov = &io;
        m.msg_iovlen = 1;
        if (fd >= 0) {
          m.msg_control = control;
          m.msg_controllen = sizeof(control);
          cmsghdr* c = CMSG_FIRSTHDR(&m);
          c->cmsg_level = SOL_SOCKET;
          c->cmsg_type = SCM_RIGHTS;
          c->cmsg_len = CMSG_LEN(sizeof(int));
          std::memcpy(CMSG_DATA(c), &fd, sizeof(int));
        }
        const ssize_t n = ::sendmsg(s, &m, MSG_NOSIGNAL);
        const int err = errno;
        ::close(s);
        OPENEP_CHECK(n == static_cast<ssize_t>(sizeof(h)), ErrorCode::kInternal, "IPC fabric: rank ", o_.rank,
                     " could not send to rank ", peer, " in ", what, ": ", std::strerror(err));
        return;
      }
      const int err = errno;
      ::close(s);
      // The peer has not bound its socket yet (ENOENT) or its backlog is full (EAGAIN, ECONNREFUSED): retry.
      OPENEP_CHECK(Clock::now() < deadline, ErrorCode::kTimeout, "IPC fabric: rank ", o_.rank, " could not reach rank ",
                   peer, " at ", path, " within ", o_.rendezvous_timeout_seconds, " s in ", what, " (last error: ",
                   std::strerror(err), ")");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  void receive_one() {
    const int s = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (s < 0) return;
    Header h;
    iovec io{&h, sizeof(h)};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
    msghdr m{};
    m.msg_iov = &io;
    m.msg_iovlen = 1;
    m.msg_control = control;
    m.msg_controllen = sizeof(control);
    const ssize_t n = ::recvmsg(s, &m, MSG_WAITALL | MSG_CMSG_CLOEXEC);
    ::close(s);
    int fd = -1;
    for (cmsghdr* c = CMSG_FIRSTHDR(&m); c; c = CMSG_NXTHDR(&m, c))
      if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) std::memcpy(&fd, CMSG_DATA(c), sizeof(int));
    if (n != static_cast<ssize_t>(sizeof(h)) || h.magic != Header{}.magic || h.from < 0 || h.from >= o_.num_ranks ||
        (h.has_fd != 0) != (fd >= 0)) {
      if (fd >= 0) ::close(fd);
      std::fprintf(stderr, "OpenEP IPC fabric: rank %d dropped a malformed rendezvous message\n", o_.rank);
      return;
    }
    stash_[{h.seq, h.from}] = Received{h.value, fd};
  }

  testing::IpcFabricOptions o_;
  int listen_fd_ = -1;
  uint64_t seq_ = 0;
  std::map<std::pair<uint64_t, int>, Received> stash_;
};

// One process's rank.
class IpcRankFabric final : public Fabric {
 public:
  explicit IpcRankFabric(const testing::IpcFabricOptions& o) : ep_(o) {}
  ~IpcRankFabric() override {
    for (auto& [base, maps] : windows_)
      for (Mapping& m : maps) unmap(m);
  }

  const char* name() const noexcept override { return "IPC processes"; }
  int rank() const noexcept override { return ep_.rank(); }
  int num_ranks() const noexcept override { return ep_.num_ranks(); }
  int device() const noexcept override { return ep_.device(); }
  int num_nvlink_ranks() const noexcept override { return ep_.num_ranks(); }
  int nvlink_rank() const noexcept override { return ep_.rank(); }

  void open_window(const WindowRequest& req, cudaStream_t stream, char** peer_table, FabricWindow& w) override {
    OPENEP_CHECK(!req.gin, ErrorCode::kUnsupported, "the IPC test fabric has no network: the GIN path cannot run on it");
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = device();
    prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
    size_t gran = 0;
    OPENEP_CU_CHECK(driver().granularity(&gran, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED));
    const size_t bytes = (req.bytes + gran - 1) / gran * gran;
    const int R = num_ranks(), me = rank();
    std::vector<Mapping> maps(R);
    int fd = -1;
    std::vector<Received> got;
    try {
      CUmemGenericAllocationHandle h = 0;
      OPENEP_CU_CHECK(driver().mem_create(&h, bytes, &prop, 0));
      maps[me] = Mapping{0, bytes, h};  // released on failure below
      maps[me] = map_handle(h, bytes, gran, device());
      OPENEP_CUDA_CHECK(cudaMemsetAsync(reinterpret_cast<void*>(maps[me].ptr), 0, bytes, stream));
      OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream));  // zero before any peer can map it
      OPENEP_CU_CHECK(driver().export_handle(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0));
      got = ep_.exchange(bytes, fd, "Buffer creation (IPC window exchange)");
      ::close(fd);
      fd = -1;
      for (int peer = 0; peer < R; ++peer) {
        if (peer == me) continue;
        OPENEP_CHECK(got[peer].value == bytes, ErrorCode::kInvalidArgument, "IPC fabric: rank ", peer,
                     " opened a window of ", got[peer].value, " bytes, rank ", me, " one of ", bytes,
                     " (every rank must pass the same Buffer options)");
        CUmemGenericAllocationHandle ph = 0;
        OPENEP_CU_CHECK(driver().import_handle(&ph, reinterpret_cast<void*>(static_cast<intptr_t>(got[peer].fd)),
                                               CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR));
        ::close(got[peer].fd);
        got[peer].fd = -1;
        maps[peer] = Mapping{0, bytes, ph};
        maps[peer] = map_handle(ph, bytes, gran, device());
      }
    } catch (...) {
      if (fd >= 0) ::close(fd);
      for (Received& r : got)
        if (r.fd >= 0) ::close(r.fd);
      for (Mapping& m : maps) unmap(m);
      throw;
    }
    w = FabricWindow{};
    w.local = reinterpret_cast<char*>(maps[me].ptr);
    w.bytes = req.bytes;
    w.peer_bases.resize(R);
    for (int r = 0; r < R; ++r) w.peer_bases[r] = reinterpret_cast<char*>(maps[r].ptr);
    OPENEP_CUDA_CHECK(cudaMemcpyAsync(peer_table, w.peer_bases.data(), sizeof(char*) * R, cudaMemcpyHostToDevice, stream));
    OPENEP_CUDA_CHECK(cudaStreamSynchronize(stream));
    windows_[w.local] = std::move(maps);
  }

  void close_window(FabricWindow& w) noexcept override {
    auto it = windows_.find(w.local);
    if (it != windows_.end()) {
      for (Mapping& m : it->second) unmap(m);
      windows_.erase(it);
    }
    w = FabricWindow{};
  }

  // Processes sharing a GPU are time-sliced, not co-resident: each rank's kernel may use the whole device.
  GridBudget grid_budget(int device_sms) const override {
    GridBudget b;
    b.device_sms = device_sms;
    b.max_blocks = device_sms;
    b.grids_per_device = 1;
    b.clamp = false;
    return b;
  }

  void host_barrier() { ep_.exchange(0, -1, "host_barrier"); }

 private:
  IpcEndpoint ep_;
  std::map<char*, std::vector<Mapping>> windows_;
};

}  // namespace openep::detail

namespace openep::testing {

std::unique_ptr<Group> IpcFabric::make_group(const IpcFabricOptions& o) {
  OPENEP_CHECK_ARG(o.num_ranks >= 1 && o.num_ranks <= 8, "IpcFabricOptions::num_ranks must be in [1, 8], got ", o.num_ranks);
  OPENEP_CHECK_ARG(o.rank >= 0 && o.rank < o.num_ranks, "IpcFabricOptions::rank must be in [0, ", o.num_ranks, "), got ",
                   o.rank);
  OPENEP_CHECK_ARG(!o.rendezvous_dir.empty(), "IpcFabricOptions::rendezvous_dir must name a directory");
  OPENEP_CHECK_ARG(o.rendezvous_timeout_seconds > 0, "IpcFabricOptions::rendezvous_timeout_seconds must be > 0, got ",
                   o.rendezvous_timeout_seconds);
  OPENEP_CUDA_CHECK(cudaSetDevice(o.device));
  auto fabric = std::make_shared<detail::IpcRankFabric>(o);
  fabric->host_barrier();  // every rank is up before the Group exists
  return std::unique_ptr<Group>(new Group(std::move(fabric)));
}

void IpcFabric::host_barrier(Group& group) {
  auto* f = dynamic_cast<detail::IpcRankFabric*>(&group.fabric());
  OPENEP_CHECK_ARG(f != nullptr, "IpcFabric::host_barrier: the Group was not made by IpcFabric::make_group");
  f->host_barrier();
}

}  // namespace openep::testing
