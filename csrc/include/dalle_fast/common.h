// Shared by g++ and nvcc: no ATen here.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DF_HOST_DEVICE __host__ __device__ __forceinline__
#define DF_DEVICE __device__ __forceinline__
#else
#define DF_HOST_DEVICE inline
#define DF_DEVICE inline
#endif

#include <cstdint>

namespace dalle_fast {

// Accumulation type: half and bfloat16 accumulate in float, float in float, double in double.
template <typename T> struct acc_type { using type = float; };
template <> struct acc_type<double> { using type = double; };
template <typename T> using acc_t = typename acc_type<T>::type;

}  // namespace dalle_fast
