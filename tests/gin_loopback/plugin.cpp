// OpenEP loopback GIN net plugin (test tooling, not part of the library). See README.md in this folder.
//
// Exports ncclNetPlugin_v11 (a slow byte-stream network over abstract Unix-domain sockets between processes
// of ONE host) and ncclGinPlugin_v11 of type NCCL_NET_DEVICE_GIN_PROXY: NCCL 2.28.9's own proxy code
// (src/gin/gin_host_proxy.cc) polls the GPU's descriptor queues and calls iput / iputSignal / test /
// ginProgress here. Memory model: the RECEIVER applies every put to its own registered memory. The sender
// copies the source bytes out of its own registration (memcpy, or cudaMemcpyAsync D2H on a private
// non-blocking stream) and streams them to the target process; the target's ginProgress (called by NCCL's GIN
// progress thread) writes them into its own registration (memcpy or H2D) and applies signals by
// read-modify-write. No process ever maps another's memory, so any registration works: ncclMemAlloc/cuMem
// windows, cudaMalloc, and NCCL's signal buffer, which is a cuMem allocation with CU_MEM_HANDLE_TYPE_NONE and
// therefore could not be exported through CUDA IPC at all.
#include <cerrno>
#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ordering_engine.hpp"
#include "plugin_abi.h"

using namespace openep_gin_lb_abi;
using openep_gin_lb::EngineConfig;
using openep_gin_lb::OrderingEngine;
using openep_gin_lb::Part;

namespace {

// ---------------------------------------------------------------------------------------------- config, log
DebugLogger g_log = nullptr;
std::mutex g_mu;  // one big lock: NCCL's proxy thread and GIN progress thread may call in concurrently

uint64_t env_u64(const char* name, uint64_t dflt) {
  const char* v = getenv(name);
  return (v && *v) ? strtoull(v, nullptr, 0) : dflt;
}

struct Config {
  bool adversarial;
  uint64_t max_delay_ns;
  uint64_t completion_delay_ns;
  uint64_t seed;
  uint64_t connect_timeout_ms;
};
const Config& config() {
  static Config c = [] {
    Config k;
    k.adversarial = env_u64("OPENEP_GIN_LB_ADVERSARIAL", 1) != 0;
    k.max_delay_ns = env_u64("OPENEP_GIN_LB_MAX_DELAY_US", 2000) * 1000;
    k.completion_delay_ns = env_u64("OPENEP_GIN_LB_COMPLETION_DELAY_US", 200) * 1000;
    k.seed = env_u64("OPENEP_GIN_LB_SEED", (uint64_t)getpid() * 2654435761ull);
    k.connect_timeout_ms = env_u64("OPENEP_GIN_LB_CONNECT_TIMEOUT_MS", 120000);
    return k;
  }();
  return c;
}

void logf(int level, const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (g_log) {
    g_log(level, kLogSubsysNet, __FILE__, __LINE__, "%s", buf);
  } else if (level == kLogWarn || getenv("OPENEP_GIN_LB_DEBUG")) {
    fprintf(stderr, "[openep-gin-loopback pid %d] %s\n", (int)getpid(), buf);
  }
}
#define WARN(...) logf(kLogWarn, __VA_ARGS__)
#define INFO(...) logf(kLogInfo, __VA_ARGS__)

uint64_t now_ns() {
  return (uint64_t)std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch()).count();
}

// ---------------------------------------------------------------------------------------------- sockets
constexpr uint32_t kHandleMagic = 0x4f45474cu;  // "OEGL"
struct ListenHandle {
  uint32_t magic;
  uint32_t name_len;
  char name[96];  // abstract Unix socket name (without the leading NUL)
};
static_assert(sizeof(ListenHandle) <= kNetHandleMaxSize, "handle too large");

socklen_t make_addr(const ListenHandle& h, sockaddr_un* a) {
  memset(a, 0, sizeof *a);
  a->sun_family = AF_UNIX;
  memcpy(a->sun_path + 1, h.name, h.name_len);
  return (socklen_t)(offsetof(sockaddr_un, sun_path) + 1 + h.name_len);
}

void set_nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

struct ListenComm {
  int fd = -1;
  bool gin = false;
};

