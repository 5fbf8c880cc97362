// Backward kernels of sparse_attention. With P = exp(S * scale - lse) (from the forward's lse),
// dP = dO V^T, delta = rowsum(dO * O) and dS = P * (dP - delta):
//   dQ = scale * dS K   -- one block per query tile, over the forward layout      (dq kernels)
//   dV = P^T dO, dK = scale * dS^T Q -- one block per key tile, over the transposed layout (dkdv)
// Two passes that each recompute P (7 instead of 5 matmuls) but need no atomics: deterministic,
// and no fp32 dQ buffer. fp16/bf16 use tensor cores (mma.sync m16n8k16, the same fragment reuse as
// the forward); fp32/fp64 a SIMT path with 8-32 threads per row (SimtShape), exact in the
// input precision. Templates over the head-dim tile D (p.d <= D); the tensor-core kernels write
// DO = min(D, 128) output columns per block (blockIdx.y picks which), so the 256 tile keeps the
// accumulators of the 128 tile and recomputes S and dP once per column half instead of spilling.
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>

#include "dalle_fast/sparse_attention_cuda.cuh"

namespace dalle_fast {
template <> struct DeviceScalar<c10::Half> { using type = __half; };
template <> struct DeviceScalar<c10::BFloat16> { using type = __nv_bfloat16; };

namespace {
using namespace sa;
constexpr int kTile = kSparseAttentionTile;

// delta[row] = sum_d dout[row, d] * out[row, d]; one warp per row.
template <typename scalar_t, typename A>
__global__ void __launch_bounds__(256) delta_kernel(const scalar_t* __restrict__ dout, const scalar_t* __restrict__ out,
                                                    A* __restrict__ delta, int64_t rows, int D) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < rows; row += warps) {
    A acc = 0;
    for (int d = lane; d < D; d += 32) acc += static_cast<A>(dout[row * D + d]) * static_cast<A>(out[row * D + d]);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) delta[row] = acc;
  }
}

// Output columns per block of the tensor-core backward kernels.
template <int D> constexpr int kOutCols = D < 128 ? D : 128;

