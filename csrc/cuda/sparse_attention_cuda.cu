// CUDA entry points of sparse_attention, _sparse_attention_backward and sparse_attention_decode:
// argument checks, the cached block layouts, and the cached-decoding kernel. The forward and
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

#include "dalle_fast/sparse_attention_cuda.cuh"

namespace dalle_fast {
namespace {

MaskSpec make_spec(const char* op, c10::string_view kind, int64_t text_len, int64_t image_size, int64_t conv_kernel) {
  MaskKind mk = MaskKind::Full;
  if (kind == "full") mk = MaskKind::Full;
  else if (kind == "row") mk = MaskKind::Row;
  else if (kind == "column") mk = MaskKind::Column;
  else if (kind == "conv") mk = MaskKind::Conv;
  else TORCH_CHECK(false, op, ": kind must be one of 'full', 'row', 'column', 'conv', got '", std::string(kind.data(), kind.size()), "'");
  TORCH_CHECK(text_len >= 0, op, ": text_len must be >= 0, got ", text_len);
  TORCH_CHECK(image_size >= 0, op, ": image_size must be >= 0, got ", image_size);
  TORCH_CHECK(text_len + image_size * image_size < (int64_t{1} << 24), op,
              ": text_len + image_size^2 must be below 2^24, got ", text_len + image_size * image_size);
  if (mk == MaskKind::Conv) {
    TORCH_CHECK(conv_kernel >= 1 && conv_kernel % 2 == 1, op, ": conv_kernel must be a positive odd number, got ",
                conv_kernel);
  } else {
    conv_kernel = 1;  // unused: one cached layout per (kind, text_len, image_size)
  }
  return MaskSpec{mk, static_cast<int>(text_len), static_cast<int>(image_size), static_cast<int>(conv_kernel)};
}

void check_head_dim(const char* op, int64_t D) {
  TORCH_CHECK(D == 32 || D == 64 || D == 128, op, ": head_dim (the last dimension) must be 32, 64 or 128, got ", D);
}

void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", st);
}

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
  const LayoutKey key{static_cast<int>(spec.kind), spec.text_len, spec.image_size, spec.conv_kernel,
                      kSparseAttentionTile, device.index()};
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

SparseAttentionParams base_params(const DeviceLayout& layout, const MaskSpec& spec, int64_t bh, int64_t N,
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
  p.spec = spec;
  p.perm = seq_perm_for(spec);
  p.scale = scale;
  return p;
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const MaskSpec& spec) {
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (batch, heads, seq_len, head_dim), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), op, ": k must have the shape of q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == q.sizes(), op, ": v must have the shape of q ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), op, ": q, k and v must be CUDA tensors");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op, ": q, k and v must be on one device, got ",
              q.device(), ", ", k.device(), ", ", v.device());
  check_dtype(op, "q", q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.size(2) == spec.seq_len(), op, ": seq_len (q.size(2) = ", q.size(2),
              ") must equal text_len + image_size^2 = ", spec.seq_len());
  check_head_dim(op, q.size(3));
}

