// The kernels of fierce_kernels.cu built for the CPU emulation (cuda_emulation.h), behind a C
// interface for ctypes: tests/cuda_emulator.py builds this file with
//   g++ -std=c++20 -O2 -DFIERCE_EMULATE -shared -fPIC emulated_ops.cpp -o libfierce_emu.so
// and compares what the kernels compute with the torch backend, without a GPU.
// All pointers are host memory; workspaces are the caller's (any contents), except the one-launch
// counter `done_count` of the forward, which must be 0 (or nullptr for two launches). `entropy`
// (forward) and `grad_entropy` (backward) select the fused entropy (nullptr: the histogram only).
#include "../fierce_kernels.cu"

namespace {

fierce::Problem emulated_problem(const void* features, const void* vt, const void* bias,
                                 int64_t rows, int dim, int heads, int bins, int cosine,
                                 int estimator, double tau, uint64_t seed, uint64_t row_offset) {
  fierce::Problem problem{};
  problem.features = features;
  problem.vt = vt;
  problem.bias = bias;
  problem.rows = rows;
  problem.dim = dim;
  problem.heads = heads;
  problem.bins = bins;
  problem.cosine = cosine != 0;
  problem.estimator = estimator;
  problem.tau = tau;
  problem.seed = seed;
  problem.row_offset = row_offset;
  return problem;
}

// Checks of the emulation itself (tests/test_cuda_build.py): a thread's locals survive the
// fiber switches at barriers, and a barrier that some threads skip fails the launch.
__global__ void barrier_rounds_kernel(int rounds, int64_t* out) {
  FIERCE_DYNAMIC_SHARED(shared);
  auto* slots = reinterpret_cast<int64_t*>(shared);
  const unsigned t = threadIdx.x;
  int64_t value = static_cast<int64_t>(blockIdx.x) * 1000 + t;
  for (int r = 0; r < rounds; ++r) {
    slots[t] = value;
    __syncthreads();
    value = 3 * value + slots[(t + 1) % blockDim.x];  // the next thread's value of this round
    __syncthreads();
  }
  out[static_cast<int64_t>(blockIdx.x) * blockDim.x + t] = value;
}

__global__ void skipped_barrier_kernel(int* reached) {
  if (threadIdx.x % 2 == 1) return;  // odd threads never arrive
  __syncthreads();
  reached[threadIdx.x] = 1;
}

}  // namespace

extern "C" {

int fierce_emu_check_barrier_rounds(int grid, int threads, int rounds, int64_t* out) {
  FIERCE_LAUNCH(barrier_rounds_kernel, grid, threads, threads * sizeof(int64_t), nullptr, rounds,
                out);
  return static_cast<int>(cudaGetLastError());
}

int fierce_emu_check_skipped_barrier(int threads, int* reached) {
  FIERCE_LAUNCH(skipped_barrier_kernel, 1, threads, 0, nullptr, reached);
  return static_cast<int>(cudaGetLastError());
}

size_t fierce_emu_forward_shared_bytes(int mode) {
  return fierce::forward_shared_bytes(static_cast<fierce::GemmMode>(mode));
}

size_t fierce_emu_backward_shared_bytes(int mode) {
  return fierce::backward_shared_bytes(static_cast<fierce::GemmMode>(mode));
}

int fierce_emu_forward(int mode, const void* features, const void* vt, const void* bias,
                       void* histogram, void* lse, void* partials, int* flags, int64_t rows,
                       int dim, int heads, int bins, int blocks_per_head, int cosine,
                       int estimator, double tau, uint64_t seed, uint64_t row_offset,
                       unsigned* done_count, void* entropy, int entropy_mean) {
  fierce::ForwardParams params{};
  static_cast<fierce::Problem&>(params) = emulated_problem(
      features, vt, bias, rows, dim, heads, bins, cosine, estimator, tau, seed, row_offset);
  params.histogram = histogram;
  params.lse = lse;
  params.partials = partials;
  params.flags = flags;
  params.blocks_per_head = blocks_per_head;
  params.done_count = done_count;  // nullptr: forward and reduce kernels
  params.entropy = entropy;        // nullptr: the histogram only
  params.entropy_mean = entropy_mean != 0;
  return static_cast<int>(
      fierce::launch_histogram_forward(static_cast<fierce::GemmMode>(mode), params, nullptr));
}

int fierce_emu_backward(int mode, const void* grad_histogram, const void* features,
                        const void* vt, const void* bias, const void* lse, void* expected,
                        void* accumulator, void* grad_features, int64_t rows, int dim, int heads,
                        int bins, int cosine, int estimator, double tau, uint64_t seed,
                        uint64_t row_offset, const void* grad_entropy, const void* histogram,
                        int entropy_mean) {
  fierce::BackwardParams params{};
  static_cast<fierce::Problem&>(params) = emulated_problem(
      features, vt, bias, rows, dim, heads, bins, cosine, estimator, tau, seed, row_offset);
  params.grad_histogram = grad_histogram;  // nullptr when grad_entropy is given
  params.grad_entropy = grad_entropy;
  params.histogram = histogram;
  params.entropy_mean = entropy_mean != 0;
  params.lse = lse;
  params.expected = expected;
  params.accumulator = accumulator;
  params.grad_features = grad_features;
  return static_cast<int>(
      fierce::launch_histogram_backward(static_cast<fierce::GemmMode>(mode), params, nullptr));
}

// The kernels' noise words for one (row, head, quad) counter, to check Philox bit for bit.
void fierce_emu_philox(uint64_t counter, uint64_t seed, uint32_t* out) {
  const fierce::PhiloxWords words = fierce::philox4x32_10(counter, seed);
  for (int i = 0; i < 4; ++i) out[i] = words.x[i];
}

// Whether the op does the forward of this shape in one launch (fierce.h's rule).
int fierce_emu_one_launch_forward(int64_t blocks_per_head, int64_t heads, int64_t bins) {
  return fierce::one_launch_forward(blocks_per_head, heads, bins) ? 1 : 0;
}

}  // extern "C"
