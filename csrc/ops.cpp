// Every schema of the dalle_fast op library. Kernels live in cpu/<op>_cpu.cpp and cuda/<op>_cuda.cu,
// fake kernels and autograd in dalle_fast/ops/<op>.py.
#include <torch/library.h>

#include <string>

#ifdef DALLE_FAST_PYTHON_MODULE
#include <Python.h>
extern "C" {
// `import dalle_fast._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

namespace dalle_fast {
std::string build_info() {
#ifdef WITH_CUDA
  return "cpu,cuda";
#else
  return "cpu";
#endif
}
// "<toolkit>|<TORCH_CUDA_ARCH_LIST>" the CUDA kernels were built with (setup.py), "" without them.
std::string cuda_build_info() {
#if defined(WITH_CUDA) && defined(DALLE_FAST_CUDA_BUILD)
  return DALLE_FAST_CUDA_BUILD;
#elif defined(WITH_CUDA)
  return "unknown|unknown";
#else
  return "";
#endif
}
}  // namespace dalle_fast

TORCH_LIBRARY(dalle_fast, m) {
  m.def("_build_info() -> str", &dalle_fast::build_info);
  m.def("_build_cuda_info() -> str", &dalle_fast::cuda_build_info);

  // ---- gumbel_softmax (begin) ----
  // seed: one-element int64 tensor on logits' device, read by the kernel (no host sync on CUDA);
  // the noise of each element is a pure function of (seed, flat index), see gumbel_softmax.h.
  // gumbels: standard-Gumbel noise of logits' shape and dtype that replaces the drawn noise.
  m.def("gumbel_softmax(Tensor logits, Tensor seed, Tensor? gumbels, float tau, int dim) -> Tensor");
  // Returns (exact one-hot of the argmax of (logits + g) / tau, the soft sample); the soft sample
  // is an empty tensor unless return_soft (it is only needed for the straight-through gradient).
  m.def("gumbel_softmax_hard(Tensor logits, Tensor seed, Tensor? gumbels, float tau, int dim, "
        "bool return_soft) -> (Tensor, Tensor)");
  // d logits = y * (grad - sum(grad * y, dim)) / tau, y the soft sample.
  m.def("_gumbel_softmax_backward(Tensor grad, Tensor y, float tau, int dim) -> Tensor");
  // One-hot of torch.argmax(logits, dim) in logits' dtype (no noise).
  m.def("one_hot_argmax(Tensor logits, int dim) -> Tensor");
  // ---- gumbel_softmax (end) ----

  // ---- logit_laplace (begin) ----
  // x (B, C, H, W) in [0, 1]; stats (B, 2C, H, W) = (mu, ln b); reduction "none" | "sum" | "mean".
  // Negative log-likelihood of the logit-Laplace distribution of x' = (1 - 2 eps) x + eps.
  m.def("logit_laplace_loss(Tensor x, Tensor stats, float eps, str reduction) -> Tensor");
  // Returns (grad_stats (B, 2C, H, W), grad_x (B, C, H, W), or an empty (0,) tensor unless compute_grad_x).
  m.def("_logit_laplace_loss_backward(Tensor grad, Tensor x, Tensor stats, float eps, str reduction, "
        "bool compute_grad_x) -> (Tensor, Tensor)");
  // ---- logit_laplace (end) ----

  // ---- sparse_attention (begin) ----
  // kind: "full" | "row" | "column" | "conv"; q, k, v: (B, heads, N, D), N = text_len + image_size^2.
  // Returns the output and the log-sum-exp of each query row (B, heads, N) in fp32 for the backward
  // (fp64 when q is fp64, so float64 gradients stay exact).
  m.def("sparse_attention(Tensor q, Tensor k, Tensor v, str kind, int text_len, int image_size, "
        "int conv_kernel, float scale) -> (Tensor, Tensor)");
  m.def("_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "str kind, int text_len, int image_size, int conv_kernel, float scale) -> (Tensor, Tensor, Tensor)");
  // One query per sequence at absolute index `position`: q (B, heads, 1, D); caches (B, heads, L, D), L > position.
  m.def("sparse_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, int position, str kind, "
        "int text_len, int image_size, int conv_kernel, float scale) -> Tensor");
  // The shared boundary of the three ops above (csrc/include/dalle_fast/sparse_attention_checks.h)
  // for device_type "cpu" or "cuda", whatever the tensors' device: raises what that device's kernel
  // would raise, returns nothing. Reads shapes and dtypes only (meta tensors do).
  m.def("_check_sparse_attention(Tensor q, Tensor k, Tensor v, str kind, int text_len, int image_size, "
        "int conv_kernel, float scale, str device_type) -> ()");
  m.def("_check_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "str kind, int text_len, int image_size, int conv_kernel, float scale, str device_type) -> ()");
  m.def("_check_sparse_attention_decode(Tensor q, Tensor k_cache, Tensor v_cache, int position, str kind, "
        "int text_len, int image_size, int conv_kernel, float scale, str device_type) -> ()");
  // ---- sparse_attention (end) ----

  // ---- diffusion (begin) ----
  // x0 (B, ...): per sample s = max(1, torch.quantile(|x0|, percentile), linear interpolation), by
  // selection; returns (clamp(x0, -s, s) / s in x0's dtype, s as float64 (B,), pivots: int64 (B, 2)
  // flat indices in the sample of the two elements s interpolates (-1 where s = 1), or (0,) unless
  // return_pivots). See include/dalle_fast/diffusion.h.
  m.def("dynamic_threshold(Tensor x0, float percentile, bool return_pivots) -> (Tensor, Tensor, Tensor)");
  m.def("_dynamic_threshold_backward(Tensor grad, Tensor x0, Tensor scale, Tensor pivots, float percentile) -> Tensor");
  // One classifier-free-guided sampling step, fused: pred = uncond + guidance (cond - uncond) (cond
  // alone when uncond is None), the x0 estimate (parameterization "eps" | "v" | "x0"), thresholding
  // ("dynamic" at percentile | "static": clamp to [-1, 1] | "none"), the "ddpm" posterior or "ddim"
  // (eta) update with in-kernel Philox normal noise for (seed, offset). alpha_bar_t, alpha_bar_prev:
  // float64 (B,) on x_t's device. Returns (x_prev, thresholded x0 or (0,) unless return_x0).
  m.def("guided_step(Tensor cond, Tensor? uncond, Tensor x_t, Tensor alpha_bar_t, Tensor alpha_bar_prev, "
        "float guidance, str parameterization, str sampler, float eta, str threshold, float percentile, "
        "Tensor seed, int offset, bool return_x0) -> (Tensor, Tensor)");
  // ---- diffusion (end) ----

  // ---- transformer_decode_step (begin) ----
  // One cached sampling step of DALLE (csrc/decode_step.cpp): tokens (B,) are image token `index`;
  // params in the order _build_decode_step_param_names(depth) returns (DALLE's state_dict keys,
  // stated once in include/dalle_fast/decode_step_params.h). Checks every argument, then writes each
  // layer's k/v at text_len + index into its caches (B, heads, L, dim_head); returns the fp32 image
  // logits (B, image vocab) of token index + 1.
  m.def("transformer_decode_step(Tensor tokens, int index, Tensor[] params, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, str[] kinds, int text_len, int image_size, int conv_kernel, int heads, "
        "float eps, float scale) -> Tensor");
  m.def("_build_decode_step_param_names(int depth) -> str[]");
  // ---- transformer_decode_step (end) ----

  // ---- householder_qr (begin) ----
  // A (batch, rows, cols), rows >= cols: Q (batch, rows, cols) with orthonormal columns, the thin Q of
  // A + eps * I (eps on the first cols diagonal entries) by Householder reflections, R's diagonal made
  // non-negative; computed in fp32 (fp64 for fp64), stored in A's dtype. A zero column gives an
  // orthonormal Q column, never NaN (PowerSGD's orthogonalisation, dalle_fast.distributed).
  m.def("householder_qr(Tensor A, float eps) -> Tensor");
  // ---- householder_qr (end) ----

  // ---- resblock_scaling (begin) ----
  // Per-resblock gradient scaling (the paper's Appendix D; dalle_fast/amp). scales: float32 (num_blocks,),
  // nonfinite: bool (num_blocks,), both on grad's device; the kernels read scales[block] and set
  // nonfinite[block] = true on a NaN/Inf (never cleared), so nothing syncs with the host.
  // out = filter((unscale ? grad / s : grad * s) rounded to dtype), s = scales[block]; the filter sets
  // NaN/Inf to 0 and flags the block. Entering a branch: unscale=false; leaving it: unscale=true.
  m.def("resblock_grad_scale(Tensor grad, Tensor scales, Tensor(a!) nonfinite, int block, bool unscale, "
        "ScalarType dtype) -> Tensor");
  // grads[i] /= scales[blocks[i]] in place (contiguous tensors, any float dtypes mixed, one call);
  // nonfinite[blocks[i]] = true where grads[i] holds a NaN/Inf after the division.
  m.def("resblock_unscale_grads_(Tensor(a!)[] grads, int[] blocks, Tensor scales, Tensor(b!) nonfinite) -> ()");
  // ---- resblock_scaling (end) ----
}
