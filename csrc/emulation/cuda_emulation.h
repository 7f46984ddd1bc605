// A small CPU emulation of the CUDA features fierce_kernels.cu uses, so that the kernels' logic
// (tiling, bounds, barriers, warp reductions, online log-sum-exp, partial sums) runs and is tested
// on machines without a GPU. Compile fierce_kernels.cu as C++20 with -DFIERCE_EMULATE.
//
// Each block runs as blockDim.x cooperative fibers on the calling thread, switched at every
// barrier (__syncthreads, and the per-warp exchange of the shuffles); a barrier that some threads
// of the block skip is detected as a deadlock and fails the launch. Blocks run one after another,
// threads in a fixed order, so runs are deterministic. WMMA fragments hold the whole 16 x 16 tile
// in every lane (the kernels only touch fragment elements through fill/load/store/mma and an
// elementwise tf32 rounding). Dynamic shared memory starts filled with 0xFF bytes (NaN floats) to
// expose reads before writes.
//
// FIERCE_EMU_SCHEDULE (read at each launch) changes the order, to expose races that a fixed order
// hides: "reverse" runs the blocks and, in every round, the threads in reverse order (the last
// block to finish is block 0); "shuffle:N" draws a new order of threads per round and of blocks
// per launch from the seed N. Race-free kernels give the same bits in every schedule.
//
// Not emulated: timing, memory-ordering bugs that real hardware could expose (races are only
// found when they change results here), the hardware's accumulation order inside an MMA, and the
// last bits of the CUDA math library (glibc's expf/logf are used).
#pragma once

// Fibers are entered once with makecontext/setcontext, then switched with _setjmp/_longjmp:
// swapcontext also saves and restores the signal mask, a system call on every switch that took
// about half of an emulated kernel's time. Jumping between stacks is what _FORTIFY_SOURCE's
// longjmp check forbids, so it must be off before the first system header.
#undef _FORTIFY_SOURCE

#include <math.h>
#include <setjmp.h>
#include <ucontext.h>

#if defined(__USE_FORTIFY_LEVEL) && __USE_FORTIFY_LEVEL > 0
#error "cuda_emulation.h must precede every system header (_FORTIFY_SOURCE breaks _longjmp)"
#endif

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <algorithm>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

// ------------------------------------------------------------------------ runtime API subset

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
using cudaStream_t = void*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid value";
}

namespace fierce_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

struct Fiber {
  ucontext_t entry;  // the first switch into the fiber (its stack and start function)
  jmp_buf resume;    // every later one: where the fiber yielded
  bool started = false;
  bool done = false;
};

// A barrier of `size` fibers: arrivals wait (yield) until the generation moves on.
struct Barrier {
  unsigned size = 0;
  unsigned arrived = 0;
  uint64_t generation = 0;
};

struct BlockState {
  jmp_buf scheduler;
  std::vector<Fiber> fibers;
  unsigned current = 0;
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> exchange;  // one slot per thread for the shuffles
  int or_flag = 0;
  uint64_t arrivals = 0;  // every barrier arrival, for the deadlock check
  std::vector<float> mma_scratch;  // one 16 x 16 tile per warp
  unsigned char* shared = nullptr;
};

inline BlockState* current_block = nullptr;
inline int last_error = 0;

}  // namespace fierce_emu

// One OS thread runs every fiber, so these are plain globals, set before each fiber switch.
inline fierce_emu::Dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace fierce_emu {

// Back to the scheduler; returns when the scheduler resumes this fiber.
inline void yield() {
  BlockState* block = current_block;
  if (_setjmp(block->fibers[block->current].resume) == 0) _longjmp(block->scheduler, 1);
}

// From the scheduler into `fiber` until it yields or finishes. Not inlined, so that the only
// frame that _setjmp saves is this one (no caller's variable lives across the jump).
[[gnu::noinline]] inline void run_until_yield(BlockState& block, Fiber& fiber) {
  if (_setjmp(block.scheduler) != 0) return;
  if (fiber.started) _longjmp(fiber.resume, 1);
  fiber.started = true;
  setcontext(&fiber.entry);
}

inline void arrive_and_wait(Barrier& barrier) {
  ++current_block->arrivals;
  const uint64_t generation = barrier.generation;
  if (++barrier.arrived == barrier.size) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) yield();
}

}  // namespace fierce_emu

