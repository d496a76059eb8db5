// All inline PTX of OpenEP lives here (namespace openep::ptx). One wrapper per instruction variant, named by
// semantics and scope. libcu++ is used where it compiles to the same instruction.
#pragma once

#include <cuda/atomic>
#include <cstdint>

namespace openep::ptx {

// ld.acquire.sys.global.u64 (PTX ISA "ld", memory consistency model). Pairs with red_add_release_sys /
// st_release_sys on another GPU writing into our memory.
__device__ __forceinline__ uint64_t ld_acquire_sys(const uint64_t* ptr) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(ptr) : "memory");
  return v;
}

__device__ __forceinline__ int32_t ld_acquire_sys(const int32_t* ptr) {
  int32_t v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// ld.volatile.global (no ordering): used to poll the host-mapped error slot.
__device__ __forceinline__ int32_t ld_volatile(const int32_t* ptr) {
  int32_t v;
  asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(v) : "l"(ptr) : "memory");
  return v;
}

// red.release.sys.global.add.u64 (PTX ISA "red"). Publishes this thread's (and, after a CTA barrier, the
// CTA's) earlier writes to a peer GPU; pairs with ld_acquire_sys on the peer.
__device__ __forceinline__ void red_add_release_sys(uint64_t* ptr, uint64_t v) {
  asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

// st.release.sys.global.s32 (PTX ISA "st").
__device__ __forceinline__ void st_release_sys(int32_t* ptr, int32_t v) {
  asm volatile("st.release.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

// st.relaxed.sys.global.s32: plain system-scope store for flags whose ordering comes from elsewhere.
__device__ __forceinline__ void st_relaxed_sys(int32_t* ptr, int32_t v) {
  asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

// %globaltimer: nanoseconds, comparable across SMs of one GPU (PTX ISA special registers).
__device__ __forceinline__ uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// fence.acq_rel.sys (PTX ISA "membar/fence").
__device__ __forceinline__ void fence_acq_rel_sys() { asm volatile("fence.acq_rel.sys;" ::: "memory"); }

}  // namespace openep::ptx

namespace openep::ptx {

// st.release.sys.global.u64: publishes a flag (op epoch) after the CTA's payload stores; the CTA barrier
// before it plus release cumulativity carry every thread's writes. Pairs with ld_acquire_sys in wait_geq.
__device__ __forceinline__ void st_release_sys(uint64_t* ptr, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(ptr), "l"(v) : "memory");
}

// ld.global.nc.L1::no_allocate.v4: streaming read of caller input that no one writes during the kernel.
__device__ __forceinline__ int4 ld_nc_no_allocate(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

// ld.global.cg.v4: read data a peer wrote into our window (after an acquire); bypasses L1, so no stale line
// from an earlier operation can be hit.
__device__ __forceinline__ int4 ld_cg(const int4* ptr) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr));
  return v;
}

__device__ __forceinline__ int32_t ld_cg(const int32_t* ptr) {
  int32_t v;
  asm volatile("ld.global.cg.s32 %0, [%1];" : "=r"(v) : "l"(ptr));
  return v;
}

// ld.global.cg.v2: as ld_cg above, 8 bytes (the low plane of a LogFMT group).
__device__ __forceinline__ int2 ld_cg(const int2* ptr) {
  int2 v;
  asm volatile("ld.global.cg.v2.s32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(ptr));
  return v;
}

// st.global.L1::no_allocate.s32: as st_no_allocate below, 4 bytes (LogFMT metadata words).
__device__ __forceinline__ void st_no_allocate(int32_t* ptr, int32_t v) {
  asm volatile("st.global.L1::no_allocate.s32 [%0], %1;" ::"l"(ptr), "r"(v) : "memory");
}

// st.global.L1::no_allocate.v4: streaming store (local outputs or a peer's window through an LSA pointer).
__device__ __forceinline__ void st_no_allocate(int4* ptr, const int4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

}  // namespace openep::ptx

namespace openep::ptx {

// atom.acq_rel.sys.global.add.u32: a block's completion ticket. Release: the block's earlier writes (to any
// GPU; after a CTA barrier) are published; acquire: the last arriver sees every block's writes.
__device__ __forceinline__ uint32_t atom_add_acq_rel_sys(uint32_t* ptr, uint32_t v) {
  uint32_t old;
  asm volatile("atom.acq_rel.sys.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(v) : "memory");
  return old;
}

// bar.sync id, n: barrier among the n threads (a multiple of 32) of a warp group that use barrier `id`
// (1..15; 0 is __syncthreads). Orders memory like __syncthreads among the participants.
__device__ __forceinline__ void bar_sync(int id, int num_threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(num_threads) : "memory");
}

}  // namespace openep::ptx

namespace openep::ptx {

// atom.acq_rel.gpu.global.add.u32: a completion ticket whose last arriver only needs this GPU's writes.
__device__ __forceinline__ uint32_t atom_add_acq_rel_gpu(uint32_t* ptr, uint32_t v) {
  uint32_t old;
  asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(old) : "l"(ptr), "r"(v) : "memory");
  return old;
}

}  // namespace openep::ptx
