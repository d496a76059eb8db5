// Plain value types shared by the public API.
#pragma once

#include <cstddef>
#include <cstdint>

namespace openep {

// Element type of topk_idx tensors (DeepEP's topk_idx_t is int64 by default; int32 is accepted too).
enum class IndexType : int { kInt64 = 0, kInt32 = 1 };

inline constexpr size_t index_type_bytes(IndexType t) { return t == IndexType::kInt64 ? 8 : 4; }

// Largest supported values (validated on the host before any launch).
inline constexpr int kMaxRanks = 256;        // ranks in one Group (layout, validation)
inline constexpr int kMaxRanksInGroup = 4096; // ranks an NCCL Group may have
inline constexpr int kMaxTopk = 128;         // columns of topk_idx accepted by get_dispatch_layout
inline constexpr int kMaxExperts = 8192;     // total experts accepted by get_dispatch_layout

}  // namespace openep
