// Own declarations of the NCCL net/GIN plugin ABI, version 11, as used by NCCL 2.28.9.
// They mirror the layout documented in NCCL v2.28.9 src/include/plugin/net/net_v11.h (ncclNet_v11_t,
// ncclNetProperties_v11_t, ncclGin_v11_t), src/include/plugin/nccl_net.h (constants),
// src/include/nccl_common.h (logger/profiler callback types) and src/include/nccl_device/net_device.h
// (ncclNetDeviceType, ncclNetDeviceHandle_v11_t). Written from those interface descriptions; field order and
// types must stay exactly as there, because NCCL dlsym()s "ncclNetPlugin_v11" / "ncclGinPlugin_v11" and reads
// the structs by layout. Only ncclResult_t comes from the toolkit's public nccl.h.
#pragma once
#include <nccl.h>
#include <stddef.h>
#include <stdint.h>

namespace openep_gin_lb_abi {

enum LogLevel { kLogNone = 0, kLogVersion = 1, kLogWarn = 2, kLogInfo = 3, kLogAbort = 4, kLogTrace = 5 };
constexpr unsigned long kLogSubsysNet = 0x10;  // NCCL_NET
typedef void (*DebugLogger)(int level, unsigned long flags, const char* file, int line, const char* fmt, ...);
typedef ncclResult_t (*ProfilerCallback)(void** eHandle, int type, void* pHandle, int64_t pluginId, void* extData);

constexpr int kNetHandleMaxSize = 128;   // NCCL_NET_HANDLE_MAXSIZE
constexpr int kPtrHost = 0x1;            // NCCL_PTR_HOST
constexpr int kPtrCuda = 0x2;            // NCCL_PTR_CUDA
constexpr int kPtrDmaBuf = 0x4;          // NCCL_PTR_DMABUF
constexpr uint64_t kMrFlagForceSo = 1;   // NCCL_NET_MR_FLAG_FORCE_SO
constexpr uint32_t kSignalOpInc = 0x1;   // NCCL_NET_SIGNAL_OP_INC
constexpr uint32_t kSignalOpAdd = 0x2;   // NCCL_NET_SIGNAL_OP_ADD
constexpr int kNetMaxRequests = 32;      // NCCL_NET_MAX_REQUESTS
constexpr int kMaxDevsPerNic = 4;        // NCCL_NET_MAX_DEVS_PER_NIC
constexpr size_t kMaxNetSizeBytes = 1ull << 40;   // NCCL_MAX_NET_SIZE_BYTES
constexpr size_t kMaxCollNetSize = 512ull << 20;  // MAX_COLLNET_SIZE

enum NetDeviceType { kDeviceHost = 0, kDeviceUnpack = 1, kDeviceGinProxy = 2, kDeviceGinGdaki = 3 };

struct NetDeviceHandle {  // ncclNetDeviceHandle_v11_t (== v7)
  int netDeviceType;
  int netDeviceVersion;
  void* handle;
  size_t size;
  int needsProxyProgress;
};

struct NetVDeviceProps {  // ncclNetVDeviceProps_v11_t
  int ndevs;
  int devs[kMaxDevsPerNic];
};

struct NetCommConfig {  // ncclNetCommConfig_v11_t
  int trafficClass;
};

struct NetProperties {  // ncclNetProperties_v11_t
  char* name;
  char* pciPath;
  uint64_t guid;
  int ptrSupport;
  int regIsGlobal;
  int forceFlush;
  int speed;
  int port;
  float latency;
  int maxComms;
  int maxRecvs;
  int netDeviceType;  // ncclNetDeviceType (an int-sized enum)
  int netDeviceVersion;
  NetVDeviceProps vProps;
  size_t maxP2pBytes;
  size_t maxCollBytes;
  int maxMultiRequestSize;
};

struct NetCommAttr { int32_t maxConcurrentPeers, minConcurrentPeers, maxFlowsPerPeer, minFlowsPerPeer; };
struct NetAttr { NetCommAttr sendCommAttr, recvCommAttr; uint32_t op, algo, proto; };

struct Net {  // ncclNet_v11_t
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, NetCommConfig* config, DebugLogger log, ProfilerCallback prof);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, NetProperties* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, int dev, void* handle, void** sendComm, NetDeviceHandle** sendDevComm);
  ncclResult_t (*accept)(void* listenComm, void** recvComm, NetDeviceHandle** recvDevComm);
  ncclResult_t (*regMr)(void* comm, void* data, size_t size, int type, void** mhandle);
  ncclResult_t (*regMrDmaBuf)(void* comm, void* data, size_t size, int type, uint64_t offset, int fd, void** mhandle);
  ncclResult_t (*deregMr)(void* comm, void* mhandle);
  ncclResult_t (*isend)(void* sendComm, void* data, size_t size, int tag, void* mhandle, void* phandle, void** request);
  ncclResult_t (*irecv)(void* recvComm, int n, void** data, size_t* sizes, int* tags, void** mhandles, void** phandles,
                        void** request);
  ncclResult_t (*iflush)(void* recvComm, int n, void** data, int* sizes, void** mhandles, void** request);
  ncclResult_t (*test)(void* request, int* done, int* sizes);
  ncclResult_t (*closeSend)(void* sendComm);
  ncclResult_t (*closeRecv)(void* recvComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*getDeviceMr)(void* comm, void* mhandle, void** dptr_mhandle);
  ncclResult_t (*irecvConsumed)(void* recvComm, int n, void* request);
  ncclResult_t (*makeVDevice)(int* d, NetVDeviceProps* props);
  ncclResult_t (*finalize)(void* ctx);
  ncclResult_t (*setNetAttr)(void* ctx, NetAttr* netAttr);
};

