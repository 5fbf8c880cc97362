// Device-side pieces of the CUDA sparse attention kernels (no ATen): the parameter struct shared
// by the launchers, warp-level tensor-core primitives (mma.sync m16n8k16, ldmatrix, cp.async; sm_80+)
// and the tile loader. The fragment layouts are the PTX ISA's for mma.m16n8k16 with f32 accumulators:
// lane = 4 * g + t (g = lane / 4, t = lane % 4); an accumulator tile 16x8 holds c0,c1 at row g,
// columns 2t, 2t+1 and c2,c3 at row g + 8.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "dalle_fast/attention_mask.h"
#include "dalle_fast/sparse_attention_layout.h"

namespace dalle_fast {

struct SparseAttentionParams {
  // (B*heads, N, d) contiguous, 16-byte aligned; element type chosen by the launcher. The kernels
  // are compiled for a few head-dim tiles (kSparseAttentionHeadDimTiles); d, a multiple of 8, is the
  // real head dim (the row stride): columns d..tile-1 are zero-filled in shared memory, never read
  // from or written to global memory, and skipped by the tensor-core loops in 16-column steps.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  void* lse = nullptr;  // (B*heads, N) natural-log sum-exp of the scaled scores: float, double for double
  // Backward.
  const void* dout = nullptr;
  const void* lse_in = nullptr;  // as lse
  void* delta = nullptr;  // rowsum(dout * out): float, or double for double inputs
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  // Block layout (device int32) and the bit masks of its partial tiles; see BlockLayout.
  const int32_t* layout = nullptr;
  const uint64_t* masks = nullptr;
  int fwd_ptr = 0, fwd_idx = 0, bwd_ptr = 0, bwd_idx = 0;
  int n_tiles = 0;
  int bh = 0;  // B * heads
  int N = 0;
  int d = 0;  // head dim, <= the kernel's tile, a multiple of 8
  MaskSpec spec{};
  SeqPerm perm{};
  double scale = 1.0;
};

// Launchers, one explicit instantiation per (scalar type, head-dim tile D); scalar_t is c10::Half,
// c10::BFloat16, float or double; p.d <= D. Defined in csrc/cuda/sparse_attention_{fwd,bwd}_cuda.cu.
template <typename scalar_t, int D>
void sparse_attention_fwd_launch(const SparseAttentionParams& p, cudaStream_t stream);
template <typename scalar_t, int D>
void sparse_attention_bwd_launch(const SparseAttentionParams& p, cudaStream_t stream);

// c10::Half / c10::BFloat16 -> __half / __nv_bfloat16 (bit-identical); the launchers specialise it.
template <typename scalar_t> struct DeviceScalar { using type = scalar_t; };

// Thread layout of the fp32/fp64 (SIMT) kernels for head-dim tile D: kTPR threads per row, each
// holding kNV 16-byte vectors of the row (kVec elements each); kRows rows per 256-thread block,
// kParts blocks per 64-row tile; keys (or queries) stream through shared memory kChunk at a time.
// A thread holds at most 64 bytes of each row (more threads per row for wider rows: without that,
// fp64 at D = 128 spills), and the chunk halves for rows over 1 KiB so that shared memory stays
// within 64 KiB.
template <typename T, int D> struct SimtShape {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kRowBytes = D * static_cast<int>(sizeof(T));
  static constexpr int kTPR = kRowBytes <= 512 ? 8 : kRowBytes <= 1024 ? 16 : 32;
  static constexpr int kRows = 256 / kTPR;
  static constexpr int kParts = 64 / kRows;
  static constexpr int kNV = D / (kTPR * kVec);
  static constexpr int kChunk = kRowBytes <= 1024 ? 32 : 16;
  static_assert(kNV >= 1 && D % (kTPR * kVec) == 0, "head-dim tile too small for the SIMT layout");
};

// Raises the kernel's dynamic shared memory limit to `bytes`, with a clear error on a GPU that has
// less per block (the 256 tile's backward needs ~133 KiB: A100/H100-class, not sm_86/sm_89).
template <typename Kernel>
void set_max_dynamic_smem(Kernel kernel, int bytes, const char* what, int tile) {
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= optin, what, ": head dims in the ", tile, " tile need ", bytes,
              " bytes of shared memory per block; this GPU allows ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

namespace sa {

#if defined(__CUDACC__)

// ---- warp-level tensor-core primitives (sm_80+; earlier archs trap: the host refuses them) ----
template <typename T> struct Mma;  // T = __half or __nv_bfloat16 (the launchers map c10's types onto these)

DF_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

DF_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
#else
  __trap();
#endif
}

DF_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(p)));
#else
  __trap();
