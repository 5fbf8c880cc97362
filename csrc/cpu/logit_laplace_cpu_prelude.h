// Every header that at::vec and logit_laplace_cpu_kernel.h pull in, apart from at::vec itself,
// included under the baseline target before logit_laplace_cpu_{avx2,avx512}.cpp raise theirs (see
// there why). Checked with `g++ -H`: after this prelude, the raised-target region includes only
// ATen/cpu/vec/*, sleef.h and the compiler's intrinsics headers.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/copysign.h>
#include <c10/util/complex.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <utility>

#include "logit_laplace_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// sleef.h declares its AVX/AVX-512 entry points only under -mavx/-mavx512f macros, which a target
// pragma does not set. The declarations are plain extern "C" prototypes (the vector types come from
// x86intrin.h in any target), so declare them here with the macros set just for this header.
#include <x86intrin.h>
#if !defined(__AVX__)
#define DALLE_FAST_LL_UNDEF_AVX
#define __AVX__ 1
#endif
#if !defined(__AVX512F__)
#define DALLE_FAST_LL_UNDEF_AVX512F
#define __AVX512F__ 1
#endif
#include <sleef.h>
#ifdef DALLE_FAST_LL_UNDEF_AVX
#undef __AVX__
#undef DALLE_FAST_LL_UNDEF_AVX
#endif
#ifdef DALLE_FAST_LL_UNDEF_AVX512F
#undef __AVX512F__
#undef DALLE_FAST_LL_UNDEF_AVX512F
#endif
#endif