ncclResult_t do_listen(void* handle, void** listen_comm, bool gin) {
  static int counter = 0;
  ListenHandle h{};
  h.magic = kHandleMagic;
  int n = snprintf(h.name, sizeof h.name, "openep-gin-lb/%d/%d/%llu", (int)getpid(), counter++,
                   (unsigned long long)now_ns());
  h.name_len = (uint32_t)n;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return ncclSystemError;
  sockaddr_un a;
  socklen_t len = make_addr(h, &a);
  if (bind(fd, (sockaddr*)&a, len) != 0 || ::listen(fd, 4096) != 0) {
    WARN("listen: bind/listen failed: %s", strerror(errno));
    close(fd);
    return ncclSystemError;
  }
  set_nonblock(fd);
  memset(handle, 0, kNetHandleMaxSize);
  memcpy(handle, &h, sizeof h);
  auto* lc = new ListenComm;
  lc->fd = fd;
  lc->gin = gin;
  *listen_comm = lc;
  return ncclSuccess;
}

// Non-blocking connect; returns fd, -1 = try again, -2 = error.
int try_connect(const void* handle) {
  ListenHandle h;
  memcpy(&h, handle, sizeof h);
  if (h.magic != kHandleMagic || h.name_len >= sizeof h.name) return -2;
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) return -2;
  sockaddr_un a;
  socklen_t len = make_addr(h, &a);
  if (::connect(fd, (sockaddr*)&a, len) == 0) return fd;
  int e = errno;
  close(fd);
  if (e == EAGAIN || e == ECONNREFUSED || e == EINTR) return -1;
  WARN("connect to %.*s failed: %s", (int)h.name_len, h.name, strerror(e));
  return -2;
}

// Writes what the socket takes now. Returns false on a hard error.
bool write_some(int fd, std::deque<char>& q) {
  char chunk[1 << 16];
  while (!q.empty()) {
    size_t n = std::min(q.size(), sizeof chunk);
    std::copy(q.begin(), q.begin() + n, chunk);
    ssize_t w = send(fd, chunk, n, MSG_NOSIGNAL);
    if (w < 0) return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
    q.erase(q.begin(), q.begin() + w);
    if ((size_t)w < n) return true;
  }
  return true;
}
// Reads what is there. Returns false on a hard error or EOF (eof set).
bool read_some(int fd, std::vector<char>& buf, bool* eof) {
  char chunk[1 << 16];
  for (;;) {
    ssize_t r = recv(fd, chunk, sizeof chunk, 0);
    if (r > 0) { buf.insert(buf.end(), chunk, chunk + r); continue; }
    if (r == 0) { *eof = true; return false; }
    return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
  }
}

// ---------------------------------------------------------------------------------------------- memory copies
// A registration: host memory (memcpy) or CUDA memory of `device` (copies on a private non-blocking stream,
// so they never wait for the kernels that post the puts).
struct Region {
  uint64_t id;
  char* base;
  size_t size;
  int type;
  int device;
};

cudaStream_t stream_for(int device) {
  static std::map<int, cudaStream_t> streams;
  auto it = streams.find(device);
  if (it != streams.end()) return it->second;
  cudaStream_t s = nullptr;
  int previous = -1;
  cudaGetDevice(&previous);  // may run on the application's thread (gin_regmr): leave its device as it was
  cudaSetDevice(device);
  const cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  if (previous >= 0) cudaSetDevice(previous);
  if (e != cudaSuccess) {
    WARN("cudaStreamCreateWithFlags failed on device %d", device);
    return nullptr;
  }
  streams[device] = s;
  return s;
}

bool copy_out(const Region& r, uint64_t off, size_t size, char* dst) {
  if (size == 0) return true;
  if (off + size > r.size) { WARN("put source [%llu,+%zu) outside its window of %zu bytes", (unsigned long long)off, size, r.size); return false; }
  if (r.type == kPtrHost) { memcpy(dst, r.base + off, size); return true; }
  cudaSetDevice(r.device);
  cudaStream_t s = stream_for(r.device);
  return cudaMemcpyAsync(dst, r.base + off, size, cudaMemcpyDeviceToHost, s) == cudaSuccess &&
         cudaStreamSynchronize(s) == cudaSuccess;
}
bool copy_in(const Region& r, uint64_t off, size_t size, const char* src) {
  if (size == 0) return true;
  if (off + size > r.size) { WARN("put destination [%llu,+%zu) outside its window of %zu bytes", (unsigned long long)off, size, r.size); return false; }
  if (r.type == kPtrHost) { memcpy(r.base + off, src, size); return true; }
  cudaSetDevice(r.device);
  cudaStream_t s = stream_for(r.device);
  return cudaMemcpyAsync(r.base + off, src, size, cudaMemcpyHostToDevice, s) == cudaSuccess &&
         cudaStreamSynchronize(s) == cudaSuccess;
}
// Signal add as read-modify-write. Signals of one context are only ever written by this process's progress
// call for that context (serialised under g_mu); GIN forbids resetSignal racing with incoming signals.
bool signal_add(const Region& r, uint64_t off, uint64_t add) {
  if (off + 8 > r.size) { WARN("signal offset %llu outside the signal window", (unsigned long long)off); return false; }
  if (r.type == kPtrHost) { __atomic_fetch_add((uint64_t*)(r.base + off), add, __ATOMIC_SEQ_CST); return true; }
  uint64_t v = 0;
  if (!copy_out(r, off, 8, (char*)&v)) return false;
  v += add;
  return copy_in(r, off, 8, (const char*)&v);
}

