// The instruction set the CPU kernels may use, decided once at run time: ATen's CPU capability
// (so ATEN_CPU_CAPABILITY overrides it as it does for ATen; its AVX512 level means avx512f, bw, vl
// and dq), plus avx512_bf16 for the bf16 dot-product kernels. Every hand-vectorised kernel is
// compiled for its ISA alone (target attributes or pragmas) and reached only through these checks;
// auto-vectorised loops go through with_cpu_isa. The one run-time ISA mechanism of the CPU kernels.
#pragma once
#include <ATen/ATen.h>

#include <string>

// A loop body for with_cpu_isa: always inlined, so it is compiled for the ISA of its caller.
#if defined(__GNUC__)
#define DF_INLINE inline __attribute__((always_inline))
#else
#define DF_INLINE inline
#endif

namespace dalle_fast {

enum class CpuIsa { kDefault, kAvx2, kAvx512 };

inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return CpuIsa::kAvx512;
    if (cap == "AVX2") return CpuIsa::kAvx2;
#endif
    return CpuIsa::kDefault;
  }();
  return isa;
}

inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = cpu_isa() == CpuIsa::kAvx512 && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// Calls f() inside a function compiled for the ISA cpu_isa() picked (AVX-512: x86-64-v4, AVX2:
// x86-64-v3, else the baseline) with f and everything it calls inlined there (flatten), so that GCC
// vectorises f's loops for that ISA. f should be a loop over raw pointers (no ATen calls: those
// would be inlined too). The branch costs about what an ifunc call does.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
template <typename F>
__attribute__((target("arch=x86-64-v4"), flatten)) inline auto isa_call_avx512(const F& f) {
  return f();
}
template <typename F>
__attribute__((target("arch=x86-64-v3"), flatten)) inline auto isa_call_avx2(const F& f) {
  return f();
}
template <typename F> inline auto with_cpu_isa(const F& f) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return isa_call_avx512(f);
    case CpuIsa::kAvx2: return isa_call_avx2(f);
    default: return f();
  }
}
#else
template <typename F> inline auto with_cpu_isa(const F& f) { return f(); }
#endif

}  // namespace dalle_fast
