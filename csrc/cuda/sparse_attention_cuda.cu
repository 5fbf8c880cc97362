// CUDA entry points of sparse_attention, _sparse_attention_backward and sparse_attention_decode:
// the shared boundary (dalle_fast/sparse_attention_checks.h), head-dim tiles and padding, the
// cached block layouts, and the cached-decoding kernel. The forward and
// backward kernels are in sparse_attention_{fwd,bwd}_cuda.cu (separate files compile in parallel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <utility>

#include "dalle_fast/sparse_attention_checks.h"
#include "dalle_fast/sparse_attention_cuda.cuh"

namespace dalle_fast {
namespace {

void check_device(const char* op, const at::Tensor& q) {
  const int major = at::cuda::getDeviceProperties(q.device().index())->major;
  TORCH_CHECK(major >= 8, op, ": the CUDA kernels need compute capability 8.0 or newer (tensor-core mma.sync, "
              "cp.async); this device has ", major, ".x");
}

// Contiguous and 16-byte aligned (cp.async and vector loads need both).
at::Tensor prepare(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone(at::MemoryFormat::Contiguous);
  return c;
}

// ---- block layouts: built on the host once per (mask, tile, device), kept in a small LRU ----
struct DeviceLayout {
  at::Tensor data;   // int32, BlockLayout::data
  at::Tensor masks;  // int64 holding BlockLayout::masks' uint64 words
  int n_tiles, fwd_ptr, fwd_idx, bwd_ptr, bwd_idx;
};

struct LayoutKey {
  int kind, text_len, image_size, conv_kernel, tile, device;
  bool operator==(const LayoutKey& o) const {
    return kind == o.kind && text_len == o.text_len && image_size == o.image_size && conv_kernel == o.conv_kernel &&
           tile == o.tile && device == o.device;
  }
};

std::shared_ptr<const DeviceLayout> get_layout(const MaskSpec& spec, const at::Device& device) {
  constexpr size_t kCapacity = 32;
  static std::mutex mutex;
  // Leaked on purpose: device tensors must not be freed by static destructors after CUDA shuts down.
  static auto* cache = new std::list<std::pair<LayoutKey, std::shared_ptr<const DeviceLayout>>>();
  // conv_kernel shapes the conv mask only: one cached layout per (kind, text_len, image_size) otherwise.
  const int ck = spec.kind == MaskKind::Conv ? spec.conv_kernel : 1;
  const LayoutKey key{static_cast<int>(spec.kind), spec.text_len, spec.image_size, ck, kSparseAttentionTile,
                      device.index()};
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = cache->begin(); it != cache->end(); ++it) {
    if (it->first == key) {
      cache->splice(cache->begin(), *cache, it);
      return cache->front().second;
    }
  }
  const BlockLayout host = build_block_layout(spec);
  auto dev = std::make_shared<DeviceLayout>();
  const auto cpu_int = at::TensorOptions().dtype(at::kInt);
  dev->data = at::from_blob(const_cast<int32_t*>(host.data.data()), {static_cast<int64_t>(host.data.size())}, cpu_int)
                  .to(device, /*non_blocking=*/false, /*copy=*/true);
  dev->masks = at::from_blob(const_cast<uint64_t*>(host.masks.data()), {static_cast<int64_t>(host.masks.size())},
                             at::TensorOptions().dtype(at::kLong))
                   .to(device, false, true);
  // The copies ran on the current stream; later calls may use another one.
  at::cuda::getCurrentCUDAStream().synchronize();
  dev->n_tiles = host.n_tiles;
  dev->fwd_ptr = host.fwd_ptr;
  dev->fwd_idx = host.fwd_idx;
  dev->bwd_ptr = host.bwd_ptr;
  dev->bwd_idx = host.bwd_idx;
  cache->emplace_front(key, dev);
  if (cache->size() > kCapacity) cache->pop_back();
  return dev;
}

SparseAttentionParams base_params(const DeviceLayout& layout, const MaskSpec& spec, int64_t bh, int64_t N, int64_t d,
                                  double scale) {
  TORCH_CHECK(bh * layout.n_tiles * 2 < std::numeric_limits<int>::max(),
              "sparse_attention: batch * heads * tiles is too large for one launch");
  SparseAttentionParams p;
  p.layout = layout.data.data_ptr<int32_t>();
  p.masks = reinterpret_cast<const uint64_t*>(layout.masks.data_ptr<int64_t>());
  p.fwd_ptr = layout.fwd_ptr;
  p.fwd_idx = layout.fwd_idx;
  p.bwd_ptr = layout.bwd_ptr;
  p.bwd_idx = layout.bwd_idx;
  p.n_tiles = layout.n_tiles;
  p.bh = static_cast<int>(bh);
  p.N = static_cast<int>(N);
  p.d = static_cast<int>(d);
  p.spec = spec;
  p.perm = seq_perm_for(spec);
  p.scale = scale;
  return p;
}

// The kernels are compiled per head-dim tile (sparse_attention_head_dim_tile); d <= tile.
template <typename scalar_t>
void fwd_by_head_dim(int64_t d, const SparseAttentionParams& p, cudaStream_t s) {
  switch (sparse_attention_head_dim_tile(static_cast<int>(d))) {
    case 64: return sparse_attention_fwd_launch<scalar_t, 64>(p, s);
    case 128: return sparse_attention_fwd_launch<scalar_t, 128>(p, s);
    case 256: return sparse_attention_fwd_launch<scalar_t, 256>(p, s);
  }
  TORCH_CHECK(false, "sparse_attention: no CUDA kernel for head dim ", d);  // unreachable past the boundary
}
template <typename scalar_t>
void bwd_by_head_dim(int64_t d, const SparseAttentionParams& p, cudaStream_t s) {
  switch (sparse_attention_head_dim_tile(static_cast<int>(d))) {
    case 64: return sparse_attention_bwd_launch<scalar_t, 64>(p, s);
    case 128: return sparse_attention_bwd_launch<scalar_t, 128>(p, s);
    case 256: return sparse_attention_bwd_launch<scalar_t, 256>(p, s);
  }
  TORCH_CHECK(false, "_sparse_attention_backward: no CUDA kernel for head dim ", d);
}

// The kernels read rows of whole 16-byte vectors: a head dim that is not a multiple of 8 runs on
// a zero-padded copy (exact: the zero columns add nothing to q.k and give zero output columns).
int64_t padded_head_dim(int64_t d) {
  constexpr int64_t a = kSparseAttentionCudaHeadDimAlign;
  return (d + a - 1) / a * a;
}
at::Tensor pad_head_dim(const at::Tensor& t, int64_t dp) {
  return t.size(3) == dp ? t : at::constant_pad_nd(t, {0, dp - t.size(3)});
}
at::Tensor unpad_head_dim(const at::Tensor& t, int64_t d) {
  return t.size(3) == d ? t : t.narrow(3, 0, d).contiguous();
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, c10::string_view kind, int64_t text_len,
                                                         int64_t image_size, int64_t conv_kernel, double scale) {
  constexpr const char* op = "sparse_attention";
  const MaskSpec spec = check_sparse_attention(op, q_in, k_in, v_in, kind, text_len, image_size, conv_kernel, scale,
                                               c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3), Dp = padded_head_dim(D);
  at::Tensor out = at::empty({B, H, N, Dp}, q_in.options());
  // lse in the accumulation type: float, double for double inputs.
  at::Tensor lse = at::empty({B, H, N}, q_in.options().dtype(q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (B * H == 0 || N == 0) return {unpad_head_dim(out, D), lse};
  check_device(op, q_in);
  const at::Tensor q = prepare(pad_head_dim(q_in, Dp)), k = prepare(pad_head_dim(k_in, Dp)),
                   v = prepare(pad_head_dim(v_in, Dp));
  const auto layout = get_layout(spec, q.device());
  SparseAttentionParams p = base_params(*layout, spec, B * H, N, Dp, scale);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_cuda",
                                  [&] { fwd_by_head_dim<scalar_t>(Dp, p, stream); });
  return {unpad_head_dim(out, D), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, c10::string_view kind, int64_t text_len, int64_t image_size,
    int64_t conv_kernel, double scale) {
  constexpr const char* op = "_sparse_attention_backward";
  const MaskSpec spec = check_sparse_attention_backward(grad_out, q_in, k_in, v_in, out_in, lse_in, kind, text_len,
                                                        image_size, conv_kernel, scale, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3), Dp = padded_head_dim(D);
  at::Tensor dq = at::empty({B, H, N, Dp}, q_in.options());
  at::Tensor dk = at::empty({B, H, N, Dp}, q_in.options());
  at::Tensor dv = at::empty({B, H, N, Dp}, q_in.options());
  if (B * H == 0 || N == 0) return {unpad_head_dim(dq, D), unpad_head_dim(dk, D), unpad_head_dim(dv, D)};
  check_device(op, q_in);
  const at::Tensor q = prepare(pad_head_dim(q_in, Dp)), k = prepare(pad_head_dim(k_in, Dp)),
                   v = prepare(pad_head_dim(v_in, Dp)), out = prepare(pad_head_dim(out_in, Dp)),
                   dout = prepare(pad_head_dim(grad_out, Dp));
  const bool is_double = q.scalar_type() == at::kDouble;
  const at::Tensor lse = lse_in.to(is_double ? at::kDouble : at::kFloat).contiguous();
  at::Tensor delta = at::empty({B * H * N}, q.options().dtype(is_double ? at::kDouble : at::kFloat));
  const auto layout = get_layout(spec, q.device());
  SparseAttentionParams p = base_params(*layout, spec, B * H, N, Dp, scale);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.lse_in = lse.data_ptr();
  p.delta = delta.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_backward_cuda",
                                  [&] { bwd_by_head_dim<scalar_t>(Dp, p, stream); });
  return {unpad_head_dim(dq, D), unpad_head_dim(dk, D), unpad_head_dim(dv, D)};
}

// ---- cached decoding: one block per (batch, head) gathers exactly the allowed keys ----
struct DecodeParams {
  const void* q;  // (B*heads, D) contiguous
  const void* k;
  const void* v;
  void* out;  // (B*heads, D)
  int64_t k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;  // element strides of the caches (the last one is 1)
  int heads, D, position, count;
  bool vec;  // every cache row is whole, 16-byte aligned vectors (else scalar loads)
  MaskSpec spec;
  double scale;
};

template <typename A>
__device__ __forceinline__ A block_reduce(A x, A* sred, bool is_max) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const A y = __shfl_xor_sync(0xffffffffu, x, off);
    x = is_max ? (y > x ? y : x) : x + y;
  }
  if (lane == 0) sred[warp] = x;
  __syncthreads();
  A r = sred[0];
  for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) r = is_max ? (sred[w] > r ? sred[w] : r) : r + sred[w];
  __syncthreads();  // sred is reused by the next reduction
  return r;
}