// ---------------------------------------------------------------------------------------------- regular net
struct NetReq;
struct NetComm {
  int fd = -1;
  bool is_send = false;
  std::deque<NetReq*> queue;
  // receive side framing
  char hdr[16];
  size_t hdr_got = 0;
  uint64_t msg_size = 0;
  size_t data_got = 0;
  // send side
  size_t sent = 0;
  bool failed = false;
};
struct NetReq {
  NetComm* comm;
  bool is_send;
  char* data;
  size_t size;  // send: bytes; recv: capacity
  int tag;
  size_t done_size = 0;
  bool done = false;
};

bool net_progress(NetComm* c) {
  while (!c->queue.empty() && !c->failed) {
    NetReq* r = c->queue.front();
    if (r->is_send) {
      char hdr[16];
      uint64_t sz = r->size;
      memcpy(hdr, &sz, 8);
      int64_t tag = r->tag;
      memcpy(hdr + 8, &tag, 8);
      while (c->sent < 16 + r->size) {
        const char* p = c->sent < 16 ? hdr + c->sent : r->data + (c->sent - 16);
        size_t n = c->sent < 16 ? 16 - c->sent : r->size - (c->sent - 16);
        ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return true;
          WARN("net send failed: %s", strerror(errno));
          c->failed = true;
          return false;
        }
        c->sent += (size_t)w;
      }
      c->sent = 0;
      r->done_size = r->size;
    } else {
      while (c->hdr_got < 16) {
        ssize_t g = recv(c->fd, c->hdr + c->hdr_got, 16 - c->hdr_got, 0);
        if (g == 0) { WARN("net recv: peer closed the connection"); c->failed = true; return false; }
        if (g < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return true;
          c->failed = true;
          return false;
        }
        c->hdr_got += (size_t)g;
        if (c->hdr_got == 16) {
          memcpy(&c->msg_size, c->hdr, 8);
          if (c->msg_size > r->size) {
            WARN("net recv: message of %llu bytes for a receive of %zu", (unsigned long long)c->msg_size, r->size);
            c->failed = true;
            return false;
          }
        }
      }
      while (c->data_got < c->msg_size) {
        ssize_t g = recv(c->fd, r->data + c->data_got, c->msg_size - c->data_got, 0);
        if (g == 0) { c->failed = true; return false; }
        if (g < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return true;
          c->failed = true;
          return false;
        }
        c->data_got += (size_t)g;
      }
      r->done_size = c->msg_size;
      c->hdr_got = 0;
      c->data_got = 0;
      c->msg_size = 0;
    }
    r->done = true;
    c->queue.pop_front();
  }
  return !c->failed;
}

char g_net_name[] = "OpenEPLoopback";
char g_dev_name[] = "openep-loopback0";

void fill_props(NetProperties* p, bool gin) {
  memset(p, 0, sizeof *p);
  p->name = g_dev_name;
  p->pciPath = nullptr;  // a virtual NIC: NCCL's topology attaches it to the CPU
  p->guid = 0x4f70656e45500000ull + (gin ? 1 : 0);
  p->ptrSupport = kPtrHost | (gin ? kPtrCuda : 0);  // net: host bounce buffers; GIN: registers GPU windows
  p->regIsGlobal = 0;
  p->forceFlush = 0;
  p->speed = 10000;
  p->port = 0;
  p->latency = 0;
  p->maxComms = 1 << 20;
  p->maxRecvs = gin ? 8 : 1;  // GIN: NCCL sizes the proxy queue as 32 * maxRecvs (power of two)
  p->netDeviceType = gin ? kDeviceGinProxy : kDeviceHost;
  p->netDeviceVersion = 0;
  p->vProps.ndevs = 1;
  p->vProps.devs[0] = 0;
  p->maxP2pBytes = kMaxNetSizeBytes;
  p->maxCollBytes = kMaxCollNetSize;
  p->maxMultiRequestSize = 1;
}