template <typename T, int D>
__global__ void __launch_bounds__(128) dq_mma_kernel(const SparseAttentionParams p) {
  constexpr int LD = D + 8, DO = kOutCols<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kTile * LD;
  T* sK = sdO + kTile * LD;
  T* sV = sK + kTile * LD;
  const int qt = p.n_tiles - 1 - static_cast<int>(blockIdx.x % p.n_tiles);
  const int bh = static_cast<int>(blockIdx.x / p.n_tiles);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int d = p.d, d16 = (d + 15) & ~15, c0 = static_cast<int>(blockIdx.y) * DO;  // c0: first output column
  const int64_t base = static_cast<int64_t>(bh) * p.N * d;
  const T* K = static_cast<const T*>(p.k) + base;
  const T* V = static_cast<const T*>(p.v) + base;
  const int q0 = qt * kTile;
  load_rows_async<T, D, kTile, 128>(sQ, LD, static_cast<const T*>(p.q) + base, q0, p.N, d, p.perm, tid);
  load_rows_async<T, D, kTile, 128>(sdO, LD, static_cast<const T*>(p.dout) + base, q0, p.N, d, p.perm, tid);
  cp_async_commit();

  const float sl2 = static_cast<float>(p.scale) * kLog2e;
  const float* delta = static_cast<const float*>(p.delta) + static_cast<int64_t>(bh) * p.N;
  const float* lse = static_cast<const float*>(p.lse_in) + static_cast<int64_t>(bh) * p.N;
  float lse2[2], dl[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + warp * 16 + g + r * 8;
    lse2[r] = i < p.N ? lse[p.perm.phys(i)] * kLog2e : 0.f;  // rows past N are masked out
    dl[r] = i < p.N ? delta[p.perm.phys(i)] : 0.f;
  }
  float dq[DO / 8][4];
#pragma unroll
  for (int i = 0; i < DO / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  const int32_t* entries = p.layout + p.fwd_idx;
  const int begin = p.layout[p.fwd_ptr + qt], end = p.layout[p.fwd_ptr + qt + 1];
  for (int e = begin; e < end; ++e) {
    const int kt = entries[2 * e], slot = entries[2 * e + 1];
    load_rows_async<T, D, kTile, 128>(sK, LD, K, kt * kTile, p.N, d, p.perm, tid);
    load_rows_async<T, D, kTile, 128>(sV, LD, V, kt * kTile, p.N, d, p.perm, tid);
    cp_async_commit();
    uint64_t w0 = ~uint64_t{0}, w1 = ~uint64_t{0};
    if (slot >= 0) {
      w0 = mask_word(p, slot, warp * 16 + g) >> (2 * t);
      w1 = mask_word(p, slot, warp * 16 + g + 8) >> (2 * t);
    }
    cp_async_wait<0>();
    __syncthreads();

    float s[kTile / 8][4], dp[kTile / 8][4];
#pragma unroll
    for (int i = 0; i < kTile / 8; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[i][c] = dp[i][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 >= d16) continue;
      uint32_t aq[4], ado[4];
      a_frag(aq, sQ, LD, warp * 16, kk * 16, lane);
      a_frag(ado, sdO, LD, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kTile / 16; ++np) {
        uint32_t b[4];
        b_frag_nk(b, sK, LD, np * 16, kk * 16, lane);
        Mma<T>::run(s[2 * np], aq, b[0], b[1]);
        Mma<T>::run(s[2 * np + 1], aq, b[2], b[3]);
        b_frag_nk(b, sV, LD, np * 16, kk * 16, lane);  // dP = dO V^T
        Mma<T>::run(dp[2 * np], ado, b[0], b[1]);
        Mma<T>::run(dp[2 * np + 1], ado, b[2], b[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool allowed = (((c >> 1) ? w1 : w0) >> (nt * 8 + (c & 1))) & 1;
        const float pr = allowed ? exp2f(s[nt][c] * sl2 - lse2[c >> 1]) : 0.f;
        s[nt][c] = pr * (dp[nt][c] - dl[c >> 1]);  // dS
      }
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t a[4];
      acc_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dd = 0; dd < DO / 16; ++dd) {
        if (c0 + dd * 16 >= d16) continue;
        uint32_t b[4];
        b_frag_kn(b, sK, LD, c0 + dd * 16, kk * 16, lane);
        Mma<T>::run(dq[2 * dd], a, b[0], b[1]);
        Mma<T>::run(dq[2 * dd + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // sK, sV are reloaded next
  }

  T* dQ = static_cast<T*>(p.dq) + base;
  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + warp * 16 + g + r * 8;
    if (i >= p.N) continue;
    T* dst = dQ + static_cast<int64_t>(p.perm.phys(i)) * d + c0 + 2 * t;
#pragma unroll
    for (int dt = 0; dt < DO / 8; ++dt) {
      if (c0 + dt * 8 >= d) continue;
      *reinterpret_cast<uint32_t*>(dst + dt * 8) = Mma<T>::pack(dq[dt][2 * r] * scale, dq[dt][2 * r + 1] * scale);
    }
  }
}

// One block per key tile: each warp owns 16 keys and accumulates their dK, dV over the query tiles
// that attend the tile, QC = 32 queries at a time. Without the minimum of one block per SM in
// __launch_bounds__, ptxas caps the 64 tile at 128 registers and spills.
template <typename T, int D>
__global__ void __launch_bounds__(128, 1) dkdv_mma_kernel(const SparseAttentionParams p) {
  constexpr int LD = D + 8, DO = kOutCols<D>, QC = 32;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kTile * LD;
  T* sQ = sV + kTile * LD;
  T* sdO = sQ + kTile * LD;
  float* sL = reinterpret_cast<float*>(sdO + kTile * LD);
  float* sDl = sL + kTile;
  const int kt = static_cast<int>(blockIdx.x % p.n_tiles);  // early key tiles (most queries) first
  const int bh = static_cast<int>(blockIdx.x / p.n_tiles);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int d = p.d, d16 = (d + 15) & ~15, c0 = static_cast<int>(blockIdx.y) * DO;  // c0: first output column
  const int64_t base = static_cast<int64_t>(bh) * p.N * d;
  const T* Q = static_cast<const T*>(p.q) + base;
  const T* dO = static_cast<const T*>(p.dout) + base;
  const float* delta = static_cast<const float*>(p.delta) + static_cast<int64_t>(bh) * p.N;
  const float* lse = static_cast<const float*>(p.lse_in) + static_cast<int64_t>(bh) * p.N;
  const int k0 = kt * kTile;
  load_rows_async<T, D, kTile, 128>(sK, LD, static_cast<const T*>(p.k) + base, k0, p.N, d, p.perm, tid);
  load_rows_async<T, D, kTile, 128>(sV, LD, static_cast<const T*>(p.v) + base, k0, p.N, d, p.perm, tid);
  cp_async_commit();

  const float sl2 = static_cast<float>(p.scale) * kLog2e;
  float dk[DO / 8][4], dv[DO / 8][4];
#pragma unroll
  for (int i = 0; i < DO / 8; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[i][c] = dv[i][c] = 0.f;

  const int32_t* entries = p.layout + p.bwd_idx;
  const int begin = p.layout[p.bwd_ptr + kt], end = p.layout[p.bwd_ptr + kt + 1];
  for (int e = begin; e < end; ++e) {
    const int qt = entries[2 * e], slot = entries[2 * e + 1];
    const int q0 = qt * kTile;
    load_rows_async<T, D, kTile, 128>(sQ, LD, Q, q0, p.N, d, p.perm, tid);
    load_rows_async<T, D, kTile, 128>(sdO, LD, dO, q0, p.N, d, p.perm, tid);
    cp_async_commit();
    if (tid < kTile) {
      const int i = q0 + tid;
      sL[tid] = i < p.N ? lse[p.perm.phys(i)] * kLog2e : 0.f;
      sDl[tid] = i < p.N ? delta[p.perm.phys(i)] : 0.f;
    }
    // Key-major mask words: bit i of word (64 + key) says whether query q0 + i attends the key.
    uint64_t w0 = ~uint64_t{0}, w1 = ~uint64_t{0};
    if (slot >= 0) {
      w0 = mask_word(p, slot, kTile + warp * 16 + g) >> (2 * t);
      w1 = mask_word(p, slot, kTile + warp * 16 + g + 8) >> (2 * t);
    }
    cp_async_wait<0>();
    __syncthreads();

#pragma unroll 1
    for (int qc = 0; qc < kTile; qc += QC) {
      float st[QC / 8][4], dpt[QC / 8][4];  // S^T and dP^T: rows = this warp's keys, columns = queries
#pragma unroll
      for (int i = 0; i < QC / 8; ++i)
#pragma unroll
        for (int c = 0; c < 4; ++c) st[i][c] = dpt[i][c] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        if (kk * 16 >= d16) continue;
        uint32_t ak[4], av[4];
        a_frag(ak, sK, LD, warp * 16, kk * 16, lane);
        a_frag(av, sV, LD, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < QC / 16; ++np) {
          uint32_t b[4];
          b_frag_nk(b, sQ, LD, qc + np * 16, kk * 16, lane);  // S^T = K Q^T
          Mma<T>::run(st[2 * np], ak, b[0], b[1]);
          Mma<T>::run(st[2 * np + 1], ak, b[2], b[3]);
          b_frag_nk(b, sdO, LD, qc + np * 16, kk * 16, lane);  // dP^T = V dO^T
          Mma<T>::run(dpt[2 * np], av, b[0], b[1]);
          Mma<T>::run(dpt[2 * np + 1], av, b[2], b[3]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < QC / 8; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int col = qc + nt * 8 + 2 * t + (c & 1);
          const bool allowed = (((c >> 1) ? w1 : w0) >> (qc + nt * 8 + (c & 1))) & 1;
          st[nt][c] = allowed ? exp2f(st[nt][c] * sl2 - sL[col]) : 0.f;  // P^T
          dpt[nt][c] = st[nt][c] * (dpt[nt][c] - sDl[col]);              // dS^T
        }
#pragma unroll
      for (int kk = 0; kk < QC / 16; ++kk) {
        uint32_t ap[4], as[4];
        acc_to_a<T>(ap, st[2 * kk], st[2 * kk + 1]);
        acc_to_a<T>(as, dpt[2 * kk], dpt[2 * kk + 1]);
#pragma unroll
        for (int dd = 0; dd < DO / 16; ++dd) {
          if (c0 + dd * 16 >= d16) continue;
          uint32_t b[4];
          b_frag_kn(b, sdO, LD, c0 + dd * 16, qc + kk * 16, lane);  // dV += P^T dO
          Mma<T>::run(dv[2 * dd], ap, b[0], b[1]);
          Mma<T>::run(dv[2 * dd + 1], ap, b[2], b[3]);
          b_frag_kn(b, sQ, LD, c0 + dd * 16, qc + kk * 16, lane);  // dK += dS^T Q
          Mma<T>::run(dk[2 * dd], as, b[0], b[1]);
          Mma<T>::run(dk[2 * dd + 1], as, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // sQ, sdO, sL, sDl are reloaded next
  }

  const float scale = static_cast<float>(p.scale);
  T* dK = static_cast<T*>(p.dk) + base;
  T* dV = static_cast<T*>(p.dv) + base;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int j = k0 + warp * 16 + g + r * 8;
    if (j >= p.N) continue;
    const int64_t off = static_cast<int64_t>(p.perm.phys(j)) * d + c0 + 2 * t;
#pragma unroll
    for (int dt = 0; dt < DO / 8; ++dt) {
      if (c0 + dt * 8 >= d) continue;
      *reinterpret_cast<uint32_t*>(dK + off + dt * 8) = Mma<T>::pack(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dV + off + dt * 8) = Mma<T>::pack(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

DF_DEVICE float exp2_(float x) { return exp2f(x); }
DF_DEVICE double exp2_(double x) { return exp2(x); }

// fp32 / fp64 dQ: kRows query rows x kTPR threads per block (SimtShape), keys stream through
// shared memory kChunk at a time. Vectors as in the forward's SIMT kernel.
template <typename T, int D>
__global__ void __launch_bounds__(256, 1) dq_simt_kernel(const SparseAttentionParams p) {
  using Shape = SimtShape<T, D>;
  constexpr int kVec = Shape::kVec, kTPR = Shape::kTPR, kRows = Shape::kRows, kNV = Shape::kNV;
  constexpr int kChunk = Shape::kChunk;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + kChunk * D;
  const int part = blockIdx.x % Shape::kParts, rest = blockIdx.x / Shape::kParts;
  const int qt = p.n_tiles - 1 - rest % p.n_tiles, bh = rest / p.n_tiles;
  const int tid = threadIdx.x, tr = tid % kTPR, d = p.d;
  const int i = qt * kTile + part * kRows + tid / kTPR;
  const bool valid = i < p.N;
  const int row = valid ? p.perm.phys(i) : 0;
  const int64_t base = static_cast<int64_t>(bh) * p.N * d;
  const T* K = static_cast<const T*>(p.k) + base;
  const T* V = static_cast<const T*>(p.v) + base;
  T q[kNV * kVec], dO[kNV * kVec], dq[kNV * kVec];
  {
    const T* Qr = static_cast<const T*>(p.q) + base + static_cast<int64_t>(row) * d;
    const T* dOr = static_cast<const T*>(p.dout) + base + static_cast<int64_t>(row) * d;
#pragma unroll
    for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        const int col = (vi * kTPR + tr) * kVec + c;
        q[vi * kVec + c] = valid && col < d ? Qr[col] : T(0);
        dO[vi * kVec + c] = valid && col < d ? dOr[col] : T(0);
        dq[vi * kVec + c] = T(0);
      }
  }
  const T sl2 = static_cast<T>(p.scale) * static_cast<T>(1.4426950408889634);
  const T lse2 =
      valid ? static_cast<const T*>(p.lse_in)[static_cast<int64_t>(bh) * p.N + row] * static_cast<T>(1.4426950408889634)
            : T(0);
  const T dl = valid ? static_cast<const T*>(p.delta)[static_cast<int64_t>(bh) * p.N + row] : T(0);
  const int32_t* entries = p.layout + p.fwd_idx;
  const int begin = p.layout[p.fwd_ptr + qt], end = p.layout[p.fwd_ptr + qt + 1];
  for (int e = begin; e < end; ++e) {
    const int kt = entries[2 * e], slot = entries[2 * e + 1];
    const uint64_t w = slot >= 0 ? mask_word(p, slot, part * kRows + tid / kTPR) : ~uint64_t{0};
    for (int kc = 0; kc < kTile; kc += kChunk) {
      const int j0 = kt * kTile + kc;
      if (j0 >= p.N) break;  // uniform over the block
      __syncthreads();
      load_rows_async<T, D, kChunk, 256>(sK, D, K, j0, p.N, d, p.perm, tid);
      load_rows_async<T, D, kChunk, 256>(sV, D, V, j0, p.N, d, p.perm, tid);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
#pragma unroll 4
      for (int jj = 0; jj < kChunk; ++jj) {
        const T* kr = sK + jj * D + tr * kVec;
        const T* vr = sV + jj * D + tr * kVec;
        T sd = 0, dd = 0;
#pragma unroll
        for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
          for (int c = 0; c < kVec; ++c) {
            sd += q[vi * kVec + c] * kr[vi * kTPR * kVec + c];
            dd += dO[vi * kVec + c] * vr[vi * kTPR * kVec + c];
          }
        sd = group_sum<kTPR>(sd);
        dd = group_sum<kTPR>(dd);
        const T pr = ((w >> (kc + jj)) & 1) ? exp2_(sd * sl2 - lse2) : T(0);
        const T ds = pr * (dd - dl);
#pragma unroll
        for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
          for (int c = 0; c < kVec; ++c) dq[vi * kVec + c] += ds * kr[vi * kTPR * kVec + c];
      }
    }
  }
  if (!valid) return;
  T* dst = static_cast<T*>(p.dq) + base + static_cast<int64_t>(row) * d;
  const T scale = static_cast<T>(p.scale);
#pragma unroll
  for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
      const int col = (vi * kTPR + tr) * kVec + c;
      if (col < d) dst[col] = dq[vi * kVec + c] * scale;
    }
}

// fp32 / fp64 dK, dV: kRows keys x kTPR threads per block, queries stream through shared memory.
template <typename T, int D>
__global__ void __launch_bounds__(256, 1) dkdv_simt_kernel(const SparseAttentionParams p) {
  using Shape = SimtShape<T, D>;
  constexpr int kVec = Shape::kVec, kTPR = Shape::kTPR, kRows = Shape::kRows, kNV = Shape::kNV;
  constexpr int kChunk = Shape::kChunk;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + kChunk * D;
  T* sL = sdO + kChunk * D;
  T* sDl = sL + kChunk;
  const int part = blockIdx.x % Shape::kParts, rest = blockIdx.x / Shape::kParts;
  const int kt = rest % p.n_tiles, bh = rest / p.n_tiles;
  const int tid = threadIdx.x, tr = tid % kTPR, d = p.d;
  const int j = kt * kTile + part * kRows + tid / kTPR;
  const bool valid = j < p.N;
  const int row = valid ? p.perm.phys(j) : 0;
  const int64_t base = static_cast<int64_t>(bh) * p.N * d;
  const T* Q = static_cast<const T*>(p.q) + base;
  const T* dO = static_cast<const T*>(p.dout) + base;
  const T* lse = static_cast<const T*>(p.lse_in) + static_cast<int64_t>(bh) * p.N;
  const T* delta = static_cast<const T*>(p.delta) + static_cast<int64_t>(bh) * p.N;
  T k[kNV * kVec], v[kNV * kVec], dk[kNV * kVec], dv[kNV * kVec];
  {
    const T* Kr = static_cast<const T*>(p.k) + base + static_cast<int64_t>(row) * d;
    const T* Vr = static_cast<const T*>(p.v) + base + static_cast<int64_t>(row) * d;
#pragma unroll
    for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        const int col = (vi * kTPR + tr) * kVec + c;
        k[vi * kVec + c] = valid && col < d ? Kr[col] : T(0);
        v[vi * kVec + c] = valid && col < d ? Vr[col] : T(0);
        dk[vi * kVec + c] = dv[vi * kVec + c] = T(0);
      }
  }
  const T sl2 = static_cast<T>(p.scale) * static_cast<T>(1.4426950408889634);
  const int32_t* entries = p.layout + p.bwd_idx;
  const int begin = p.layout[p.bwd_ptr + kt], end = p.layout[p.bwd_ptr + kt + 1];
  for (int e = begin; e < end; ++e) {
    const int qt = entries[2 * e], slot = entries[2 * e + 1];
    const uint64_t w = slot >= 0 ? mask_word(p, slot, kTile + part * kRows + tid / kTPR) : ~uint64_t{0};
    for (int qc = 0; qc < kTile; qc += kChunk) {
      const int i0 = qt * kTile + qc;
      if (i0 >= p.N) break;  // uniform over the block
      __syncthreads();
      load_rows_async<T, D, kChunk, 256>(sQ, D, Q, i0, p.N, d, p.perm, tid);
      load_rows_async<T, D, kChunk, 256>(sdO, D, dO, i0, p.N, d, p.perm, tid);
      cp_async_commit();
      if (tid < kChunk) {
        const bool ok = i0 + tid < p.N;
        const int r = ok ? p.perm.phys(i0 + tid) : 0;
        sL[tid] = ok ? lse[r] * static_cast<T>(1.4426950408889634) : T(0);
        sDl[tid] = ok ? delta[r] : T(0);
      }
      cp_async_wait<0>();
      __syncthreads();
#pragma unroll 4
      for (int ii = 0; ii < kChunk; ++ii) {
        const T* qr = sQ + ii * D + tr * kVec;
        const T* dor = sdO + ii * D + tr * kVec;
        T sd = 0, dd = 0;
#pragma unroll
        for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
          for (int c = 0; c < kVec; ++c) {
            sd += k[vi * kVec + c] * qr[vi * kTPR * kVec + c];
            dd += v[vi * kVec + c] * dor[vi * kTPR * kVec + c];
          }
        sd = group_sum<kTPR>(sd);
        dd = group_sum<kTPR>(dd);
        const T pr = ((w >> (qc + ii)) & 1) ? exp2_(sd * sl2 - sL[ii]) : T(0);
        const T ds = pr * (dd - sDl[ii]);
#pragma unroll
        for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
          for (int c = 0; c < kVec; ++c) {
            dv[vi * kVec + c] += pr * dor[vi * kTPR * kVec + c];
            dk[vi * kVec + c] += ds * qr[vi * kTPR * kVec + c];
          }
      }
    }
  }
  if (!valid) return;
  const T scale = static_cast<T>(p.scale);
  T* dK = static_cast<T*>(p.dk) + base + static_cast<int64_t>(row) * d;
  T* dV = static_cast<T*>(p.dv) + base + static_cast<int64_t>(row) * d;
#pragma unroll
  for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
      const int col = (vi * kTPR + tr) * kVec + c;
      if (col < d) {
        dK[col] = dk[vi * kVec + c] * scale;
        dV[col] = dv[vi * kVec + c];
      }
    }
}

}  // namespace

template <typename scalar_t, int D>
void sparse_attention_bwd_launch(const SparseAttentionParams& p, cudaStream_t stream) {
  using A = acc_t<scalar_t>;
  constexpr const char* what = "_sparse_attention_backward";
  const int64_t rows = static_cast<int64_t>(p.bh) * p.N;
  const int64_t delta_blocks = std::min<int64_t>((rows + 7) / 8, int64_t{1} << 20);
  delta_kernel<scalar_t, A><<<static_cast<unsigned>(delta_blocks), 256, 0, stream>>>(
      static_cast<const scalar_t*>(p.dout), static_cast<const scalar_t*>(p.out), static_cast<A*>(p.delta), rows, p.d);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    using T = typename DeviceScalar<scalar_t>::type;
    const int tile_bytes = kTile * (D + 8) * static_cast<int>(sizeof(T));
    // Column blocks: one per kOutCols<D> output columns the head dim reaches.
    const dim3 grid(p.bh * p.n_tiles, (p.d + kOutCols<D> - 1) / kOutCols<D>);
    const auto dq = dq_mma_kernel<T, D>;
    set_max_dynamic_smem(dq, 4 * tile_bytes, what, D);
    dq<<<grid, 128, 4 * tile_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto dkdv = dkdv_mma_kernel<T, D>;
    const int dkdv_bytes = 4 * tile_bytes + 2 * kTile * static_cast<int>(sizeof(float));
    set_max_dynamic_smem(dkdv, dkdv_bytes, what, D);
    dkdv<<<grid, 128, dkdv_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    using Shape = SimtShape<scalar_t, D>;
    const int chunk_bytes = Shape::kChunk * D * static_cast<int>(sizeof(scalar_t));
    const unsigned blocks = static_cast<unsigned>(p.bh * p.n_tiles * Shape::kParts);
    const auto dq = dq_simt_kernel<scalar_t, D>;
    set_max_dynamic_smem(dq, 2 * chunk_bytes, what, D);
    dq<<<blocks, 256, 2 * chunk_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto dkdv = dkdv_simt_kernel<scalar_t, D>;
    const int dkdv_bytes = 2 * chunk_bytes + 2 * Shape::kChunk * static_cast<int>(sizeof(scalar_t));
    set_max_dynamic_smem(dkdv, dkdv_bytes, what, D);
    dkdv<<<blocks, 256, dkdv_bytes, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

#define DF_INSTANTIATE(T)                                                                    \
  template void sparse_attention_bwd_launch<T, 64>(const SparseAttentionParams&, cudaStream_t);  \
  template void sparse_attention_bwd_launch<T, 128>(const SparseAttentionParams&, cudaStream_t); \
  template void sparse_attention_bwd_launch<T, 256>(const SparseAttentionParams&, cudaStream_t);
DF_INSTANTIATE(c10::Half)
DF_INSTANTIATE(c10::BFloat16)
DF_INSTANTIATE(float)
DF_INSTANTIATE(double)
#undef DF_INSTANTIATE

}  // namespace dalle_fast