inline cudaError_t cudaGetLastError() {
  const int error = fierce_emu::last_error;
  fierce_emu::last_error = 0;
  return static_cast<cudaError_t>(error);
}

template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}

// ------------------------------------------------------------------------ device intrinsics

inline void __syncthreads() { fierce_emu::arrive_and_wait(fierce_emu::current_block->block_barrier); }

inline int __syncthreads_or(int predicate) {
  auto* block = fierce_emu::current_block;
  __syncthreads();
  if (predicate) block->or_flag = 1;
  __syncthreads();
  const int result = block->or_flag;
  __syncthreads();
  if (threadIdx.x == 0) block->or_flag = 0;
  __syncthreads();
  return result;
}

template <typename T>
inline T __shfl_xor_sync(unsigned /*mask*/, T value, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffled values are at most 8 bytes");
  auto* block = fierce_emu::current_block;
  const unsigned warp = threadIdx.x / 32;
  const unsigned source = threadIdx.x ^ static_cast<unsigned>(offset);
  std::memcpy(&block->exchange[threadIdx.x], &value, sizeof(T));
  fierce_emu::arrive_and_wait(block->warp_barriers[warp]);
  T result;
  std::memcpy(&result, &block->exchange[source], sizeof(T));
  fierce_emu::arrive_and_wait(block->warp_barriers[warp]);
  return result;
}

inline int atomicAdd(int* address, int value) {
  const int old = *address;  // fibers never interleave inside this function
  *address = old + value;
  return old;
}

// CUDA's atomicInc: old >= limit ? 0 : old + 1, returns old.
inline unsigned atomicInc(unsigned* address, unsigned limit) {
  const unsigned old = *address;
  *address = old >= limit ? 0u : old + 1u;
  return old;
}

// One thread runs the fibers of one block at a time, blocks in order: memory is always coherent.
inline void __threadfence() {}

template <typename T>
inline T __ldcg(const T* address) { return *address; }

// ------------------------------------------------------------------------ 16-bit floats

namespace fierce_emu {
inline uint32_t float_bits(float x) { uint32_t u; std::memcpy(&u, &x, 4); return u; }
inline float bits_float(uint32_t u) { float x; std::memcpy(&x, &u, 4); return x; }
}  // namespace fierce_emu

struct __half { uint16_t bits; };
struct __nv_bfloat16 { uint16_t bits; };

// GCC's _Float16 converts with round-to-nearest-even, as __float2half_rn does.
inline float __half2float(__half h) {
  _Float16 value;
  std::memcpy(&value, &h.bits, 2);
  return static_cast<float>(value);
}

inline __half __float2half_rn(float x) {
  const _Float16 value = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &value, 2);
  return h;
}

inline float __bfloat162float(__nv_bfloat16 h) {
  return fierce_emu::bits_float(static_cast<uint32_t>(h.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  uint32_t u = fierce_emu::float_bits(x);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x7FFFFFu)) {
    return __nv_bfloat16{static_cast<uint16_t>((u >> 16) | 0x40u)};  // quiet NaN
  }
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

// ------------------------------------------------------------------------ WMMA

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

inline float __float_to_tf32(float x) {  // cvt.rna.tf32.f32: nearest, ties away from zero
  uint32_t u = fierce_emu::float_bits(x);
  if ((u & 0x7F800000u) == 0x7F800000u) return x;
  u += 0x1000u;
  u &= 0xFFFFE000u;
  return fierce_emu::bits_float(u);
}

namespace detail {
template <typename Use, int M, int N, int K> struct Shape;
template <int M, int N, int K> struct Shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct Shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct Shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };
template <typename T> struct Storage { using type = T; };
template <> struct Storage<precision::tf32> { using type = float; };
inline float widen(float x) { return x; }
inline float widen(__half x) { return __half2float(x); }
inline float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
}  // namespace detail