ncclResult_t net_init(void** ctx, uint64_t, NetCommConfig*, DebugLogger log, ProfilerCallback) {
  if (log) g_log = log;
  static int dummy;
  *ctx = &dummy;
  const Config& c = config();
  INFO("OpenEP loopback net plugin: adversarial=%d max_delay_us=%llu seed=%llu (NOT a real network)", c.adversarial,
       (unsigned long long)(c.max_delay_ns / 1000), (unsigned long long)c.seed);
  return ncclSuccess;
}
ncclResult_t net_devices(int* n) { *n = 1; return ncclSuccess; }
ncclResult_t net_props(int dev, NetProperties* p) {
  if (dev != 0) return ncclInvalidArgument;
  fill_props(p, false);
  return ncclSuccess;
}
ncclResult_t net_listen(void*, int dev, void* handle, void** lc) {
  if (dev != 0) return ncclInvalidArgument;
  return do_listen(handle, lc, false);
}
ncclResult_t net_connect(void*, int, void* handle, void** send_comm, NetDeviceHandle**) {
  *send_comm = nullptr;
  int fd = try_connect(handle);
  if (fd == -2) return ncclSystemError;
  if (fd == -1) return ncclSuccess;  // NCCL calls again
  auto* c = new NetComm;
  c->fd = fd;
  c->is_send = true;
  *send_comm = c;
  return ncclSuccess;
}
ncclResult_t net_accept(void* lcv, void** recv_comm, NetDeviceHandle**) {
  auto* lc = (ListenComm*)lcv;
  *recv_comm = nullptr;
  int fd = accept4(lc->fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0) return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? ncclSuccess : ncclSystemError;
  auto* c = new NetComm;
  c->fd = fd;
  *recv_comm = c;
  return ncclSuccess;
}
int g_mr_dummy;
ncclResult_t net_regmr(void*, void*, size_t, int type, void** mh) {
  if (type != kPtrHost) return ncclInternalError;
  *mh = &g_mr_dummy;
  return ncclSuccess;
}
ncclResult_t net_regmr_dmabuf(void*, void*, size_t, int, uint64_t, int, void**) { return ncclInternalError; }
ncclResult_t net_deregmr(void*, void*) { return ncclSuccess; }
ncclResult_t net_isend(void* sc, void* data, size_t size, int tag, void*, void*, void** request) {
  std::lock_guard<std::mutex> g(g_mu);
  auto* c = (NetComm*)sc;
  if (c->queue.size() >= (size_t)kNetMaxRequests) { *request = nullptr; return ncclSuccess; }
  auto* r = new NetReq{c, true, (char*)data, size, tag};
  c->queue.push_back(r);
  *request = r;
  return net_progress(c) ? ncclSuccess : ncclRemoteError;
}
ncclResult_t net_irecv(void* rc, int n, void** data, size_t* sizes, int* tags, void**, void**, void** request) {
  std::lock_guard<std::mutex> g(g_mu);
  if (n != 1) return ncclInternalError;
  auto* c = (NetComm*)rc;
  if (c->queue.size() >= (size_t)kNetMaxRequests) { *request = nullptr; return ncclSuccess; }
  auto* r = new NetReq{c, false, (char*)data[0], sizes[0], tags ? tags[0] : 0};
  c->queue.push_back(r);
  *request = r;
  return net_progress(c) ? ncclSuccess : ncclRemoteError;
}
ncclResult_t net_iflush(void* rc, int, void**, int*, void**, void** request) {
  // Host memory only: nothing to flush. A request that is already complete.
  auto* r = new NetReq{(NetComm*)rc, false, nullptr, 0, 0};
  r->comm = nullptr;
  r->done = true;
  *request = r;
  return ncclSuccess;
}
ncclResult_t net_test(void* request, int* done, int* sizes) {
  std::lock_guard<std::mutex> g(g_mu);
  auto* r = (NetReq*)request;
  *done = 0;
  if (!r->done && r->comm && !net_progress(r->comm)) return ncclRemoteError;
  if (r->done) {
    *done = 1;
    if (sizes) sizes[0] = (int)r->done_size;
    delete r;
  }
  return ncclSuccess;
}
ncclResult_t net_close(void* cv) {
  std::lock_guard<std::mutex> g(g_mu);
  auto* c = (NetComm*)cv;
  if (!c) return ncclSuccess;
  for (NetReq* r : c->queue) delete r;
  close(c->fd);
  delete c;
  return ncclSuccess;
}
ncclResult_t net_close_listen(void* lcv) {
  auto* lc = (ListenComm*)lcv;
  if (!lc) return ncclSuccess;
  close(lc->fd);
  delete lc;
  return ncclSuccess;
}
ncclResult_t net_get_device_mr(void*, void*, void** d) { *d = nullptr; return ncclSuccess; }
ncclResult_t net_irecv_consumed(void*, int, void*) { return ncclSuccess; }
ncclResult_t net_make_vdevice(int* d, NetVDeviceProps* props) {
  if (!props || props->ndevs != 1 || props->devs[0] != 0) return ncclInvalidUsage;
  *d = 0;
  return ncclSuccess;
}
ncclResult_t net_finalize(void*) { return ncclSuccess; }
ncclResult_t net_set_attr(void*, NetAttr*) { return ncclSuccess; }