// 256 threads. Keys are processed in chunks of 256: thread n scores allowed key n of the chunk
// (a whole-row dot product with 16-byte loads), the chunk's softmax weights go to shared memory,
// then thread (group, d) accumulates sum_n p_n v[key_n, d] over its group's share of the chunk with
// coalesced reads of V rows; online rescaling between chunks.
template <typename scalar_t>
__global__ void __launch_bounds__(256, 1) decode_kernel(const DecodeParams p) {
  using A = acc_t<scalar_t>;
  constexpr int kThreads = 256, kVec = 16 / sizeof(scalar_t);
  __shared__ A sq[kSparseAttentionMaxCudaHeadDim], sp[kThreads], sacc[kThreads], sred[kThreads / 32];
  __shared__ int skey[kThreads];
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads, tid = threadIdx.x, D = p.D;
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + static_cast<int64_t>(bh) * D;
  const scalar_t* K = static_cast<const scalar_t*>(p.k) + b * p.k_sb + h * p.k_sh;
  const scalar_t* V = static_cast<const scalar_t*>(p.v) + b * p.v_sb + h * p.v_sh;
  for (int d = tid; d < D; d += kThreads) sq[d] = static_cast<A>(q[d]);
  __syncthreads();
  const A sl2 = static_cast<A>(p.scale) * static_cast<A>(1.4426950408889634);
  // groups of D threads split the chunk's keys for the P V sum (threads past the last group idle there).
  const int groups = kThreads / D, group = tid / D, d = tid % D;
  A m = -INFINITY, l = 0, acc = 0;
  for (int c0 = 0; c0 < p.count; c0 += kThreads) {
    const int n = c0 + tid;
    A s = -INFINITY;
    int key = 0;
    if (n < p.count) {
      key = p.spec.allowed_key(p.position, n);
      const scalar_t* kr = K + key * p.k_sl;
      A dot = 0;
      if (p.vec) {
        for (int d0 = 0; d0 < D; d0 += kVec) {
          const uint4 raw = *reinterpret_cast<const uint4*>(kr + d0);
          const scalar_t* vals = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
          for (int c = 0; c < kVec; ++c) dot += sq[d0 + c] * static_cast<A>(vals[c]);
        }
      } else {
        for (int d0 = 0; d0 < D; ++d0) dot += sq[d0] * static_cast<A>(kr[d0]);
      }
      s = dot * sl2;
    }
    skey[tid] = key;
    const A m_new = block_reduce(s > m ? s : m, sred, true);  // finite: key c0 is always allowed
    const A alpha = m == -INFINITY ? A(0) : exp2(m - m_new);
    const A pr = n < p.count ? static_cast<A>(exp2(s - m_new)) : A(0);
    sp[tid] = pr;
    l = l * alpha + block_reduce(pr, sred, false);  // its barriers also publish sp and skey
    m = m_new;
    acc *= alpha;
    const int lim = min(kThreads, p.count - c0);
    if (group < groups)
      for (int nn = group; nn < lim; nn += groups) acc += sp[nn] * static_cast<A>(V[skey[nn] * p.v_sl + d]);
    __syncthreads();  // sp and skey are rewritten by the next chunk
  }
  sacc[tid] = acc;
  __syncthreads();
  if (tid < D) {
    A sum = 0;
    for (int gi = 0; gi < groups; ++gi) sum += sacc[gi * D + tid];
    static_cast<scalar_t*>(p.out)[static_cast<int64_t>(bh) * D + tid] = static_cast<scalar_t>(sum / l);
  }
}

