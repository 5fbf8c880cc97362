// Internal interfaces of the CPU sparse attention kernels, one file per concern:
//   sparse_attention_cpu_layout.cpp  query blocks and their key segments, built once per mask and cached
//   sparse_attention_cpu_tiles.cpp   fp32/fp64 tiles on the BLAS (fp16, and bf16 without bf16 GEMM units, upcast)
//   sparse_attention_cpu_bf16.cpp    bf16 tiles on the bf16 GEMM units (cpublas::brgemm)
//   sparse_attention_cpu_decode.cpp  the cached decode step
//   sparse_attention_cpu.cpp         the op entries (after the shared boundary checks) and their registration
//
// Work is cut into query blocks (a few dozen queries that need nearly the same keys: a raster run
// for row/full, one image row for conv, one image column for column attention, so column attention
// needs no transposed copy: a column is a matrix with leading dimension W*D). A block's key set is
// the union of its queries' allowed keys, stored as a few strided segments that GEMM reads in place,
// plus a byte mask for the segments where some pair is not allowed. Layouts are built once per
// (kind, text_len, image_size, conv_kernel, block) from MaskSpec and cached.
// Each block holds its whole score row (block x allowed keys, never N x N), so the softmax is exact
// in one pass and no online rescaling is needed.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "dalle_fast/attention_mask.h"

namespace dalle_fast {
namespace sparse_cpu {

// ---------------------------------------------------------------- block layout (sparse_attention_cpu_layout.cpp)
struct Segment {
  int k0, len, stride;  // keys k0, k0 + stride, ..., (len of them)
  int col;              // first column in the block's score row
  int64_t mask_off;     // into Layout::masks ([block rows][len] bytes), or -1: every pair allowed
};
struct QueryBlock {
  int q0, len, stride;  // queries q0, q0 + stride, ...
  int seg_begin, seg_end, ncols;
};
struct Layout {
  std::vector<QueryBlock> blocks;
  std::vector<Segment> segs;
  std::vector<uint8_t> masks;
  int max_cols = 0, max_rows = 0;
  int64_t pairs = 0;  // score elements over all blocks: the work per (batch, head)
};


// The cached layout of a mask (block rows from DALLE_FAST_SPARSE_BLOCK, default 64).
std::shared_ptr<const Layout> get_layout(const MaskSpec& ms);

// Query-block groups per (batch, head) in the backward: > 1 only when there are too few heads to
// keep every thread busy; each group then owns its dK/dV accumulators.
int64_t key_groups(int64_t BH, int64_t nb);

// Run fn(task, scratch) for tasks 0..n-1, dealt cyclically to threads (parallel_for hands out
// contiguous chunks, and neighbouring tasks cost alike: text blocks are cheap, image blocks dear).
// make_scratch() runs once per thread. Small problems (`work` multiply-adds) stay on the calling
// thread: waking a team costs more than they do, and far more on an oversubscribed machine.
constexpr int64_t kSerialWork = 1 << 18;
template <typename Init, typename F>
void parallel_cyclic(int64_t n, int64_t work, const Init& make_scratch, const F& fn) {
  const int64_t p = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, p, work < kSerialWork ? p : 1, [&](int64_t b, int64_t e) {
    auto scratch = make_scratch();
    for (int64_t t = b; t < e; ++t)
      for (int64_t i = t; i < n; i += p) fn(i, scratch);
  });
}


// ---------------------------------------------------------------- fp32/fp64 tiles (sparse_attention_cpu_tiles.cpp)
// Contiguous q, k, v (B, heads, N, D) of float or double; out like q, lse (B, heads, N) of that type.
void forward_tiles(const Layout& L, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                   at::Tensor& lse, double scale);
// Contiguous inputs of one type; dk, dv zeroed, (B*heads*G, N, D) when G > 1 (summed by the caller).
void backward_tiles(const Layout& L, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                    at::Tensor& dv, int64_t G, double scale);

// ---------------------------------------------------------------- bf16 tiles (sparse_attention_cpu_bf16.cpp)
// bf16 with an even head dim on a CPU with bf16 brgemm (DALLE_FAST_SPARSE_BF16_GEMM=0 disables it).
bool use_bf16_tiles(const at::Tensor& q);
std::tuple<at::Tensor, at::Tensor> forward_bf16(const MaskSpec& ms, const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_bf16(const MaskSpec& ms, const at::Tensor& grad_out,
                                                             const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& out,
                                                             const at::Tensor& lse, double scale);

// ---------------------------------------------------------------- decode (sparse_attention_cpu_decode.cpp)
// Arguments already checked (check_sparse_attention_decode).
at::Tensor decode(const MaskSpec& ms, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  int64_t position, double scale);

}  // namespace sparse_cpu
}  // namespace dalle_fast