// ---------------------------------------------------------------------------------------------- GIN
constexpr uint32_t kWireMagic = 0x4f475055u;  // "OGPU"
constexpr uint64_t kNoWindow = ~0ull;
struct WireHdr {
  uint32_t magic;
  uint32_t has_signal;
  uint64_t seq;
  uint64_t win_id;
  uint64_t dst_off;
  uint64_t size;
  uint64_t sig_win_id;
  uint64_t sig_off;
  uint64_t sig_value;
  uint32_t sig_op;
  uint32_t src_rank;
};
struct WireOp {
  WireHdr hdr;
  std::vector<char> data;
};

struct Peer {
  int out_fd = -1;
  int in_fd = -1;
  std::deque<char> outq;
  std::vector<char> inbuf;
  std::deque<WireOp> stalled;  // arrived, but a window they name is not registered here yet
  std::unique_ptr<OrderingEngine<WireOp>> engine;
  uint64_t next_seq = 0;
  bool closed = false;
};

struct GinReq {
  uint64_t done_at_ns;
};

struct CollComm {
  int rank = 0;
  int nranks = 0;
  std::vector<Peer> peers;
  uint64_t next_win_id = 0;
  std::map<uint64_t, Region*> windows;
  bool error = false;
  std::mt19937_64 rng;
};

struct GinCtx {  // only for createContext, which NCCL does not call in proxy mode
  CollComm* comm;
};

ncclResult_t gin_init(void** ctx, uint64_t, DebugLogger log) {
  if (log) g_log = log;
  static int dummy;
  *ctx = &dummy;
  return ncclSuccess;
}
ncclResult_t gin_props(int dev, NetProperties* p) {
  if (dev != 0) return ncclInvalidArgument;
  fill_props(p, true);
  return ncclSuccess;
}
ncclResult_t gin_listen(void*, int dev, void* handle, void** lc) {
  if (dev != 0) return ncclInvalidArgument;
  return do_listen(handle, lc, true);
}

bool write_all_blocking(int fd, const void* p, size_t n) {
  const char* c = (const char*)p;
  while (n) {
    ssize_t w = send(fd, c, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EAGAIN || errno == EINTR) { pollfd pf{fd, POLLOUT, 0}; poll(&pf, 1, 100); continue; }
      return false;
    }
    c += w;
    n -= (size_t)w;
  }
  return true;
}
bool read_all_blocking(int fd, void* p, size_t n, uint64_t deadline) {
  char* c = (char*)p;
  while (n) {
    ssize_t r = recv(fd, c, n, 0);
    if (r == 0) return false;
    if (r < 0) {
      if ((errno == EAGAIN || errno == EINTR) && now_ns() < deadline) { pollfd pf{fd, POLLIN, 0}; poll(&pf, 1, 100); continue; }
      return false;
    }
    c += r;
    n -= (size_t)r;
  }
  return true;
}