// Whether the kernel may read c's rows as aligned 16-byte vectors.
bool vector_rows(const at::Tensor& c) {
  const int64_t vec = 16 / static_cast<int64_t>(c.element_size());
  return c.stride(3) == 1 && c.size(3) % vec == 0 && c.stride(0) % vec == 0 && c.stride(1) % vec == 0 &&
         c.stride(2) % vec == 0 && reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0;
}

// Strided caches are read in place (a preallocated cache sliced to the current length must not be
// copied every step); a cache is copied only when that makes its rows whole aligned vectors, or
// when its last dimension is strided. Head dims that are no multiple of the vector run scalar loads.
at::Tensor decode_cache(const at::Tensor& c) {
  const int64_t vec = 16 / static_cast<int64_t>(c.element_size());
  if (vector_rows(c) || (c.size(3) % vec != 0 && c.stride(3) == 1)) return c;
  return prepare(c);
}

at::Tensor sparse_attention_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        int64_t position, c10::string_view kind, int64_t text_len, int64_t image_size,
                                        int64_t conv_kernel, double scale) {
  constexpr const char* op = "sparse_attention_decode";
  const MaskSpec spec = check_sparse_attention_decode(q_in, k_cache, v_cache, position, kind, text_len, image_size,
                                                      conv_kernel, scale, c10::DeviceType::CUDA);
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty({B, H, 1, D}, q_in.options());
  if (B * H == 0) return out;
  TORCH_CHECK(B * H < std::numeric_limits<int>::max(), op, ": batch * heads is too large for one launch");
  const at::Tensor q = q_in.contiguous(), k = decode_cache(k_cache), v = decode_cache(v_cache);
  DecodeParams p{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2), static_cast<int>(H), static_cast<int>(D),
                 static_cast<int>(position), spec.allowed_count(static_cast<int>(position)),
                 vector_rows(k) && vector_rows(v), spec, scale};
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_decode_cuda", [&] {
    decode_kernel<scalar_t><<<static_cast<unsigned>(B * H), 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("sparse_attention", &dalle_fast::sparse_attention_cuda);
  m.impl("_sparse_attention_backward", &dalle_fast::sparse_attention_backward_cuda);
  m.impl("sparse_attention_decode", &dalle_fast::sparse_attention_decode_cuda);
}
