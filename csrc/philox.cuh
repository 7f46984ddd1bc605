// The shared Gumbel noise rule (fierce_ext/noise.py), for the CUDA kernels (and, compiled for the
// host, the CPU op of noise_cpu.cpp).
//
//   Q       = ceil(K / 4)
//   n       = ((row_offset + b) * C + h) * Q + k / 4             (64-bit counter)
//   x0..x3  = Philox4x32-10(counter = (n lo32, n hi32, 0, 0), key = (seed lo32, seed hi32))
//   u       = (2 * (x_{k mod 4} >> 9) + 1) / 2^24
//   g       = -log(-log(u))
//
// The words are bit-identical to the torch backend's; g uses logf (float) or log (double) and is
// bit-identical to torch's CUDA log as long as this file is not compiled with --use_fast_math.
#pragma once

#include <cstdint>

namespace fierce {

struct PhiloxWords {
  uint32_t x[4];
};

// a * b as two words: returns the low one and stores the high one. On the GPU __umulhi and a low
// multiply; on the host (noise_cpu.cpp, the kernel emulator) one 64-bit product, which takes
// half the instructions of separate high and low multiplies there.
__device__ __forceinline__ uint32_t mul_hi_lo(uint32_t a, uint32_t b, uint32_t* high) {
#if defined(__CUDA_ARCH__)
  *high = __umulhi(a, b);
  return a * b;
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *high = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
#endif
}

__device__ __forceinline__ PhiloxWords philox4x32_10(uint64_t counter, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(counter);
  uint32_t c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)  // host compilers (noise_cpu.cpp) do not know the pragma
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mul_hi_lo(0xD2511F53u, c0, &hi0);
    const uint32_t lo1 = mul_hi_lo(0xCD9E8D57u, c2, &hi1);
    const uint32_t next0 = hi1 ^ c1 ^ k0;
    const uint32_t next2 = hi0 ^ c3 ^ k1;
    c0 = next0;
    c1 = lo1;
    c2 = next2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  PhiloxWords out;
  out.x[0] = c0;
  out.x[1] = c1;
  out.x[2] = c2;
  out.x[3] = c3;
  return out;
}

// u = (2 * (x >> 9) + 1) * 2^-24: exact in float (24 significant bits), never 0 or 1. The odd
// integer is below 2^24, so it converts from int32 exactly (x86 converts int32 to float in one
// instruction, uint32 in several).
template <typename T> __device__ __forceinline__ T uniform_from_word(uint32_t word) {
  return static_cast<T>(static_cast<int32_t>(((word >> 9) << 1) + 1u)) *
         static_cast<T>(5.9604644775390625e-08);
}

__device__ __forceinline__ float gumbel_from_word(uint32_t word, float /*tag*/) {
  return -logf(-logf(uniform_from_word<float>(word)));
}

__device__ __forceinline__ double gumbel_from_word(uint32_t word, double /*tag*/) {
  return -log(-log(uniform_from_word<double>(word)));
}

// The counter of the first bin of the quad holding bin k (k a multiple of 4).
__device__ __forceinline__ uint64_t noise_counter(uint64_t row_offset, int64_t b, int heads, int h,
                                                  int bins, int k) {
  const uint64_t quads = (static_cast<uint64_t>(bins) + 3u) / 4u;
  return ((row_offset + static_cast<uint64_t>(b)) * static_cast<uint64_t>(heads) +
          static_cast<uint64_t>(h)) * quads + static_cast<uint64_t>(k / 4);
}

}  // namespace fierce
