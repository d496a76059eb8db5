// Processes sharing GPUs through CUDA IPC (openep/testing.hpp, IpcFabric). A testing facility.
//
// Each process is one rank. Its window is CUDA virtual memory (cuMemCreate) exportable as a POSIX file
// descriptor; the descriptors travel to every peer over Unix-domain sockets (SCM_RIGHTS) in a directory the
// launcher gives, and each peer maps them into its own address space. The imported handles keep the memory alive
// after its owner dies (the driver counts references), so a survivor's stores into a killed rank's window stay
// valid: what a shrink-mode test of a SIGKILLed rank needs on one GPU (NCCL refuses two ranks of one
// communicator on one GPU, and across fake nodes it offers no load/store path).
//
// Rendezvous: runtime/ipc_rendezvous.hpp.
#include <cuda.h>
#include <cuda_runtime.h>
#include <unistd.h>

#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include "openep/testing.hpp"
#include "runtime/check.hpp"
#include "runtime/fabric.hpp"
#include "runtime/ipc_rendezvous.hpp"

namespace openep::detail {
namespace {

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

}  // namespace

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
    std::vector<IpcEndpoint::Received> got;
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
      for (IpcEndpoint::Received& r : got)
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
  GridBudget grid_budget(int device_sms) const override { return whole_device_budget(device_sms); }

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
