// Philox4x32-10, the counter-based generator of Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3" (SC 2011). A pure function of (counter, key): any thread on any device can draw the
// numbers of any element without shared state, so results do not depend on thread count, launch
// shape or device. Shared by g++ and nvcc (no ATen). Checked against the Random123 known-answer
// vectors in tests/test_gumbel_softmax.py (through dalle_fast.reference.gumbel_softmax.philox4x32).
#pragma once
#include "dalle_fast/common.h"

// Force-inlined on the host too: the CPU kernels are compiled once per ISA (with_cpu_isa) and a
// helper left out of line would run the baseline ISA's scalar code inside the vector loops.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define DF_MATH DF_HOST_DEVICE
#elif defined(__GNUC__)
#define DF_MATH inline __attribute__((always_inline))
#else
#define DF_MATH inline
#endif

namespace dalle_fast {

struct PhiloxKey {
  uint32_t k0, k1;
};

struct Philox4 {
  uint32_t x0, x1, x2, x3;
};

// Multipliers and Weyl key increments from the paper (the Random123 defaults).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

DF_MATH PhiloxKey philox_key_from_seed(uint64_t seed) {
  return {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
}

// One round. The 32x32->64 product written as a widening multiply: g++ vectorises it (vpmuludq)
// and nvcc turns it into mul.lo / mul.hi.
DF_MATH Philox4 philox_round(Philox4 c, PhiloxKey k) {
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c.x0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c.x2;
  return {static_cast<uint32_t>(p1 >> 32) ^ c.x1 ^ k.k0, static_cast<uint32_t>(p1),
          static_cast<uint32_t>(p0 >> 32) ^ c.x3 ^ k.k1, static_cast<uint32_t>(p0)};
}

// Ten rounds, the key bumped between rounds (Random123's philox4x32_R order).
DF_MATH Philox4 philox4x32_10(Philox4 c, PhiloxKey k) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k.k0 += kPhiloxW0;
      k.k1 += kPhiloxW1;
    }
    c = philox_round(c, k);
  }
  return c;
}

DF_MATH uint32_t philox_word(const Philox4& r, int i) {
  return i == 0 ? r.x0 : i == 1 ? r.x1 : i == 2 ? r.x2 : r.x3;
}

}  // namespace dalle_fast
