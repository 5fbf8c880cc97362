// Block layout of DALL-E's sparse attention masks, built on the host once per mask and cached on
// the device by the CUDA kernels (no ATen, no CUDA: tests compile this header alone with g++).
//
// The kernels tile the sequence in kTile x kTile blocks of (query, key) pairs and visit only the
// blocks that hold an allowed pair. A block is "full" when all kTile*kTile pairs are in range and
// allowed (no element mask needed) and "partial" otherwise (the kernel reads a bit mask of the tile
// precomputed here, so no mask arithmetic runs on the device). Column attention tiles the image in
// column-major order (the paper's "transposed grid") so that a column's keys are contiguous: the
// kernels work on logical positions and map them to physical (raster) rows with SeqPerm; the
// result is the same, only the tiling changes.
#pragma once
#include "dalle_fast/attention_mask.h"

#include <cstdint>
#include <vector>

namespace dalle_fast {

constexpr int kSparseAttentionTile = 64;

// The CUDA kernels are compiled for these head-dim tiles only; a head dim d runs in the smallest
// tile >= d with the columns past d zero-padded in shared memory (exact: zeros add nothing to
// q.k and give zero output columns, which are not stored). A head dim that is not a multiple of 8
// is first padded to one on the host (a copy). Few tiles keep the CUDA build time flat.
constexpr int kSparseAttentionHeadDimTiles[] = {64, 128, 256};
constexpr int kSparseAttentionMaxCudaHeadDim = 256;
constexpr int kSparseAttentionCudaHeadDimAlign = 8;  // 16-byte rows for fp16/bf16 (cp.async)

// The tile the CUDA kernels run head dim d in (0 when d is out of range).
inline int sparse_attention_head_dim_tile(int d) {
  for (int t : kSparseAttentionHeadDimTiles)
    if (d >= 1 && d <= t) return t;
  return 0;
}

// Logical position <-> physical row. Text positions are unchanged; with `transposed` the image
// grid is visited column by column.
struct SeqPerm {
  int text_len;
  int image_size;
  bool transposed;

  DF_HOST_DEVICE int phys(int l) const {
    if (!transposed || l < text_len) return l;
    const int p = l - text_len;  // p = c * S + r
    return text_len + (p % image_size) * image_size + p / image_size;
  }
  DF_HOST_DEVICE int logical(int i) const {
    if (!transposed || i < text_len) return i;
    const int p = i - text_len;  // p = r * S + c
    return text_len + (p % image_size) * image_size + p / image_size;
  }
};

inline SeqPerm seq_perm_for(const MaskSpec& spec) {
  return SeqPerm{spec.text_len, spec.image_size, spec.kind == MaskKind::Column && spec.image_size > 1};
}

// CSR lists in one int32 array: for each query tile the key tiles it visits, and for each key tile
// the query tiles that attend it (the backward's dK/dV pass). An entry is two int32: the tile and
// the slot of its element mask in `masks`, or -1 for a full tile.
// A slot holds 2 * tile uint64 words (tile == 64): word r (r < 64) has bit c set iff logical
// query q0 + r may attend logical key k0 + c; word 64 + c has bit r set under the same condition
// (the transpose, for the backward's key-major pass). Out-of-range pairs are never set, so the
// kernels need no bounds test and no mask arithmetic on partial tiles.
struct BlockLayout {
  int n_tiles = 0;
  int fwd_ptr = 0, fwd_idx = 0, bwd_ptr = 0, bwd_idx = 0;  // offsets into data
  std::vector<int32_t> data;
  std::vector<uint64_t> masks;
};

// O(allowed pairs) to find the nonzero tiles (each query's allowed keys come from
// MaskSpec::allowed_key), then MaskSpec::allowed on every pair of the partial tiles only.
inline BlockLayout build_block_layout(const MaskSpec& spec) {
  constexpr int tile = kSparseAttentionTile;
  static_assert(tile == 64, "a mask word holds one 64-wide row of a tile");
  const int N = spec.seq_len();
  const int nt = (N + tile - 1) / tile;
  const SeqPerm perm = seq_perm_for(spec);
  std::vector<int32_t> counts(static_cast<size_t>(nt) * nt, 0);
  for (int i = 0; i < N; ++i) {
    const int pi = perm.phys(i);
    const int n_keys = spec.allowed_count(pi);
    int32_t* row = counts.data() + static_cast<size_t>(i / tile) * nt;
    for (int n = 0; n < n_keys; ++n) row[perm.logical(spec.allowed_key(pi, n)) / tile] += 1;
  }
  BlockLayout out;
  out.n_tiles = nt;
  std::vector<int32_t> slot(static_cast<size_t>(nt) * nt, -1);
  int n_partial = 0;
  for (int qt = 0; qt < nt; ++qt) {
    for (int kt = 0; kt < nt; ++kt) {
      const int32_t c = counts[static_cast<size_t>(qt) * nt + kt];
      if (c == 0 || c == tile * tile) continue;
      slot[static_cast<size_t>(qt) * nt + kt] = n_partial++;
      out.masks.resize(static_cast<size_t>(n_partial) * 2 * tile, 0);
      uint64_t* w = out.masks.data() + static_cast<size_t>(n_partial - 1) * 2 * tile;
      for (int r = 0; r < tile && qt * tile + r < N; ++r) {
        const int pi = perm.phys(qt * tile + r);
        for (int cc = 0; cc < tile && kt * tile + cc < N; ++cc) {
          if (spec.allowed(pi, perm.phys(kt * tile + cc))) {
            w[r] |= uint64_t{1} << cc;
            w[tile + cc] |= uint64_t{1} << r;
          }
        }
      }
    }
  }
  std::vector<int32_t> fwd_ptr(nt + 1, 0), bwd_ptr(nt + 1, 0), fwd, bwd;
  for (int qt = 0; qt < nt; ++qt) {
    for (int kt = 0; kt < nt; ++kt) {
      if (counts[static_cast<size_t>(qt) * nt + kt] == 0) continue;
      fwd.push_back(kt);
      fwd.push_back(slot[static_cast<size_t>(qt) * nt + kt]);
    }
    fwd_ptr[qt + 1] = static_cast<int32_t>(fwd.size() / 2);
  }
  for (int kt = 0; kt < nt; ++kt) {
    for (int qt = 0; qt < nt; ++qt) {
      if (counts[static_cast<size_t>(qt) * nt + kt] == 0) continue;
      bwd.push_back(qt);
      bwd.push_back(slot[static_cast<size_t>(qt) * nt + kt]);
    }
    bwd_ptr[kt + 1] = static_cast<int32_t>(bwd.size() / 2);
  }
  out.fwd_ptr = 0;
  out.fwd_idx = nt + 1;
  out.bwd_ptr = out.fwd_idx + static_cast<int>(fwd.size());
  out.bwd_idx = out.bwd_ptr + nt + 1;
  out.data.reserve(out.bwd_idx + bwd.size());
  out.data.insert(out.data.end(), fwd_ptr.begin(), fwd_ptr.end());
  out.data.insert(out.data.end(), fwd.begin(), fwd.end());
  out.data.insert(out.data.end(), bwd_ptr.begin(), bwd_ptr.end());
  out.data.insert(out.data.end(), bwd.begin(), bwd.end());
  if (out.masks.empty()) out.masks.assign(1, 0);  // never read; keeps the device buffer non-empty
  return out;
}

}  // namespace dalle_fast
