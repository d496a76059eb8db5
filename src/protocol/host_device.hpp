// OPENEP_HOST_DEVICE: marks small functions of the protocol headers callable from host and device code.
#pragma once

#if defined(__CUDACC__)
#define OPENEP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define OPENEP_HOST_DEVICE inline
#endif
