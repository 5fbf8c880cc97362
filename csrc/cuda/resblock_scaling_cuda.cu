// CUDA kernels of per-resblock gradient scaling (schemas in csrc/ops.cpp, per-element math in
// include/dalle_fast/resblock_scaling.h - the same code the CPU kernels run - and checks in
// resblock_scaling_checks.h). Nothing syncs with the host: the scale is read from device memory and
// a block's flag is set on the device (__syncthreads_or per CUDA block, then one plain store of
// `true`; concurrent stores all write the same value).
//  - resblock_grad_scale: a grid-stride elementwise kernel over one activation gradient.
//  - resblock_unscale_grads_: one launch over every parameter gradient of every block: the host
//    writes a table (pointer, numel, block, dtype per tensor; tensor and offset per chunk of kChunk
//    elements) into pinned memory, copies it to the device on the current stream without waiting,
//    and each CUDA block walks chunks of the table. Tensors of different dtypes go through the same
//    launch (a switch on the dtype code per chunk).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "dalle_fast/resblock_scaling.h"
#include "dalle_fast/resblock_scaling_checks.h"

namespace dalle_fast {
namespace resblock {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 1 << 16;  // elements per chunk of the multi-tensor table
constexpr int kMaxBlocks = 4096;

#define DF_RESBLOCK_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

template <typename in_t, typename out_t, typename acc>
__global__ void __launch_bounds__(kThreads)
grad_scale_kernel(const in_t* __restrict__ g, out_t* __restrict__ out, int64_t n, const float* __restrict__ scales,
                  bool* __restrict__ flags, int64_t block, bool unscale) {
  const acc s = static_cast<acc>(scales[block]);
  bool bad = false;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    out[i] = scale_filter<out_t, acc>(static_cast<acc>(g[i]), s, unscale, &bad);
  if (__syncthreads_or(bad) && threadIdx.x == 0) flags[block] = true;
}

at::Tensor grad_scale_cuda(const at::Tensor& grad, const at::Tensor& scales, at::Tensor& nonfinite, int64_t block,
                           bool unscale, at::ScalarType dtype) {
  check_grad_scale(grad, scales, nonfinite, block, dtype);
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options().dtype(dtype));
  const int64_t n = g.numel();
  if (n == 0) return out;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
  const auto stream = at::cuda::getCurrentCUDAStream();
  DF_RESBLOCK_TYPES(g.scalar_type(), "resblock_grad_scale_cuda", [&] {
    using in_t = scalar_t;
    DF_RESBLOCK_TYPES(dtype, "resblock_grad_scale_cuda_out", [&] {
      using out_t = scalar_t;
      using acc = acc_t<std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<out_t, double>, double,
                                           float>>;
      grad_scale_kernel<in_t, out_t, acc><<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<in_t>(), out.mutable_data_ptr<out_t>(), n, scales.const_data_ptr<float>(),
          nonfinite.mutable_data_ptr<bool>(), block, unscale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

enum DtypeCode : int64_t { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };

// The table: per tensor (ptr, numel, block, dtype code), then per chunk (tensor index, first element).
struct Table {
  const int64_t* tensors;  // 4 per tensor
  const int64_t* chunks;   // 2 per chunk
  int64_t num_chunks;
};

template <typename T>
__device__ __forceinline__ bool unscale_span(T* p, int64_t begin, int64_t end, float s) {
  using acc = acc_t<T>;
  bool bad = false;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) p[i] = unscale_in_place<T, acc>(p[i], acc(s), &bad);
  return bad;
}

__global__ void __launch_bounds__(kThreads)
unscale_grads_kernel(Table table, const float* __restrict__ scales, bool* __restrict__ flags) {
  for (int64_t c = blockIdx.x; c < table.num_chunks; c += gridDim.x) {
    const int64_t t = table.chunks[2 * c], begin = table.chunks[2 * c + 1];
    const int64_t* meta = table.tensors + 4 * t;
    const int64_t end = min(begin + kChunk, meta[1]), block = meta[2];
    void* ptr = reinterpret_cast<void*>(meta[0]);
    const float s = scales[block];
    bool bad;
    switch (meta[3]) {
      case kF64: bad = unscale_span(static_cast<double*>(ptr), begin, end, s); break;
      case kF16: bad = unscale_span(static_cast<at::Half*>(ptr), begin, end, s); break;
      case kBF16: bad = unscale_span(static_cast<at::BFloat16*>(ptr), begin, end, s); break;
      default: bad = unscale_span(static_cast<float*>(ptr), begin, end, s); break;
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) flags[block] = true;
  }
}

int64_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return kF32;
  }
}

void unscale_grads_cuda(at::TensorList grads, at::IntArrayRef blocks, const at::Tensor& scales, at::Tensor& nonfinite) {
  check_unscale_grads(grads, blocks, scales, nonfinite);
  const c10::cuda::CUDAGuard guard(scales.device());
  std::vector<int64_t> host;
  host.reserve(grads.size() * 6);
  int64_t num_chunks = 0;
  for (size_t t = 0; t < grads.size(); ++t) {
    const at::Tensor& g = grads[t];
    host.insert(host.end(), {reinterpret_cast<int64_t>(g.data_ptr()), g.numel(), blocks[t],
                             dtype_code(g.scalar_type())});
    num_chunks += (g.numel() + kChunk - 1) / kChunk;
  }
  if (num_chunks == 0) return;
  const int64_t chunk_offset = static_cast<int64_t>(host.size());
  for (size_t t = 0; t < grads.size(); ++t)
    for (int64_t b = 0; b < grads[t].numel(); b += kChunk) host.insert(host.end(), {static_cast<int64_t>(t), b});
  at::Tensor pinned = at::empty({static_cast<int64_t>(host.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(host.begin(), host.end(), pinned.mutable_data_ptr<int64_t>());
  const at::Tensor dev = pinned.to(scales.device(), /*non_blocking=*/true);
  const Table table{dev.const_data_ptr<int64_t>(), dev.const_data_ptr<int64_t>() + chunk_offset, num_chunks};
  const int nblocks = static_cast<int>(std::min<int64_t>(num_chunks, kMaxBlocks));
  unscale_grads_kernel<<<nblocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      table, scales.const_data_ptr<float>(), nonfinite.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace resblock
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("resblock_grad_scale", &dalle_fast::resblock::grad_scale_cuda);
  m.impl("resblock_unscale_grads_", &dalle_fast::resblock::unscale_grads_cuda);
}
