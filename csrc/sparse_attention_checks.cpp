// The _check_sparse_attention* ops: sparse attention's shared boundary
// (dalle_fast/sparse_attention_checks.h) for a device type given by name, registered for every
// backend (CompositeExplicitAutograd: CPU, CUDA and meta tensors alike), so that tests on a machine
// without a GPU can ask whether the CUDA kernels would accept a configuration.
#include <torch/library.h>

#include <string_view>

#include "dalle_fast/sparse_attention_checks.h"

namespace dalle_fast {
namespace {

void check_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::string_view kind,
                   int64_t text_len, int64_t image_size, int64_t conv_kernel, double scale,
                   std::string_view device_type) {
  check_sparse_attention("sparse_attention", q, k, v, kind, text_len, image_size, conv_kernel, scale,
                         parse_device_type(device_type));
}

void check_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, std::string_view kind, int64_t text_len,
                    int64_t image_size, int64_t conv_kernel, double scale, std::string_view device_type) {
  check_sparse_attention_backward(grad_out, q, k, v, out, lse, kind, text_len, image_size, conv_kernel, scale,
                                  parse_device_type(device_type));
}

void check_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t position,
                  std::string_view kind, int64_t text_len, int64_t image_size, int64_t conv_kernel, double scale,
                  std::string_view device_type) {
  check_sparse_attention_decode(q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel, scale,
                                parse_device_type(device_type));
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CompositeExplicitAutograd, m) {
  m.impl("_check_sparse_attention", &dalle_fast::check_forward);
  m.impl("_check_sparse_attention_backward", &dalle_fast::check_backward);
  m.impl("_check_sparse_attention_decode", &dalle_fast::check_decode);
}
