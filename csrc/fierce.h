// Interface between the op definitions (fierce_ops.cpp, compiled by the host compiler with torch's
// headers) and the kernels (fierce_kernels.cu, compiled by nvcc without them).
#pragma once

#include <cstddef>
#include <cstdint>

#ifdef FIERCE_EMULATE
#include "emulation/cuda_emulation.h"
#else
#include <cuda_runtime_api.h>
#endif

namespace fierce {

// How the logit GEMM multiplies, chosen from the features' dtype (and allow_tf32 for float32).
enum class GemmMode : int {
  kHalf = 0,    // float16 tensor cores (16x16x16), float32 accumulation
  kBFloat16,    // bfloat16 tensor cores (16x16x16), float32 accumulation
  kTF32,        // float32 inputs on tf32 tensor cores (16x16x8), float32 accumulation
  kFloat,       // float32 inputs, exact float32 FMAs
  kDouble,      // float64 inputs, float64 FMAs
};

enum Estimator : int { kGumbelHard = 0, kGumbelSoft = 1, kSoftmax = 2 };

// Pointers are device pointers to contiguous tensors. "acc" is float, or double for kDouble.
// What both directions share: the inputs, the sizes and the options of one problem.
struct Problem {
  const void* features;  // (B, D), features dtype
  const void* vt;        // (C, K, D), features dtype: the projected dictionary, bins-major
  const void* bias;      // (C, K) acc, or nullptr when the similarity has none
  int64_t rows;          // B
  int dim;               // D
  int heads;             // C
  int bins;              // K
  bool cosine;           // rows scaled by 1/|r_b|
  int estimator;
  double tau;
  uint64_t seed;
  uint64_t row_offset;
};

struct ForwardParams : Problem {
  void* histogram;       // (C, K) acc, out
  void* lse;             // (B, C) acc, out
  void* partials;        // (P, C, K): int32 counts (gumbel_hard) or acc sums, workspace
  int* flags;            // (P, C) int32 workspace: a block saw a non-finite log-sum-exp
  int blocks_per_head;   // P: row-tile groups per head (each block walks tiles p, p+P, ...)
  // One launch (tiny problems, see one_launch_forward): a device counter, 0 at launch; the last
  // block of the forward kernel to finish reduces the partials and leaves the counter at 0 for
  // the next launch on the same stream. nullptr: a separate reduce kernel does it.
  unsigned* done_count;
  // The entropy of the histogram (bits), out: (C,) acc, or one value, their mean over heads, when
  // entropy_mean; nullptr: the histogram only. Fused into the reduction's end.
  void* entropy;
  bool entropy_mean;
};

struct BackwardParams : Problem {
  const void* grad_histogram;  // dL/dp (C, K) acc; nullptr when grad_entropy is set
  // Or dL/dH of the entropy: (C,) acc, or one value when entropy_mean; the kernels then form
  // dL/dp tile by tile from it and the histogram (C, K) acc saved by the forward.
  const void* grad_entropy;
  const void* histogram;
  bool entropy_mean;
  const void* lse;             // (B, C) acc, saved by the forward
  void* expected;              // (B, C, 2) acc workspace, used when K > kTileBins: (sum_k y G,
                               // 1 / n) with y = exp(z - lse) / n, n = sum_k exp(z - lse)
  void* accumulator;           // (padded_rows, padded_dim) acc workspace for sum delta v; may
                               // be grad_features itself when the shapes and dtypes agree
  void* grad_features;         // (B, D) features dtype, out
};

// The paper's guard inside the entropy's logarithm (fierce_ext.backends.ENTROPY_EPS).
constexpr double kEntropyEps = 1e-21;

// Tile sizes the host needs for workspace shapes.
constexpr int kTileRows = 32;     // rows of features per block
constexpr int kTileBins = 128;    // bins per logit tile
constexpr int kTileDim = 128;     // feature columns per gradient tile

// Tiny problems (the paper's: B ~ 200-256, C = 1, K = 100) do the whole forward in one launch:
// the last block to finish sums the P x C x K partials, work that one block does in a few us.
constexpr int64_t kOneLaunchEntries = 8192;
__host__ __device__ inline bool one_launch_forward(int64_t blocks_per_head, int64_t heads,
                                                   int64_t bins) {
  return blocks_per_head * heads * bins <= kOneLaunchEntries;
}

// Shapes of the gradient accumulator workspace (whole tiles, so tensor-core stores stay in bounds).
__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t padded_rows(int64_t rows) { return ceil_div(rows, kTileRows) * kTileRows; }
__host__ __device__ inline int64_t padded_dim(int64_t dim) { return ceil_div(dim, kTileDim) * kTileDim; }

// Dynamic shared memory each kernel of a mode needs (bytes), for checks against the device limit.
size_t forward_shared_bytes(GemmMode mode);
size_t backward_shared_bytes(GemmMode mode);

// Enqueue the kernels on `stream`; return the first launch error (cudaSuccess when none).
cudaError_t launch_histogram_forward(GemmMode mode, const ForwardParams& params, cudaStream_t stream);
cudaError_t launch_histogram_backward(GemmMode mode, const BackwardParams& params, cudaStream_t stream);

}  // namespace fierce