// Collective: every rank connects one stream to every rank (itself included) and accepts nranks streams.
ncclResult_t gin_connect(void*, void* handles[], int nranks, int rank, void* lcv, void** coll) {
  auto* lc = (ListenComm*)lcv;
  const Config& cfg = config();
  uint64_t deadline = now_ns() + cfg.connect_timeout_ms * 1000000ull;
  auto* c = new CollComm;
  c->rank = rank;
  c->nranks = nranks;
  c->peers.resize(nranks);
  c->rng.seed(cfg.seed ^ ((uint64_t)rank << 32));
  for (int r = 0; r < nranks; ++r) {
    EngineConfig ec;
    ec.adversarial = cfg.adversarial;
    ec.max_delay_ns = cfg.max_delay_ns;
    ec.seed = cfg.seed * 1000003ull + (uint64_t)r * 7919ull + (uint64_t)rank;
    c->peers[r].engine.reset(new OrderingEngine<WireOp>(ec));
  }
  int connected = 0, accepted = 0;
  while (connected < nranks || accepted < nranks) {
    if (now_ns() > deadline) {
      WARN("GIN connect: rank %d timed out (%d/%d connected, %d/%d accepted)", rank, connected, nranks, accepted, nranks);
      return ncclRemoteError;
    }
    bool progress = false;
    if (connected < nranks) {
      int fd = try_connect(handles[connected]);
      if (fd == -2) return ncclSystemError;
      if (fd >= 0) {
        uint32_t me = (uint32_t)rank;
        if (!write_all_blocking(fd, &me, 4)) return ncclSystemError;
        c->peers[connected++].out_fd = fd;
        progress = true;
      }
    }
    int fd = accept4(lc->fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      uint32_t who = 0;
      if (!read_all_blocking(fd, &who, 4, deadline) || who >= (uint32_t)nranks || c->peers[who].in_fd >= 0) {
        WARN("GIN connect: bad hello on an incoming stream");
        return ncclSystemError;
      }
      c->peers[who].in_fd = fd;
      ++accepted;
      progress = true;
    }
    if (!progress) usleep(200);
  }
  *coll = c;
  INFO("GIN connect: rank %d of %d connected (adversarial=%d)", rank, nranks, cfg.adversarial);
  return ncclSuccess;
}

ncclResult_t gin_create_context(void*, int, int, void**, NetDeviceHandle**) {
  WARN("createContext is GDAKI-only; this plugin is NCCL_NET_DEVICE_GIN_PROXY (NCCL_GIN_TYPE=2)");
  return ncclInternalError;
}
ncclResult_t gin_destroy_context(void*) { return ncclSuccess; }

// Symmetric registration: every rank registers its windows in the same order on a collComm, so the n-th
// registration has id n on every rank; puts name the destination window by that id.
ncclResult_t gin_regmr(void* collv, void* data, size_t size, int type, uint64_t, void** mh, void** gh) {
  std::lock_guard<std::mutex> g(g_mu);
  auto* c = (CollComm*)collv;
  auto* r = new Region{c->next_win_id++, (char*)data, size, type, -1};
  if (type == kPtrCuda) {
    cudaPointerAttributes at{};
    if (cudaPointerGetAttributes(&at, data) != cudaSuccess || at.device < 0) {
      WARN("regMrSym: %p is not CUDA memory", data);
      delete r;
      return ncclInvalidArgument;
    }
    r->device = at.device;
    // The copy stream is made here, on the registering (application) thread: made lazily on NCCL's GIN proxy
    // thread, cudaStreamCreate waited for a driver lock that the application thread held in a kernel launch
    // blocked behind a kernel that waited for this very proxy (a deadlock seen on an H200 at 006b633).
    if (!stream_for(r->device)) {
      delete r;
      return ncclSystemError;
    }
  } else if (type != kPtrHost) {
    delete r;
    return ncclInvalidArgument;
  }
  c->windows[r->id] = r;
  // NCCL passes the ginHandle of user windows but the mhandle of its inline buffer to iput: same object.
  *mh = r;
  *gh = r;
  return ncclSuccess;
}
ncclResult_t gin_regmr_dmabuf(void* c, void* data, size_t size, int type, uint64_t, int, uint64_t f, void** mh, void** gh) {
  return gin_regmr(c, data, size, type, f, mh, gh);  // not advertised (no NCCL_PTR_DMABUF); kept for safety
}
ncclResult_t gin_deregmr(void* collv, void* mh) {
  std::lock_guard<std::mutex> g(g_mu);
  auto* c = (CollComm*)collv;
  auto* r = (Region*)mh;
  if (!r) return ncclSuccess;
  c->windows.erase(r->id);
  delete r;
  return ncclSuccess;
}