template <typename scalar_t>
void fwd_by_head_dim(int64_t D, const SparseAttentionParams& p, cudaStream_t s) {
  if (D == 32) sparse_attention_fwd_launch<scalar_t, 32>(p, s);
  else if (D == 64) sparse_attention_fwd_launch<scalar_t, 64>(p, s);
  else sparse_attention_fwd_launch<scalar_t, 128>(p, s);
}
template <typename scalar_t>
void bwd_by_head_dim(int64_t D, const SparseAttentionParams& p, cudaStream_t s) {
  if (D == 32) sparse_attention_bwd_launch<scalar_t, 32>(p, s);
  else if (D == 64) sparse_attention_bwd_launch<scalar_t, 64>(p, s);
  else sparse_attention_bwd_launch<scalar_t, 128>(p, s);
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, c10::string_view kind, int64_t text_len,
                                                         int64_t image_size, int64_t conv_kernel, double scale) {
  constexpr const char* op = "sparse_attention";
  const MaskSpec spec = make_spec(op, kind, text_len, image_size, conv_kernel);
  check_qkv(op, q_in, k_in, v_in, spec);
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  at::Tensor out = at::empty({B, H, N, D}, q_in.options());
  // lse in the accumulation type: float, double for double inputs.
  at::Tensor lse = at::empty({B, H, N}, q_in.options().dtype(q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  if (B * H == 0 || N == 0) return {out, lse};
  check_device(op, q_in);
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in);
  const auto layout = get_layout(spec, q.device());
  SparseAttentionParams p = base_params(*layout, spec, B * H, N, scale);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_cuda",
                                  [&] { fwd_by_head_dim<scalar_t>(D, p, stream); });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, c10::string_view kind, int64_t text_len, int64_t image_size,
    int64_t conv_kernel, double scale) {
  constexpr const char* op = "_sparse_attention_backward";
  const MaskSpec spec = make_spec(op, kind, text_len, image_size, conv_kernel);
  check_qkv(op, q_in, k_in, v_in, spec);
  TORCH_CHECK(grad_out.sizes() == q_in.sizes(), op, ": grad_out must have the shape of q ", q_in.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(out_in.sizes() == q_in.sizes(), op, ": out must have the shape of q ", q_in.sizes(), ", got ",
              out_in.sizes());
  TORCH_CHECK(grad_out.device() == q_in.device() && out_in.device() == q_in.device() && lse_in.device() == q_in.device(),
              op, ": grad_out, out and lse must be on the device of q (", q_in.device(), ")");
  TORCH_CHECK(grad_out.scalar_type() == q_in.scalar_type() && out_in.scalar_type() == q_in.scalar_type(), op,
              ": grad_out and out must have the dtype of q (", q_in.scalar_type(), ")");
  const int64_t B = q_in.size(0), H = q_in.size(1), N = q_in.size(2), D = q_in.size(3);
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H && lse_in.size(2) == N, op,
              ": lse must have shape (batch, heads, seq_len) = (", B, ", ", H, ", ", N, "), got ", lse_in.sizes());
  TORCH_CHECK(at::isFloatingType(lse_in.scalar_type()), op, ": lse must be a floating tensor, got ",
              lse_in.scalar_type());
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor dq = at::empty({B, H, N, D}, q_in.options());
  at::Tensor dk = at::empty({B, H, N, D}, q_in.options());
  at::Tensor dv = at::empty({B, H, N, D}, q_in.options());
  if (B * H == 0 || N == 0) return {dq, dk, dv};
  check_device(op, q_in);
  const at::Tensor q = prepare(q_in), k = prepare(k_in), v = prepare(v_in), out = prepare(out_in),
                   dout = prepare(grad_out);
  const bool is_double = q.scalar_type() == at::kDouble;
  const at::Tensor lse = lse_in.to(is_double ? at::kDouble : at::kFloat).contiguous();
  at::Tensor delta = at::empty({B * H * N}, q.options().dtype(is_double ? at::kDouble : at::kFloat));
  const auto layout = get_layout(spec, q.device());
  SparseAttentionParams p = base_params(*layout, spec, B * H, N, scale);
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
                                  [&] { bwd_by_head_dim<scalar_t>(D, p, stream); });
  return {dq, dk, dv};
}

