// The noise rule's uniforms on the CPU, for the torch backend (fierce_ext/noise.py):
//
//   fierce_ext::philox_uniform_(Tensor(a!) out, int seed, int row_offset) -> ()
//
// fills `out` (B, C, K), contiguous float32 or float64, with u[b,h,k] of the rule for rows
// numbered from row_offset, using the CUDA kernels' own Philox (philox.cuh) compiled for the
// host: the same bits as the numpy form of noise.py, about 5x faster on one core, and split
// over torch's intra-op threads for large batches.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

// philox.cuh is written for nvcc; compiled for the host, its qualifiers are plain inline.
#ifndef __CUDACC__
#ifndef __device__
#define __device__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif
#endif
#include "philox.cuh"

namespace fierce {
namespace {

template <typename T>
void fill_uniform(T* out, int64_t rows, int heads, int bins, uint64_t seed, uint64_t row_offset) {
  const int64_t quads = (bins + 3) / 4;
  // At least ~16k values per task: smaller ones cost more to schedule than to compute.
  const int64_t grain = std::max<int64_t>(1, 16384 / bins);
  at::parallel_for(0, rows * heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row_head = begin; row_head < end; ++row_head) {
      const int64_t b = row_head / heads;
      const int h = static_cast<int>(row_head % heads);
      const uint64_t first = noise_counter(row_offset, b, heads, h, bins, 0);
      T* values = out + row_head * bins;
      // Whole quads first, in a loop without a bound per word (about 1.5x faster), then the
      // last quad's bins < 4.
      int64_t q = 0;
      for (; 4 * q + 4 <= bins; ++q) {
        const PhiloxWords words = philox4x32_10(first + static_cast<uint64_t>(q), seed);
        for (int w = 0; w < 4; ++w) values[4 * q + w] = uniform_from_word<T>(words.x[w]);
      }
      if (q < quads) {
        const PhiloxWords words = philox4x32_10(first + static_cast<uint64_t>(q), seed);
        for (int64_t k = 4 * q; k < bins; ++k) values[k] = uniform_from_word<T>(words.x[k - 4 * q]);
      }
    }
  });
}

void philox_uniform_(at::Tensor& out, int64_t seed, int64_t row_offset) {
  TORCH_CHECK(out.device().is_cpu(), "philox_uniform_: out must be a CPU tensor, got ",
              out.device());
  TORCH_CHECK(out.dim() == 3, "philox_uniform_: out must be (rows, heads, bins), got shape ",
              out.sizes());
  TORCH_CHECK(out.is_contiguous(), "philox_uniform_: out must be contiguous");
  TORCH_CHECK(out.size(1) >= 1 && out.size(1) <= INT32_MAX && out.size(2) >= 1 &&
              out.size(2) <= INT32_MAX, "philox_uniform_: heads and bins must be in [1, 2^31), "
              "got shape ", out.sizes());
  TORCH_CHECK(seed >= 0, "philox_uniform_: seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(row_offset >= 0, "philox_uniform_: row_offset must be >= 0, got ", row_offset);
  const int64_t rows = out.size(0);
  const int heads = static_cast<int>(out.size(1)), bins = static_cast<int>(out.size(2));
  const auto key = static_cast<uint64_t>(seed);
  const auto offset = static_cast<uint64_t>(row_offset);
  if (out.scalar_type() == at::kFloat) {
    fill_uniform(out.data_ptr<float>(), rows, heads, bins, key, offset);
  } else if (out.scalar_type() == at::kDouble) {
    fill_uniform(out.data_ptr<double>(), rows, heads, bins, key, offset);
  } else {
    TORCH_CHECK(false, "philox_uniform_: out must be float32 or float64, got ", out.scalar_type());
  }
}

}  // namespace
}  // namespace fierce

TORCH_LIBRARY_FRAGMENT(fierce_ext, m) {
  m.def("philox_uniform_(Tensor(a!) out, int seed, int row_offset) -> ()");
}

TORCH_LIBRARY_IMPL(fierce_ext, CPU, m) {
  m.impl("philox_uniform_", &fierce::philox_uniform_);
}