bool known(CollComm* c, uint64_t id) { return id == kNoWindow || c->windows.count(id); }

// A put whose window was deregistered here while it was in flight (the receiver released memory a peer still
// writes to: a protocol error of the caller) is an error NCCL reports, not a crash of the process.
bool apply(CollComm* c, const WireOp& op, Part part) {
  const uint64_t id = part == Part::kData ? op.hdr.win_id : op.hdr.sig_win_id;
  if (part == Part::kData && op.hdr.size == 0) return true;
  auto it = c->windows.find(id);
  if (it == c->windows.end()) {
    WARN("GIN: a %s from rank %u (seq %llu) names window %llu, which is not registered here (deregistered while "
         "the put was in flight)", part == Part::kData ? "put" : "signal", op.hdr.src_rank,
         (unsigned long long)op.hdr.seq, (unsigned long long)id);
    return false;
  }
  if (part == Part::kData) return copy_in(*it->second, op.hdr.dst_off, op.hdr.size, op.data.data());
  uint64_t add = op.hdr.sig_op == kSignalOpInc ? 1 : op.hdr.sig_value;
  return signal_add(*it->second, op.hdr.sig_off, add);
}

// Moves bytes both ways and applies what the ordering engines release. Caller holds g_mu.
bool progress_locked(CollComm* c) {
  uint64_t now = now_ns();
  for (int r = 0; r < c->nranks; ++r) {
    Peer& p = c->peers[r];
    if (!p.outq.empty() && !write_some(p.out_fd, p.outq)) {
      WARN("GIN: stream to rank %d failed: %s", r, strerror(errno));
      c->error = true;
    }
    if (!p.closed) {
      bool eof = false;
      if (!read_some(p.in_fd, p.inbuf, &eof)) p.closed = true;  // a peer that closes is not an error by itself
    }
    size_t pos = 0;
    while (p.inbuf.size() - pos >= sizeof(WireHdr)) {
      WireHdr h;
      memcpy(&h, p.inbuf.data() + pos, sizeof h);
      if (h.magic != kWireMagic) { WARN("GIN: corrupt stream from rank %d", r); c->error = true; return false; }
      if (p.inbuf.size() - pos < sizeof h + h.size) break;
      WireOp op;
      op.hdr = h;
      op.data.assign(p.inbuf.begin() + pos + sizeof h, p.inbuf.begin() + pos + sizeof h + h.size);
      pos += sizeof h + h.size;
      p.stalled.push_back(std::move(op));
    }
    if (pos) p.inbuf.erase(p.inbuf.begin(), p.inbuf.begin() + pos);
    while (!p.stalled.empty() && known(c, p.stalled.front().hdr.win_id) && known(c, p.stalled.front().hdr.sig_win_id)) {
      bool sig = p.stalled.front().hdr.has_signal != 0;
      p.engine->push(std::move(p.stalled.front()), sig, now);
      p.stalled.pop_front();
    }
    for (auto& a : p.engine->poll(now)) {
      if (!apply(c, *a.op, a.part)) { c->error = true; return false; }
    }
  }
  return !c->error;
}

ncclResult_t post(CollComm* c, uint64_t src_off, void* src_mh, size_t size, uint64_t dst_off, void* dst_mh,
                  uint32_t rank, bool has_signal, uint64_t sig_off, void* sig_mh, uint64_t sig_value,
                  uint32_t sig_op, void** request) {
  std::lock_guard<std::mutex> g(g_mu);
  if (rank >= (uint32_t)c->nranks) return ncclInvalidArgument;
  Peer& p = c->peers[rank];
  WireHdr h{};
  h.magic = kWireMagic;
  h.has_signal = has_signal;
  h.seq = p.next_seq++;
  h.win_id = (size && dst_mh) ? ((Region*)dst_mh)->id : kNoWindow;
  h.dst_off = dst_off;
  h.size = size;
  h.sig_win_id = has_signal ? ((Region*)sig_mh)->id : kNoWindow;
  h.sig_off = sig_off;
  h.sig_value = sig_value;
  h.sig_op = sig_op;
  h.src_rank = (uint32_t)c->rank;
  if (size && (!src_mh || !dst_mh)) return ncclInvalidArgument;
  std::vector<char> bytes(sizeof h + size);
  memcpy(bytes.data(), &h, sizeof h);
  if (size && !copy_out(*(Region*)src_mh, src_off, size, bytes.data() + sizeof h)) return ncclSystemError;
  p.outq.insert(p.outq.end(), bytes.begin(), bytes.end());
  // Local completion (source reusable) is true now; in adversarial mode it is reported late.
  uint64_t delay = 0;
  const Config& cfg = config();
  if (cfg.adversarial && cfg.completion_delay_ns)
    delay = std::uniform_int_distribution<uint64_t>(0, cfg.completion_delay_ns)(c->rng);
  *request = new GinReq{now_ns() + delay};
  return progress_locked(c) ? ncclSuccess : ncclRemoteError;
}

