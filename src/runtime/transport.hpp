// Transport policy: which engine a Buffer's kernels talk through, decided once at Buffer creation from
// facts the host already has (no probing of the communicator; see nccl-device-api.md section 4).
//
//   kNvlink  every rank is in this rank's NVLink domain (NCCL's LSA team): peer pointers, no network.
//            GIN is never requested: asking for it on a single node fails and poisons the communicator.
//   kGin     the Group spans several NVLink domains, the caller opted in (BufferOptions::allow_network)
//            and the Buffer is in low-latency mode: the low-latency kernels move data with NCCL GIN puts
//            and signals (src/kernels/low_latency_gin.cu).
//
//   kHostP2p the Group spans several NVLink domains and the Buffer is in normal mode with num_rdma_bytes > 0:
//            internode normal mode, NVLink inside a node and host-enqueued NCCL p2p between rail peers
//            (runtime/rail.hpp); runs on any network NCCL runs on. No opt-in is needed (DeepEP's behaviour).
//   kInternodeGin the same internode normal mode, same protocol and kernels, but the rail's network leg is
//            device-initiated (NCCL GIN put + signal, runtime/internode_gin.hpp). Only when the caller sets
//            BufferOptions::internode_backend = kGin; never chosen automatically. Loopback plugin only (below).
//
// NOT YET RUN ON A REAL NETWORK (no RDMA NICs on the test machines: no InfiniBand/RoCE, GDAKI, real NIC ordering or
// speed). kGin and kInternodeGin have run only under the loopback GIN test plugin (tests/gin_loopback: a GIN proxy
// network emulated over Unix sockets on one host) in fake-node worlds on one H200 (2026-12-02), 2 and 4 nodes with
// one rank per node, bitwise against the CPU reference; never with several ranks per node on GIN (needs 2+ GPUs).
// Their policy is unit-tested on the CPU. kHostP2p has run over NCCL's socket transport between fake nodes
// (docs/fake-nodes.md), never over InfiniBand/RoCE/EFA.
#pragma once

#include <cstddef>
#include <string>

#include <nccl.h>
#include <nccl_device.h>

#include "protocol/internode_gin_layout.hpp"
#include "protocol/limits.hpp"
#include "protocol/low_latency_gin_layout.hpp"

namespace openep::detail {

enum class Transport : int { kNvlink = 0, kGin = 1, kHostP2p = 2, kInternodeGin = 3 };

// Internode normal mode, whichever backend drives its rail.
constexpr bool is_internode(Transport t) { return t == Transport::kHostP2p || t == Transport::kInternodeGin; }

const char* transport_name(Transport t);

// What the policy looks at. All of it is known on the host before the device communicator exists.
struct TransportQuery {
  int num_ranks = 0;          // ranks in the Group
  int num_nvlink_ranks = 0;   // ranks in this rank's NVLink (LSA) team; 0 = NCCL has no symmetric memory
  bool low_latency_mode = false;
  bool allow_network = false; // BufferOptions::allow_network
  size_t num_nvl_bytes = 0;   // BufferOptions::num_nvl_bytes (normal-mode region; must be 0 for kGin)
  size_t num_rdma_bytes = 0;  // BufferOptions::num_rdma_bytes (low-latency region)
  bool internode_gin = false; // BufferOptions::internode_backend == InternodeBackend::kGin
};

// Pure function: returns the transport, or throws openep::Error (kUnsupported / kInvalidArgument) whose
// message names the option or field to change. A single-node Group always gets kNvlink, whatever
// allow_network says. Does not check num_nvlink_ranks > 0 (the Buffer checks that first, unchanged).
Transport select_transport(const TransportQuery& q);

// The communicators a Buffer may create a device communicator on: the Group's (one NVLink domain, or the
// low-latency network path), an internode Buffer's node communicator, and its rail communicator.
enum class CommRole : int { kGroup = 0, kNode = 1, kRail = 2 };

// Whether the device communicator a Buffer of transport `t` creates on `role` asks for GIN. True only for the
// Group's communicator under kGin (low latency, allow_network) and the rail communicator under kInternodeGin:
// NCCL turns GIN on by itself for a multi-node communicator and, without GIN NICs, fails and poisons it
// (internode.md trap 1), so an internode Buffer's Group and node communicators never get a GIN request, and the
// host-driven rail gets no device communicator at all. Buffer creation routes every such decision through here.
bool requests_gin(Transport t, CommRole role);

// The device-communicator requirements of a kGin Buffer: user signals only (GIN turns on through them and
// through the multi-node Group); no counters, no multimem, no LSA barriers (the kernels do not use them).
// Every rank builds the same struct (NCCL assumes identical requirements on all ranks).
ncclDevCommRequirements gin_dev_comm_requirements(int num_ranks);

// The BufferOptions setting that asks for the internode GIN rail, and what its errors advise.
inline constexpr const char* kInternodeGinOption = "BufferOptions::internode_backend = kGin";
inline constexpr const char* kInternodeGinRemedy =
    ". The rail communicator is aborted; the Group's communicator was not touched. Leave internode_backend at "
    "kHostP2p (host-driven NCCL p2p, runs on any network)";

// The kUnsupported message when ncclDevCommCreate refuses GIN: names `option`, NCCL's error and reason, what is
// missing (RDMA NICs NCCL drives with GIN) and ends with `remedy`. Pure (CPU-tested).
std::string gin_unavailable_message(const char* option, const char* nccl_error, const char* nccl_reason,
                                    const char* remedy);

// The rail communicator's device-communicator requirements under kInternodeGin: GinRailSignals::count(num_nodes)
// user signals (which, with the multi-node rail, turn GIN on), nothing else. Identical on every rank.
ncclDevCommRequirements gin_rail_dev_comm_requirements(int num_nodes);

}  // namespace openep::detail