#endif
}

// 16-byte global -> shared copy; valid == false zero-fills the destination without reading.
DF_DEVICE void cp_async16(void* smem, const void* gmem, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_size));
#else
  __trap();
#endif
}
DF_DEVICE void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N> DF_DEVICE void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

template <> struct Mma<__half> {
  static DF_DEVICE uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static DF_DEVICE void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

template <> struct Mma<__nv_bfloat16> {
  static DF_DEVICE uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static DF_DEVICE void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
                 "{%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
  }
};

// ldmatrix lane addresses for the three operand shapes, all over row-major shared tiles with row
// stride `ld` elements (a multiple of 8, so every row address is 16-byte aligned):
//  A (16 x 16 at rows m0, cols k0) stored [m][k]:              a_frag(...)  -> a[0..3]
//  B for two n8 tiles (n0..n0+15, k0..k0+15) stored [n][k]:    b_frag_nk()  -> {r0,r1} tile n0, {r2,r3} n0+8
//  B for two n8 tiles stored [k][n] (uses .trans):             b_frag_kn()  -> same
template <typename T> DF_DEVICE void a_frag(uint32_t (&a)[4], const T* s, int ld, int m0, int k0, int lane) {
  ldmatrix_x4(a, s + (m0 + (lane & 15)) * ld + k0 + ((lane >> 4) << 3));
}
template <typename T> DF_DEVICE void b_frag_nk(uint32_t (&b)[4], const T* s, int ld, int n0, int k0, int lane) {
  ldmatrix_x4(b, s + (n0 + (lane & 7) + ((lane >> 4) << 3)) * ld + k0 + (((lane >> 3) & 1) << 3));
}
template <typename T> DF_DEVICE void b_frag_kn(uint32_t (&b)[4], const T* s, int ld, int n0, int k0, int lane) {
  ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * ld + n0 + ((lane >> 4) << 3));
}

// The accumulators of two adjacent n8 tiles (16 columns) are exactly the A fragment of a 16 x 16
// operand once rounded to T (the flash-attention-2 register reuse for P @ V).
template <typename T>
DF_DEVICE void acc_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = Mma<T>::pack(c0[0], c0[1]);
  a[1] = Mma<T>::pack(c0[2], c0[3]);
  a[2] = Mma<T>::pack(c1[0], c1[1]);
  a[3] = Mma<T>::pack(c1[2], c1[3]);
}

// Copies rows [row0, row0 + ROWS) (logical positions) of a (N, d) matrix into shared memory rows
// of D columns with row stride ld; rows at or past N and columns d..D-1 are zero-filled (so the
// padded columns add exact zeros to every product). NTHREADS threads cooperate; d * sizeof(T) is a
// multiple of 16 (the host pads other head dims).
template <typename T, int D, int ROWS, int NTHREADS>
DF_DEVICE void load_rows_async(T* s, int ld, const T* g, int row0, int N, int d, const SeqPerm& perm, int tid) {
  constexpr int kPerChunk = 16 / sizeof(T);
  constexpr int kChunksPerRow = D / kPerChunk;
  static_assert(D % kPerChunk == 0, "rows must be whole 16-byte chunks");
  for (int c = tid; c < ROWS * kChunksPerRow; c += NTHREADS) {
    const int r = c / kChunksPerRow, cc = c - r * kChunksPerRow, l = row0 + r;
    const bool ok = l < N && cc * kPerChunk < d;
    const T* src = g + static_cast<int64_t>(ok ? perm.phys(l) : 0) * d + (ok ? cc * kPerChunk : 0);
    cp_async16(s + r * ld + cc * kPerChunk, src, ok);
  }
}

// Quad (4 lanes sharing an accumulator row) and 8-lane group reductions.
DF_DEVICE float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
DF_DEVICE float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
// Sum over groups of G adjacent lanes (G a power of two <= 32).
template <int G, typename A> DF_DEVICE A group_sum(A x) {
#pragma unroll
  for (int off = 1; off < G; off <<= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// The 64-bit mask word of row r of a partial tile (rows are queries; words 64.. are key-major).
DF_DEVICE uint64_t mask_word(const SparseAttentionParams& p, int slot, int r) {
  return __ldg(reinterpret_cast<const unsigned long long*>(p.masks) + static_cast<int64_t>(slot) * 128 + r);
}

#endif  // __CUDACC__

}  // namespace sa
}  // namespace dalle_fast