ncclResult_t gin_iput(void* cv, uint64_t so, void* smh, size_t size, uint64_t doff, void* dmh, uint32_t rank, void** req) {
  return post((CollComm*)cv, so, smh, size, doff, dmh, rank, false, 0, nullptr, 0, 0, req);
}
ncclResult_t gin_iput_signal(void* cv, uint64_t so, void* smh, size_t size, uint64_t doff, void* dmh, uint32_t rank,
                             uint64_t sig_off, void* sig_mh, uint64_t sig_value, uint32_t sig_op, void** req) {
  if (sig_op != kSignalOpInc && sig_op != kSignalOpAdd) return ncclInvalidArgument;
  if (!sig_mh) return ncclInvalidArgument;
  return post((CollComm*)cv, so, smh, size, doff, dmh, rank, true, sig_off, sig_mh, sig_value, sig_op, req);
}
ncclResult_t gin_test(void* cv, void* request, int* done) {
  std::lock_guard<std::mutex> g(g_mu);
  auto* c = (CollComm*)cv;
  auto* r = (GinReq*)request;
  *done = 0;
  if (!progress_locked(c)) return ncclRemoteError;
  if (now_ns() >= r->done_at_ns) {
    *done = 1;
    delete r;
  }
  return ncclSuccess;
}
ncclResult_t gin_progress(void* cv) {
  std::lock_guard<std::mutex> g(g_mu);
  return progress_locked((CollComm*)cv) ? ncclSuccess : ncclRemoteError;
}
ncclResult_t gin_query_last_error(void* ctx, bool* has_error) {
  auto* x = (GinCtx*)ctx;
  *has_error = x && x->comm && x->comm->error;
  return ncclSuccess;
}
ncclResult_t gin_close_coll(void* cv) {
  std::lock_guard<std::mutex> g(g_mu);
  auto* c = (CollComm*)cv;
  if (!c) return ncclSuccess;
  // Push out what is queued (bounded), apply what arrived, then close.
  uint64_t deadline = now_ns() + 2000000000ull;
  for (;;) {
    bool pending = false;
    for (auto& p : c->peers) pending |= !p.outq.empty();
    if (!pending || now_ns() > deadline) break;
    progress_locked(c);
    usleep(100);
  }
  progress_locked(c);
  for (int r = 0; r < c->nranks; ++r) {
    Peer& p = c->peers[r];
    for (auto& a : p.engine->drain()) apply(c, *a.op, a.part);
    if (p.out_fd >= 0) close(p.out_fd);
    if (p.in_fd >= 0) close(p.in_fd);
  }
  for (auto& kv : c->windows) delete kv.second;
  delete c;
  return ncclSuccess;
}
ncclResult_t gin_finalize(void*) { return ncclSuccess; }

}  // namespace

extern "C" {
__attribute__((visibility("default"))) Net ncclNetPlugin_v11 = {
    g_net_name, net_init, net_devices, net_props, net_listen, net_connect, net_accept, net_regmr,
    net_regmr_dmabuf, net_deregmr, net_isend, net_irecv, net_iflush, net_test, net_close, net_close,
    net_close_listen, net_get_device_mr, net_irecv_consumed, net_make_vdevice, net_finalize, net_set_attr};

__attribute__((visibility("default"))) Gin ncclGinPlugin_v11 = {
    g_net_name, gin_init, net_devices, gin_props, gin_listen, gin_connect, gin_create_context, gin_regmr,
    gin_regmr_dmabuf, gin_deregmr, gin_destroy_context, gin_close_coll, net_close_listen, gin_iput,
    gin_iput_signal, gin_test, gin_progress, gin_query_last_error, gin_finalize};
}
