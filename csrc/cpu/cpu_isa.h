// The instruction set the CPU kernels may use, decided once at run time: ATen's CPU capability
// (so ATEN_CPU_CAPABILITY overrides it as it does for ATen; its AVX512 level means avx512f, bw, vl
// and dq), plus avx512_bf16 for the bf16 dot-product kernels. Every hand-vectorised kernel is
// compiled for its ISA alone (target attributes or pragmas) and reached only through these checks.
#pragma once
#include <ATen/ATen.h>

#include <string>

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

}  // namespace dalle_fast