struct Gin {  // ncclGin_v11_t
  const char* name;
  ncclResult_t (*init)(void** ctx, uint64_t commId, DebugLogger log);
  ncclResult_t (*devices)(int* ndev);
  ncclResult_t (*getProperties)(int dev, NetProperties* props);
  ncclResult_t (*listen)(void* ctx, int dev, void* handle, void** listenComm);
  ncclResult_t (*connect)(void* ctx, void* handles[], int nranks, int rank, void* listenComm, void** collComm);
  ncclResult_t (*createContext)(void* collComm, int nSignals, int nCounters, void** ginCtx, NetDeviceHandle** devHandle);
  ncclResult_t (*regMrSym)(void* collComm, void* data, size_t size, int type, uint64_t mrFlags, void** mhandle,
                           void** ginHandle);
  ncclResult_t (*regMrSymDmaBuf)(void* collComm, void* data, size_t size, int type, uint64_t offset, int fd,
                                 uint64_t mrFlags, void** mhandle, void** ginHandle);
  ncclResult_t (*deregMrSym)(void* collComm, void* mhandle);
  ncclResult_t (*destroyContext)(void* ginCtx);
  ncclResult_t (*closeColl)(void* collComm);
  ncclResult_t (*closeListen)(void* listenComm);
  ncclResult_t (*iput)(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size, uint64_t dstOff,
                       void* dstMhandle, uint32_t rank, void** request);
  ncclResult_t (*iputSignal)(void* collComm, uint64_t srcOff, void* srcMhandle, size_t size, uint64_t dstOff,
                             void* dstMhandle, uint32_t rank, uint64_t signalOff, void* signalMhandle,
                             uint64_t signalValue, uint32_t signalOp, void** request);
  ncclResult_t (*test)(void* collComm, void* request, int* done);
  ncclResult_t (*ginProgress)(void* collComm);
  ncclResult_t (*queryLastError)(void* ginCtx, bool* hasError);
  ncclResult_t (*finalize)(void* ctx);
};

}  // namespace openep_gin_lb_abi
