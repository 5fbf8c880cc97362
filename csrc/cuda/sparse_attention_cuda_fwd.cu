// Forward kernels of sparse_attention (flash-attention-2 style over the block layout).
//  fp16/bf16: tensor cores (mma.sync m16n8k16, fp32 accumulators); one block of 4 warps per
//             (batch*head, 64-query tile), each warp owns 16 query rows; K/V tiles stream through
//             shared memory with cp.async (the next K loads while P @ V runs, the next V while the
//             next S = Q K^T runs); online softmax in fp32 registers, in log2 units.
//  fp32/fp64: SIMT, 8-32 threads per query row (SimtShape), exact in the input precision.
// Templates over the head-dim tile D; the real head dim p.d <= D (see SparseAttentionParams).
// Host checks, the layout cache and the op registration are in sparse_attention_cuda.cu.
#include <ATen/cuda/CUDAContext.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "dalle_fast/sparse_attention_cuda.cuh"

namespace dalle_fast {
template <> struct DeviceScalar<c10::Half> { using type = __half; };
template <> struct DeviceScalar<c10::BFloat16> { using type = __nv_bfloat16; };

namespace {
using namespace sa;
constexpr int kTile = kSparseAttentionTile;

template <typename T, int D>
__global__ void __launch_bounds__(128) fwd_mma_kernel(const SparseAttentionParams p) {
  constexpr int LD = D + 8;  // padded rows: ldmatrix row addresses fall in distinct bank groups
  // Q's fragments stay in registers up to a 128 tile; the 256 tile reads them from shared memory at
  // each use (as flash-attention does for large head dims), leaving the registers to O.
  constexpr bool kQInRegs = D <= 128;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + kTile * LD;
  T* sV = sK + kTile * LD;

  // Heaviest query tiles (the last ones under causal masks) are scheduled first.
  const int qt = p.n_tiles - 1 - static_cast<int>(blockIdx.x % p.n_tiles);
  const int bh = static_cast<int>(blockIdx.x / p.n_tiles);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int d = p.d, d16 = (d + 15) & ~15;  // columns past d16 are never multiplied
  const int64_t base = static_cast<int64_t>(bh) * p.N * d;
  const T* Q = static_cast<const T*>(p.q) + base;
  const T* K = static_cast<const T*>(p.k) + base;
  const T* V = static_cast<const T*>(p.v) + base;
  const int q0 = qt * kTile;
  const int32_t* entries = p.layout + p.fwd_idx;
  const int begin = p.layout[p.fwd_ptr + qt], end = p.layout[p.fwd_ptr + qt + 1];

  // cp.async groups: Q, K[begin], V[begin]. Groups are committed even when empty so that
  // wait_group counts stay the same on every path.
  load_rows_async<T, D, kTile, 128>(sQ, LD, Q, q0, p.N, d, p.perm, tid);
  cp_async_commit();
  if (begin < end) load_rows_async<T, D, kTile, 128>(sK, LD, K, entries[2 * begin] * kTile, p.N, d, p.perm, tid);
  cp_async_commit();
  if (begin < end) load_rows_async<T, D, kTile, 128>(sV, LD, V, entries[2 * begin] * kTile, p.N, d, p.perm, tid);
  cp_async_commit();
  cp_async_wait<1>();  // Q and K landed; V may be in flight
  __syncthreads();

  uint32_t qf[kQInRegs ? D / 16 : 1][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      if (kk * 16 < d16) a_frag(qf[kk], sQ, LD, warp * 16, kk * 16, lane);
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  const float sl2 = static_cast<float>(p.scale) * kLog2e;

  for (int e = begin; e < end; ++e) {
    // Invariant: K of entry e is in sK and visible to all threads; V of entry e may be in flight.
    const int slot = entries[2 * e + 1];  // -1: full tile
    // This thread's mask bits (rows g and g + 8, columns 2t + 8 nt + {0, 1}), fetched early.
    uint64_t w0 = ~uint64_t{0}, w1 = ~uint64_t{0};
    if (slot >= 0) {
      w0 = mask_word(p, slot, warp * 16 + g) >> (2 * t);
      w1 = mask_word(p, slot, warp * 16 + g + 8) >> (2 * t);
    }
    float s[kTile / 8][4];
#pragma unroll
    for (int i = 0; i < kTile / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if (kk * 16 >= d16) continue;
      uint32_t qa[4];
      if constexpr (kQInRegs) {
        qa[0] = qf[kk][0], qa[1] = qf[kk][1], qa[2] = qf[kk][2], qa[3] = qf[kk][3];
      } else {
        a_frag(qa, sQ, LD, warp * 16, kk * 16, lane);
      }
#pragma unroll
      for (int np = 0; np < kTile / 16; ++np) {
        uint32_t b[4];
        b_frag_nk(b, sK, LD, np * 16, kk * 16, lane);
        Mma<T>::run(s[2 * np], qa, b[0], b[1]);
        Mma<T>::run(s[2 * np + 1], qa, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with sK
    if (e + 1 < end) load_rows_async<T, D, kTile, 128>(sK, LD, K, entries[2 * e + 2] * kTile, p.N, d, p.perm, tid);
    cp_async_commit();

    // Scale into log2 units and mask; then the online softmax of the two rows this thread holds.
#pragma unroll
    for (int nt = 0; nt < kTile / 8; ++nt) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool allowed = (((c >> 1) ? w1 : w0) >> (nt * 8 + (c & 1))) & 1;
        s[nt][c] = allowed ? s[nt][c] * sl2 : -INFINITY;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      const float m_new = fmaxf(m[r], quad_max(mx));
      // A row with nothing allowed so far keeps m = -inf; exponents then use 0 so that no
      // (-inf) - (-inf) appears: its p and alpha are exactly 0.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[r] - m_use);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kTile / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - m_use);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - m_use);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;  // per-thread partial sum, reduced over the quad at the end
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

    cp_async_wait<1>();  // V of entry e landed (the K just issued may still be in flight)
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile / 16; ++kk) {
      uint32_t a[4];
      acc_to_a<T>(a, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        if (dp * 16 >= d16) continue;
        uint32_t b[4];
        b_frag_kn(b, sV, LD, dp * 16, kk * 16, lane);
        Mma<T>::run(o[2 * dp], a, b[0], b[1]);
        Mma<T>::run(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with sV
    if (e + 1 < end) load_rows_async<T, D, kTile, 128>(sV, LD, V, entries[2 * e + 2] * kTile, p.N, d, p.perm, tid);
    cp_async_commit();
    cp_async_wait<1>();  // K of entry e + 1 landed
    __syncthreads();
  }
  cp_async_wait<0>();

  T* O = static_cast<T*>(p.out) + base;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float lsum = quad_sum(l[r]);
    const int i = q0 + warp * 16 + g + r * 8;
    if (i >= p.N) continue;
    const int row = p.perm.phys(i);
    const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      if (dt * 8 >= d) continue;
      *reinterpret_cast<uint32_t*>(O + static_cast<int64_t>(row) * d + dt * 8 + 2 * t) =
          Mma<T>::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
    if (t == 0) {
      static_cast<float*>(p.lse)[static_cast<int64_t>(bh) * p.N + row] =
          lsum > 0.f ? (m[r] + log2f(lsum)) * kLn2 : -INFINITY;
    }
  }
}

DF_DEVICE float exp2_(float x) { return exp2f(x); }
DF_DEVICE double exp2_(double x) { return exp2(x); }
DF_DEVICE float log2_(float x) { return log2f(x); }
DF_DEVICE double log2_(double x) { return log2(x); }

// fp32 / fp64: 256 threads = kRows query rows x kTPR threads; a thread holds D/kTPR of its row's q
// and o (16-byte vectors interleaved so that the threads of a row read one contiguous span). Each
// 64-key tile of the layout streams through shared memory in kChunk-key chunks.
template <typename T, int D>
__global__ void __launch_bounds__(256, 1) fwd_simt_kernel(const SparseAttentionParams p) {
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
  const int64_t base = static_cast<int64_t>(bh) * p.N * d;
  const T* K = static_cast<const T*>(p.k) + base;
  const T* V = static_cast<const T*>(p.v) + base;
  const int row = valid ? p.perm.phys(i) : 0;

  T q[kNV * kVec], o[kNV * kVec];
  {
    const T* Q = static_cast<const T*>(p.q) + base + static_cast<int64_t>(row) * d;
#pragma unroll
    for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
      for (int c = 0; c < kVec; ++c) {
        const int col = (vi * kTPR + tr) * kVec + c;
        q[vi * kVec + c] = valid && col < d ? Q[col] : T(0);
        o[vi * kVec + c] = T(0);
      }
  }
  const T sl2 = static_cast<T>(p.scale) * static_cast<T>(1.4426950408889634);
  T m = -INFINITY, l = 0;
  const int32_t* entries = p.layout + p.fwd_idx;
  const int begin = p.layout[p.fwd_ptr + qt], end = p.layout[p.fwd_ptr + qt + 1];
  for (int e = begin; e < end; ++e) {
    const int kt = entries[2 * e], slot = entries[2 * e + 1];
    const uint64_t w = slot >= 0 ? mask_word(p, slot, part * kRows + tid / kTPR) : ~uint64_t{0};
    for (int kc = 0; kc < kTile; kc += kChunk) {
      const int j0 = kt * kTile + kc;
      if (j0 >= p.N) break;  // uniform over the block
      __syncthreads();        // the previous chunk is consumed
      load_rows_async<T, D, kChunk, 256>(sK, D, K, j0, p.N, d, p.perm, tid);
      load_rows_async<T, D, kChunk, 256>(sV, D, V, j0, p.N, d, p.perm, tid);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      for (int jb = 0; jb < kChunk; jb += 16) {
        T s[16];
        T mx = -INFINITY;
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
          const T* kr = sK + (jb + jj) * D + tr * kVec;
          T dot = 0;
#pragma unroll
          for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
            for (int c = 0; c < kVec; ++c) dot += q[vi * kVec + c] * kr[vi * kTPR * kVec + c];
          s[jj] = group_sum<kTPR>(dot) * sl2;
          if (!((w >> (kc + jb + jj)) & 1)) s[jj] = -INFINITY;
          mx = s[jj] > mx ? s[jj] : mx;
        }
        const T m_new = mx > m ? mx : m;
        const T m_use = m_new == -INFINITY ? T(0) : m_new;
        const T alpha = exp2_(m - m_use);
        m = m_new;
        l *= alpha;
#pragma unroll
        for (int c = 0; c < kNV * kVec; ++c) o[c] *= alpha;
#pragma unroll
        for (int jj = 0; jj < 16; ++jj) {
          const T pj = exp2_(s[jj] - m_use);
          l += pj;
          const T* vr = sV + (jb + jj) * D + tr * kVec;
#pragma unroll
          for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
            for (int c = 0; c < kVec; ++c) o[vi * kVec + c] += pj * vr[vi * kTPR * kVec + c];
        }
      }
    }
  }
  if (!valid) return;
  T* O = static_cast<T*>(p.out) + base + static_cast<int64_t>(row) * d;
  const T inv = l > T(0) ? T(1) / l : T(0);
#pragma unroll
  for (int vi = 0; vi < kNV; ++vi)
#pragma unroll
    for (int c = 0; c < kVec; ++c) {
      const int col = (vi * kTPR + tr) * kVec + c;
      if (col < d) O[col] = o[vi * kVec + c] * inv;
    }
  if (tr == 0) {
    static_cast<T*>(p.lse)[static_cast<int64_t>(bh) * p.N + row] =
        l > T(0) ? (m + log2_(l)) * static_cast<T>(0.6931471805599453) : static_cast<T>(-INFINITY);
  }
}

}  // namespace

template <typename scalar_t, int D>
void sparse_attention_fwd_launch(const SparseAttentionParams& p, cudaStream_t stream) {
  if constexpr (std::is_same_v<scalar_t, c10::Half> || std::is_same_v<scalar_t, c10::BFloat16>) {
    using T = typename DeviceScalar<scalar_t>::type;
    const auto kernel = fwd_mma_kernel<T, D>;
    const int smem = 3 * kTile * (D + 8) * static_cast<int>(sizeof(T));
    set_max_dynamic_smem(kernel, smem, "sparse_attention (forward)", D);
    kernel<<<p.bh * p.n_tiles, 128, smem, stream>>>(p);
  } else {
    using Shape = SimtShape<scalar_t, D>;
    const auto kernel = fwd_simt_kernel<scalar_t, D>;
    const int smem = 2 * Shape::kChunk * D * static_cast<int>(sizeof(scalar_t));
    set_max_dynamic_smem(kernel, smem, "sparse_attention (forward)", D);
    kernel<<<p.bh * p.n_tiles * Shape::kParts, 256, smem, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define DF_INSTANTIATE(T)                                                                    \
  template void sparse_attention_fwd_launch<T, 64>(const SparseAttentionParams&, cudaStream_t);  \
  template void sparse_attention_fwd_launch<T, 128>(const SparseAttentionParams&, cudaStream_t); \
  template void sparse_attention_fwd_launch<T, 256>(const SparseAttentionParams&, cudaStream_t);
DF_INSTANTIATE(c10::Half)
DF_INSTANTIATE(c10::BFloat16)
DF_INSTANTIATE(float)
DF_INSTANTIATE(double)
#undef DF_INSTANTIATE

}  // namespace dalle_fast
