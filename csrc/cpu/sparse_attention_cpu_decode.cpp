// The cached decode step of sparse attention on the CPU (see sparse_attention_cpu.h).
#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>

#include "sparse_attention_cpu.h"
#include "sparse_attention_cpu_math.h"

namespace dalle_fast {
namespace sparse_cpu {
namespace {

// One query per (batch, head) at `position`: gathers exactly MaskSpec::allowed_count keys through
// allowed_key, reading the caches in place (any batch/head/sequence strides, unit stride in D).
// A cache row as float: the row itself for float, else converted into tmp (D elements).
inline const float* row_as_acc(const float* r, int64_t, float*) { return r; }
inline const double* row_as_acc(const double* r, int64_t, double*) { return r; }
template <typename scalar_t>
const float* row_as_acc(const scalar_t* r, int64_t D, float* tmp) {
  for (int64_t d = 0; d < D; ++d) tmp[d] = (float)r[d];
  return tmp;
}

template <typename scalar_t>
void decode_kernel(const MaskSpec& ms, int position, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                   at::Tensor& out, double scale) {
  using acc = acc_t<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), cnt = ms.allowed_count(position);
  std::vector<int64_t> keys(cnt);
  for (int64_t n = 0; n < cnt; ++n) keys[n] = ms.allowed_key(position, (int)n);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t ks = kc.stride(2), vs = vc.stride(2);
  // Memory-bound: worth a second thread sooner than the GEMM-bound kernels.
  const int64_t grain = std::max<int64_t>(1, (kSerialWork / 8) / std::max<int64_t>(1, cnt * D));
  at::parallel_for(0, B * H, grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc> qv(D), s(cnt), ov(D), tmp(D);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* qr = qp + b * q.stride(0) + h * q.stride(1);
      const scalar_t* K = kp + b * kc.stride(0) + h * kc.stride(1);
      const scalar_t* V = vp + b * vc.stride(0) + h * vc.stride(1);
      for (int64_t d = 0; d < D; ++d) qv[d] = (acc)qr[d] * (acc)scale;
      scalar_t* orow = op + bh * D;
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          attend_one_f32(qv.data(), K, ks, V, vs, keys.data(), cnt, D, s.data(), orow);
        } else {
          attend_one_bf16(qv.data(), reinterpret_cast<const uint16_t*>(K), ks, reinterpret_cast<const uint16_t*>(V),
                          vs, keys.data(), cnt, D, s.data(), ov.data());
          for (int64_t d = 0; d < D; ++d) orow[d] = (scalar_t)ov[d];
        }
        continue;
      }
      for (int64_t n = 0; n < cnt; ++n) s[n] = dot(qv.data(), row_as_acc(K + keys[n] * ks, D, tmp.data()), D);
      const acc mx = row_max(s.data(), cnt);
      const acc sum = exp_sub_sum(s.data(), cnt, mx);
      std::fill(ov.begin(), ov.end(), acc(0));
      for (int64_t n = 0; n < cnt; ++n) axpy(ov.data(), s[n], row_as_acc(V + keys[n] * vs, D, tmp.data()), D);
      for (int64_t d = 0; d < D; ++d) orow[d] = (scalar_t)(ov[d] / sum);
    }
  });
}

}  // namespace

at::Tensor decode(const MaskSpec& ms, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  int64_t position, double scale) {
  // Only the unit stride along D is required: copying a cache would cost O(L) per step.
  auto kc = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  auto vc = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  auto qc = q.stride(3) == 1 ? q : q.contiguous();
  auto out = at::empty({q.size(0), q.size(1), 1, q.size(3)}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_decode_cpu", [&] {
    decode_kernel<scalar_t>(ms, (int)position, qc, kc, vc, out, scale);
  });
  return out;
}

}  // namespace sparse_cpu
}  // namespace dalle_fast