// Elements stored as the logical matrix, row-major.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  using element_type = typename detail::Storage<T>::type;
  static constexpr int rows = detail::Shape<Use, M, N, K>::rows;
  static constexpr int cols = detail::Shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols;
  element_type x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, typename fragment<Use, M, N, K, T, Layout>::element_type value) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = value;
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
inline void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* ptr, unsigned ldm) {
  static_assert(std::is_same<typename fragment<Use, M, N, K, T, Layout>::element_type, P>::value,
                "pointer type must match the fragment's element type");
  using F = fragment<Use, M, N, K, T, Layout>;
  for (int r = 0; r < F::rows; ++r) {
    for (int c = 0; c < F::cols; ++c) {
      f.x[r * F::cols + c] = std::is_same<Layout, col_major>::value ? ptr[r + static_cast<size_t>(c) * ldm]
                                                                   : ptr[static_cast<size_t>(r) * ldm + c];
    }
  }
}

template <int M, int N, int K>
inline void load_matrix_sync(fragment<accumulator, M, N, K, float>& f, const float* ptr, unsigned ldm, layout_t layout) {
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      f.x[r * N + c] = layout == mem_row_major ? ptr[static_cast<size_t>(r) * ldm + c] : ptr[r + static_cast<size_t>(c) * ldm];
}

// A warp-wide store: every lane holds the same tile, lane 0 writes it (callers synchronise
// before anyone reads it, as on the GPU).
template <int M, int N, int K>
inline void store_matrix_sync(float* ptr, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < M; ++r)
    for (int c = 0; c < N; ++c)
      (layout == mem_row_major ? ptr[static_cast<size_t>(r) * ldm + c] : ptr[r + static_cast<size_t>(c) * ldm]) = f.x[r * N + c];
}

// Every lane holds the same operands (WMMA calls are warp-uniform), so lane 0 multiplies and the
// warp's other lanes copy its result.
template <int M, int N, int K, typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
                     const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  auto* block = fierce_emu::current_block;
  const unsigned warp = threadIdx.x / 32;
  float* result = block->mma_scratch.data() + static_cast<size_t>(warp) * M * N;
  if (threadIdx.x % 32 == 0) {
    float bt[K * N];
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < N; ++j) bt[j * K + k] = detail::widen(b.x[k * N + j]);
    for (int i = 0; i < M; ++i) {
      float ai[K];
      for (int k = 0; k < K; ++k) ai[k] = detail::widen(a.x[i * K + k]);
      for (int j = 0; j < N; ++j) {
        float sum = c.x[i * N + j];
        for (int k = 0; k < K; ++k) sum = fmaf(ai[k], bt[j * K + k], sum);
        result[i * N + j] = sum;
      }
    }
  }
  fierce_emu::arrive_and_wait(block->warp_barriers[warp]);
  for (int i = 0; i < M * N; ++i) d.x[i] = result[i];
  fierce_emu::arrive_and_wait(block->warp_barriers[warp]);
}

}  // namespace wmma
}  // namespace nvcuda

// ------------------------------------------------------------------------ launches