// ---- cached decoding: one block per (batch, head) gathers exactly the allowed keys ----
struct DecodeParams {
  const void* q;  // (B*heads, D) contiguous
  const void* k;
  const void* v;
  void* out;  // (B*heads, D)
  int64_t k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;  // element strides of the caches (the last one is 1)
  int heads, D, position, count;
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
  __shared__ A sq[128], sp[kThreads], sacc[kThreads], sred[kThreads / 32];
  __shared__ int skey[kThreads];
  const int bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads, tid = threadIdx.x, D = p.D;
  const scalar_t* q = static_cast<const scalar_t*>(p.q) + static_cast<int64_t>(bh) * D;
  const scalar_t* K = static_cast<const scalar_t*>(p.k) + b * p.k_sb + h * p.k_sh;
  const scalar_t* V = static_cast<const scalar_t*>(p.v) + b * p.v_sb + h * p.v_sh;
  for (int d = tid; d < D; d += kThreads) sq[d] = static_cast<A>(q[d]);
  __syncthreads();
  const A sl2 = static_cast<A>(p.scale) * static_cast<A>(1.4426950408889634);
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
      for (int d0 = 0; d0 < D; d0 += kVec) {
        const uint4 raw = *reinterpret_cast<const uint4*>(kr + d0);
        const scalar_t* vals = reinterpret_cast<const scalar_t*>(&raw);
#pragma unroll
        for (int c = 0; c < kVec; ++c) dot += sq[d0 + c] * static_cast<A>(vals[c]);
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

// Strided caches are read in place (a preallocated cache sliced to the current length must not be
// copied every step); only a cache whose rows are not whole aligned 16-byte vectors is copied.
at::Tensor decode_cache(const at::Tensor& c) {
  const int64_t vec = 16 / static_cast<int64_t>(c.element_size());
  const bool ok = c.stride(3) == 1 && c.stride(0) % vec == 0 && c.stride(1) % vec == 0 && c.stride(2) % vec == 0 &&
                  reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0;
  return ok ? c : prepare(c);
}

at::Tensor sparse_attention_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                        int64_t position, c10::string_view kind, int64_t text_len, int64_t image_size,
                                        int64_t conv_kernel, double scale) {
  constexpr const char* op = "sparse_attention_decode";
  const MaskSpec spec = make_spec(op, kind, text_len, image_size, conv_kernel);
  TORCH_CHECK(q_in.dim() == 4 && q_in.size(2) == 1, op, ": q must have shape (batch, heads, 1, head_dim), got ",
              q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, op,
              ": k_cache and v_cache must have shape (batch, heads, cache_len, head_dim), got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(3);
  TORCH_CHECK(k_cache.size(0) == B && k_cache.size(1) == H && k_cache.size(3) == D, op,
              ": k_cache must have batch, heads and head_dim of q (", B, ", ", H, ", ", D, "), got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  TORCH_CHECK(q_in.is_cuda() && k_cache.is_cuda() && v_cache.is_cuda() && k_cache.device() == q_in.device() &&
                  v_cache.device() == q_in.device(),
              op, ": q, k_cache and v_cache must be CUDA tensors on one device");
  check_dtype(op, "q", q_in);
  TORCH_CHECK(k_cache.scalar_type() == q_in.scalar_type() && v_cache.scalar_type() == q_in.scalar_type(), op,
              ": q, k_cache and v_cache must have one dtype, got ", q_in.scalar_type(), ", ", k_cache.scalar_type(),
              ", ", v_cache.scalar_type());
  check_head_dim(op, D);
  TORCH_CHECK(position >= 0 && position < spec.seq_len(), op, ": position must be in [0, text_len + image_size^2 = ",
              spec.seq_len(), "), got ", position);
  TORCH_CHECK(k_cache.size(2) > position, op, ": the caches hold ", k_cache.size(2), " positions; position ", position,
              " is past their end");
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty({B, H, 1, D}, q_in.options());
  if (B * H == 0) return out;
  TORCH_CHECK(B * H < std::numeric_limits<int>::max(), op, ": batch * heads is too large for one launch");
  const at::Tensor q = q_in.contiguous(), k = decode_cache(k_cache), v = decode_cache(v_cache);
  DecodeParams p{q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2), static_cast<int>(H), static_cast<int>(D),
                 static_cast<int>(position), spec.allowed_count(static_cast<int>(position)), spec, scale};
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
