// logit_laplace_loss CPU kernels built for AVX-512 (chosen at run time by logit_laplace_cpu.cpp when
// at::get_cpu_capability() says so). The build compiles every file for the baseline x86-64 ISA, so
// this file raises its own target with a pragma, after including every non-vector header under the
// baseline target: inline functions of those headers are shared (COMDAT) with other translation
// units and must not be compiled with AVX-512 instructions. Only at::vec (namespaced by
// CPU_CAPABILITY) and this file's own kernels (internal linkage) see the raised target.
#include "logit_laplace_cpu_prelude.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC push_options
// ATen's vector headers carry `#pragma unroll` (ignored by g++) and 64-byte vector ABI notes.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define DALLE_FAST_LL_NS cpu_avx512
#include "logit_laplace_cpu_kernel.h"
#pragma GCC diagnostic pop
#pragma GCC pop_options
#else
// Not x86-64: the dispatcher never selects this ISA; keep the symbols defined.
#define DALLE_FAST_LL_NS cpu_avx512
namespace dalle_fast::logit_laplace::cpu_avx512 {
void forward(const CpuArgs& args) { cpu_default::forward(args); }
void backward(const CpuArgs& args) { cpu_default::backward(args); }
}  // namespace dalle_fast::logit_laplace::cpu_avx512
#endif