namespace fierce_emu {

inline unsigned char* shared_memory() { return current_block->shared; }

constexpr size_t kFiberStack = 256 * 1024;

// The launch's schedule (FIERCE_EMU_SCHEDULE): 0 forward, 1 reverse, 2 shuffle (seed).
struct Schedule {
  int kind = 0;
  uint64_t seed = 0;
  static Schedule from_environment() {
    Schedule schedule;
    const char* value = std::getenv("FIERCE_EMU_SCHEDULE");
    if (value == nullptr) return schedule;
    const std::string text(value);
    if (text == "reverse") schedule.kind = 1;
    if (text.rfind("shuffle:", 0) == 0) {
      schedule.kind = 2;
      schedule.seed = std::strtoull(text.c_str() + 8, nullptr, 10);
    }
    return schedule;
  }
  // An order of 0 .. n-1 for round `round` of `block` (blocks: block = ~0).
  void order(std::vector<unsigned>& out, unsigned n, uint64_t block, uint64_t round) const {
    out.resize(n);
    std::iota(out.begin(), out.end(), 0u);
    if (kind == 1) std::reverse(out.begin(), out.end());
    if (kind == 2) {
      std::mt19937_64 generator(seed * 0x9E3779B97F4A7C15ull ^ (block << 20) ^ round);
      std::shuffle(out.begin(), out.end(), generator);
    }
  }
};

template <typename Entry>
struct FiberStart {
  static void run(unsigned low, unsigned high) {
    const uintptr_t address = (static_cast<uintptr_t>(high) << 32) | low;
    (*reinterpret_cast<Entry*>(address))();
    BlockState* block = current_block;
    block->fibers[block->current].done = true;
    _longjmp(block->scheduler, 1);  // never returns here: the stack is dropped or reused
  }
};

// Runs `grid` blocks of `threads` fibers each; a deadlock (a barrier that cannot complete) or a
// bad configuration sets the error cudaGetLastError reports.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), unsigned grid, unsigned threads, size_t shared_bytes,
                   cudaStream_t, Args&&... args) {
  if (threads == 0 || threads > 1024 || shared_bytes > 228 * 1024) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  std::vector<unsigned char> shared(shared_bytes + 128);
  unsigned char* aligned = shared.data() + (128 - reinterpret_cast<uintptr_t>(shared.data()) % 128) % 128;
  auto entry = [&]() { kernel(args...); };
  using Entry = decltype(entry);
  const uintptr_t address = reinterpret_cast<uintptr_t>(&entry);
  const Schedule schedule = Schedule::from_environment();
  std::vector<unsigned> block_order, thread_order;
  schedule.order(block_order, grid, ~0ull, 0);
  // The fibers' stacks, reused by every block of the launch.
  std::vector<std::unique_ptr<char[]>> stacks(threads);
  for (auto& stack : stacks) stack.reset(new char[kFiberStack]);
  for (unsigned i = 0; i < grid && last_error == 0; ++i) {
    const unsigned b = block_order[i];
    std::fill(shared.begin(), shared.end(), static_cast<unsigned char>(0xFF));  // NaN floats
    BlockState block;
    block.shared = aligned;
    block.block_barrier.size = threads;
    const unsigned warps = (threads + 31) / 32;
    block.warp_barriers.resize(warps);
    for (unsigned w = 0; w < warps; ++w) block.warp_barriers[w].size = (w + 1) * 32 <= threads ? 32 : threads - w * 32;
    block.exchange.assign(threads, 0);
    block.mma_scratch.assign(static_cast<size_t>(warps) * 256, 0.0f);
    block.fibers.resize(threads);
    for (unsigned t = 0; t < threads; ++t) {
      Fiber& fiber = block.fibers[t];
      getcontext(&fiber.entry);
      fiber.entry.uc_stack.ss_sp = stacks[t].get();
      fiber.entry.uc_stack.ss_size = kFiberStack;
      fiber.entry.uc_link = nullptr;
      makecontext(&fiber.entry, reinterpret_cast<void (*)()>(&FiberStart<Entry>::run), 2,
                  static_cast<unsigned>(address & 0xFFFFFFFFu), static_cast<unsigned>(address >> 32));
    }
    current_block = &block;
    blockIdx = Dim3{b, 0, 0};
    blockDim = Dim3{threads, 1, 1};
    gridDim = Dim3{grid, 1, 1};
    // Round robin until every fiber is done; a full round in which no barrier moved and no fiber
    // finished is a deadlock.
    unsigned finished = 0;
    uint64_t round = 0;
    while (finished < threads) {
      const uint64_t before = block.arrivals;
      unsigned finished_before = finished;
      schedule.order(thread_order, threads, b, round++);
      for (const unsigned t : thread_order) {
        if (block.fibers[t].done) continue;
        block.current = t;
        threadIdx = Dim3{t, 0, 0};
        run_until_yield(block, block.fibers[t]);
        if (block.fibers[t].done) ++finished;
      }
      if (finished < threads && finished == finished_before && block.arrivals == before) {
        std::fprintf(stderr, "fierce_emu: deadlock in block %u: %u of %u threads finished\n", b,
                     finished, threads);
        last_error = cudaErrorInvalidValue;
        break;  // the waiting fibers are abandoned with their stacks
      }
    }
    current_block = nullptr;
  }
}

}  // namespace fierce_emu

#define FIERCE_DYNAMIC_SHARED(name) unsigned char* name = ::fierce_emu::shared_memory()
#define FIERCE_LAUNCH(kernel, grid, threads, shared, stream, ...) \
  ::fierce_emu::launch(kernel, static_cast<unsigned>(grid), threads, shared, stream, __VA_ARGS__)
