// Fused CUDA kernels of the FIERCE histogram (forward) and its gradient (backward).
//
// The math is fierce_ext/backends/chunked.py's (README.md, The math): with the projected dictionary v
// (stored bins-major as vt[h][k][:]), the bias c and the row scale a_b (1/|r_b| for cosine),
//
//   s[b,h,k] = a_b (r_b . v_hk) + c_hk          z = (s + g) / tau   (g = 0 for "softmax")
//   lse[b,h] = logsumexp_k z                    y = exp(z - lse) / sum_k exp(z - lse)
//   p[h,k]   = mean_b onehot(argmax_k z)  (gumbel_hard)   or   mean_b y   (otherwise)
//   delta    = y (G - sum_k y G) / (B tau)
//   dr_b     = a_b sum_hk delta v_hk  -  [cosine] a_b^2 (sum_hk delta s) r_b
//
// Every kernel works on tiles of kTileRows rows of features. The logit GEMM of a (row tile, head,
// bin tile) is computed on tensor cores (WMMA) or with FMAs into a shared-memory tile, and an
// epilogue turns it into logits; no B x C x K tensor ever reaches global memory.
//
//   forward:  forward_kernel   one block per (row-tile group, head): running max / argmax /
//                              log-sum-exp over the bin tiles (a second sweep for the soft
//                              estimators when K > kTileBins), a partial histogram per block;
//                              for tiny problems its last block also does the two kernels below
//             reduce_kernel    sums the partials in a fixed order, divides by B, poisons
//             entropy_kernel   H[h] = -sum_k p log2(p + eps) (or its mean), when asked for
//   backward: expected_kernel  sum_k y G and 1 / sum_k y per (row, head), when K > kTileBins
//             gradient_kernel  one block per row tile: delta tile by tile, fused with the
//                              delta . vt GEMM into a float accumulator that the block owns
//             Both take G = dL/dp tile by tile into shared memory (grad_tile): as given, or, when
//             the entropy's gradient comes in, G[h,k] = -w[h] (log2(p + eps) + p / ((p + eps) ln 2))
//
// Deterministic: no floating-point atomics; every sum has a fixed order for a given device
// (integer atomics count the hard histogram, which is exact in any order).
#ifdef FIERCE_EMULATE
#include "emulation/cuda_emulation.h"  // CPU emulation for tests without a GPU
#else
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#define FIERCE_DYNAMIC_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#define FIERCE_LAUNCH(kernel, grid, threads, shared, stream, ...) \
  kernel<<<grid, threads, shared, stream>>>(__VA_ARGS__)
#endif

#include <climits>
#include <cstdint>
#include <type_traits>

#include "fierce.h"
#include "philox.cuh"

namespace fierce {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int BM = kTileRows;       // rows per tile
constexpr int BN = kTileBins;       // bins per logit tile
constexpr int BD = kTileDim;        // feature columns per gradient tile
constexpr int TPR = kThreads / BM;  // threads sharing a row in the epilogues (8)
constexpr int QPT = BN / 4 / TPR;   // quads of 4 bins per thread (one Philox call each)
constexpr int CPT = 4 * QPT;        // bins per thread and tile (16)
constexpr int LDC = BN + 4;         // row stride of the float tile Cs (padding against bank conflicts)
constexpr int LDD = BN + 8;         // row stride of the delta tile Ds
constexpr int LDV = BD + 8;         // row stride of the dictionary tile Vs
static_assert(BD <= BN, "the gradient tile reuses the logit tile's shared memory");
static_assert(TPR <= 32 && (TPR & (TPR - 1)) == 0, "a row's threads must sit in one warp");
static_assert(BM % 16 == 0 && BN % 16 == 0 && BD % 16 == 0, "WMMA tiles are 16 x 16");
static_assert((BM / 16) * (BN / 16) % kWarps == 0, "logit fragments split evenly over warps");
static_assert((BM / 16) * (BD / 16) % kWarps == 0, "gradient fragments split evenly over warps");

// ------------------------------------------------------------------------------------ modes

// In: the features' dtype (also the dictionary's, as the host prepares it). Acc: what everything
// accumulates and the epilogues compute in. ZFrag/ZK: the logit GEMM's WMMA fragment type and
// depth (tensor-core modes only). DIn: the element type of the gradient GEMM delta . vt, and
// DFrag/DK its fragments; float16 features use tf32 there because delta ~ 1/B underflows
// float16. BK: feature columns (logit GEMM) and bins (gradient GEMM) staged per step.
template <GemmMode M> struct Traits;

template <> struct Traits<GemmMode::kHalf> {
  using In = __half;
  using Acc = float;
  static constexpr bool kWmma = true;
  using ZFrag = __half;
  static constexpr int ZK = 16;
  using DIn = float;
  using DFrag = wmma::precision::tf32;
  static constexpr int DK = 8;
  static constexpr int BK = 32;
};

template <> struct Traits<GemmMode::kBFloat16> {
  using In = __nv_bfloat16;
  using Acc = float;
  static constexpr bool kWmma = true;
  using ZFrag = __nv_bfloat16;
  static constexpr int ZK = 16;
  using DIn = __nv_bfloat16;
  using DFrag = __nv_bfloat16;
  static constexpr int DK = 16;
  static constexpr int BK = 32;
};

template <> struct Traits<GemmMode::kTF32> {
  using In = float;
  using Acc = float;
  static constexpr bool kWmma = true;
  using ZFrag = wmma::precision::tf32;
  static constexpr int ZK = 8;
  using DIn = float;
  using DFrag = wmma::precision::tf32;
  static constexpr int DK = 8;
  static constexpr int BK = 32;
};

template <> struct Traits<GemmMode::kFloat> {
  using In = float;
  using Acc = float;
  static constexpr bool kWmma = false;
  using DIn = float;
  static constexpr int BK = 32;
};

template <> struct Traits<GemmMode::kDouble> {
  using In = double;
  using Acc = double;
  static constexpr bool kWmma = false;
  using DIn = double;
  static constexpr int BK = 16;  // keeps the float64 tiles within 100 KB of shared memory
};

// Conversions between storage types and the compute type (round to nearest even, as torch's .to).
template <typename T> struct Cvt;
template <> struct Cvt<__half> {
  static __device__ __forceinline__ float to(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from(float x) { return __float2half_rn(x); }
};
template <> struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Cvt<float> {
  static __device__ __forceinline__ float to(float x) { return x; }
  static __device__ __forceinline__ float from(float x) { return x; }
};
template <> struct Cvt<double> {
  static __device__ __forceinline__ double to(double x) { return x; }
  static __device__ __forceinline__ double from(double x) { return x; }
};

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }
__device__ __forceinline__ float log2_(float x) { return log2f(x); }
__device__ __forceinline__ double log2_(double x) { return log2(x); }
__device__ __forceinline__ float sqrt_(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_(double x) { return sqrt(x); }
template <typename T> __device__ __forceinline__ T infinity() { return static_cast<T>(INFINITY); }
template <typename T> __device__ __forceinline__ T quiet_nan() { return static_cast<T>(NAN); }

// Shared-memory layout of a mode: Cs (logit or gradient tile, Acc), Ds (delta tile), and a region
// used either by the logit GEMM's staging tiles As/Bs or by the gradient GEMM's Vs.
template <GemmMode M> struct Layout {
  using T = Traits<M>;
  static constexpr int LDA = T::BK + 8;  // row stride of As and Bs (a multiple of 8 elements)
  static constexpr size_t align(size_t bytes) { return (bytes + 127) / 128 * 128; }
  static constexpr size_t cs_bytes = align(sizeof(typename T::Acc) * BM * LDC);
  static constexpr size_t a_bytes = align(sizeof(typename T::In) * BM * LDA);
  static constexpr size_t b_bytes = align(sizeof(typename T::In) * BN * LDA);
  static constexpr size_t ds_bytes = align(sizeof(typename T::DIn) * BM * LDD);
  static constexpr size_t vs_bytes = align(sizeof(typename T::DIn) * T::BK * LDV);
  static constexpr size_t staging_bytes = a_bytes + b_bytes > vs_bytes ? a_bytes + b_bytes : vs_bytes;
  static constexpr size_t forward_bytes = cs_bytes + a_bytes + b_bytes;
  static constexpr size_t gs_bytes = align(sizeof(typename T::Acc) * BN);
  static constexpr size_t gs_offset = cs_bytes + ds_bytes + staging_bytes;  // G of a bin tile
  static constexpr size_t backward_bytes = gs_offset + gs_bytes;
};

// ------------------------------------------------------------------- reductions within a row

// The TPR threads of a row are consecutive lanes of one warp. Butterfly (xor) reductions leave the
// same value in every lane of the group, in a fixed order. Every thread of the block must call them.
template <typename V> __device__ __forceinline__ V group_sum(V value) {
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

template <typename V> __device__ __forceinline__ V group_max(V value) {
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset >>= 1) {
    const V other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
}

__device__ __forceinline__ int group_or(int value) {
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset >>= 1) {
    value |= __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}

// The largest value, ties to the lowest index (torch.argmax's rule). NaN never enters `value`.
template <typename V> __device__ __forceinline__ void group_argmax(V& value, int& index) {
#pragma unroll
  for (int offset = TPR / 2; offset > 0; offset >>= 1) {
    const V other_value = __shfl_xor_sync(0xffffffffu, value, offset);
    const int other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (other_value > value || (other_value == value && other_index < index)) {
      value = other_value;
      index = other_index;
    }
  }
}

// a_b = 1 / max(|r_b|, 1e-12) (dictionary.row_scale); a NaN norm stays NaN, as clamp_min keeps it.
// A norm past Acc's range (|r_b| > ~1.8e19 in float32) is taken from r_b / max|r_b|, as
// dictionary.vector_norm does (an Inf entry gives NaN there, as in torch). Every thread of the
// block calls this; the rare case is a block-wide branch, so its shuffles see whole warps.
template <typename In, typename Acc>
__device__ Acc row_scale(const In* __restrict__ features, int64_t b, bool row_ok, int dim, int sub) {
  Acc squares = Acc(0);
  if (row_ok) {
    for (int d = sub; d < dim; d += TPR) {
      const Acc x = Cvt<In>::to(features[b * dim + d]);
      squares += x * x;
    }
  }
  squares = group_sum(squares);
  Acc norm = sqrt_(squares);
  const bool overflow = norm == infinity<Acc>();
  if (__syncthreads_or(overflow)) {
    Acc peak = Acc(0);
    if (overflow) {
      for (int d = sub; d < dim; d += TPR) {
        const Acc x = Cvt<In>::to(features[b * dim + d]);
        const Acc magnitude = x < Acc(0) ? -x : x;
        peak = magnitude > peak ? magnitude : peak;
      }
    }
    peak = group_max(peak);
    Acc scaled = Acc(0);
    if (overflow) {
      for (int d = sub; d < dim; d += TPR) {
        const Acc x = Cvt<In>::to(features[b * dim + d]) / peak;
        scaled += x * x;
      }
    }
    scaled = group_sum(scaled);
    if (overflow) norm = sqrt_(scaled) * peak;
  }
  const Acc eps = Acc(1e-12);
  return Acc(1) / (norm < eps ? eps : norm);
}

// ---------------------------------------------------------------------------- the logit GEMM

template <typename Frag> __device__ __forceinline__ void round_to_tf32(Frag& fragment) {
#pragma unroll
  for (int t = 0; t < fragment.num_elements; ++t) {
    fragment.x[t] = wmma::__float_to_tf32(fragment.x[t]);
  }
}

// Cs[m][n] = sum_d r[b0 + m][d] * vt_head[k0 + n][d] for the tile's BM x BN block (zero outside
// the matrices). Starts with a barrier (callers may still read Cs or the staging region) and ends
// with one (Cs complete).
template <GemmMode M>
__device__ void logit_tile(const typename Traits<M>::In* __restrict__ features,
                           const typename Traits<M>::In* __restrict__ vt_head, int64_t rows,
                           int dim, int bins, int64_t b0, int k0, unsigned char* staging,
                           typename Traits<M>::Acc* Cs) {
  using T = Traits<M>;
  using In = typename T::In;
  using Acc = typename T::Acc;
  constexpr int BK = T::BK;
  constexpr int LDA = Layout<M>::LDA;
  In* As = reinterpret_cast<In*>(staging);
  In* Bs = reinterpret_cast<In*>(staging + Layout<M>::a_bytes);
  const int tid = threadIdx.x;
  const In zero = Cvt<In>::from(Acc(0));

  // Each chunk of BK columns goes global -> registers -> shared memory; the next chunk's global
  // loads are issued before the current chunk's multiplies, so their latency overlaps them.
  constexpr int NA = BM * BK / kThreads;
  constexpr int NB = BN * BK / kThreads;
  static_assert(BM * BK % kThreads == 0 && BN * BK % kThreads == 0, "whole staging loads");
  In ra[NA], rb[NB];
  auto fetch = [&](int d0) {
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      const int idx = tid + i * kThreads;
      const int64_t b = b0 + idx / BK;
      const int d = d0 + idx % BK;
      ra[i] = (b < rows && d < dim) ? features[b * dim + d] : zero;
    }
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      const int idx = tid + i * kThreads;
      const int k = k0 + idx / BK;
      const int d = d0 + idx % BK;
      rb[i] = (k < bins && d < dim) ? vt_head[static_cast<int64_t>(k) * dim + d] : zero;
    }
  };
  auto stage = [&](int d0) {
    __syncthreads();  // the previous chunk's (or the caller's) readers are done
#pragma unroll
    for (int i = 0; i < NA; ++i) {
      const int idx = tid + i * kThreads;
      As[(idx / BK) * LDA + idx % BK] = ra[i];
    }
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      const int idx = tid + i * kThreads;
      Bs[(idx / BK) * LDA + idx % BK] = rb[i];
    }
    __syncthreads();
    if (d0 + BK < dim) fetch(d0 + BK);
  };
  fetch(0);

  if constexpr (T::kWmma) {
    constexpr int NFN = BN / 16;
    constexpr int FPW = (BM / 16) * NFN / kWarps;
    const int warp = tid / 32;
    wmma::fragment<wmma::accumulator, 16, 16, T::ZK, float> acc[FPW];
#pragma unroll
    for (int i = 0; i < FPW; ++i) wmma::fill_fragment(acc[i], 0.0f);
    for (int d0 = 0; d0 < dim; d0 += BK) {
      stage(d0);
#pragma unroll
      for (int i = 0; i < FPW; ++i) {
        const int f = warp * FPW + i;
        const int fm = f / NFN;
        const int fn = f % NFN;
#pragma unroll
        for (int kk = 0; kk < BK; kk += T::ZK) {
          // A = r rows (row-major), B = vt rows read as a (d, k) column-major matrix.
          wmma::fragment<wmma::matrix_a, 16, 16, T::ZK, typename T::ZFrag, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, T::ZK, typename T::ZFrag, wmma::col_major> bfrag;
          wmma::load_matrix_sync(a, As + fm * 16 * LDA + kk, LDA);
          wmma::load_matrix_sync(bfrag, Bs + fn * 16 * LDA + kk, LDA);
          if constexpr (std::is_same<typename T::ZFrag, wmma::precision::tf32>::value) {
            round_to_tf32(a);
            round_to_tf32(bfrag);
          }
          wmma::mma_sync(acc[i], a, bfrag, acc[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < FPW; ++i) {
      const int f = warp * FPW + i;
      wmma::store_matrix_sync(Cs + (f / NFN) * 16 * LDC + (f % NFN) * 16, acc[i], LDC,
                              wmma::mem_row_major);
    }
  } else {
    constexpr int NPT = BN / TPR;  // output columns per thread: n = sub + TPR * j
    const int m = tid / TPR;
    const int sub = tid % TPR;
    Acc acc[NPT];
#pragma unroll
    for (int j = 0; j < NPT; ++j) acc[j] = Acc(0);
    for (int d0 = 0; d0 < dim; d0 += BK) {
      stage(d0);
#pragma unroll 4
      for (int kk = 0; kk < BK; ++kk) {
        const Acc a = Cvt<In>::to(As[m * LDA + kk]);
#pragma unroll
        for (int j = 0; j < NPT; ++j) acc[j] += a * Cvt<In>::to(Bs[(sub + TPR * j) * LDA + kk]);
      }
    }
#pragma unroll
    for (int j = 0; j < NPT; ++j) Cs[m * LDC + sub + TPR * j] = acc[j];
  }
  __syncthreads();
}

// ---------------------------------------------------------------------------- the epilogue

// The bins a thread owns in a tile: c = 4 j + w -> column n = 4 (sub + TPR j) + w.
__device__ __forceinline__ int column_of(int c, int sub) { return 4 * (sub + TPR * (c / 4)) + c % 4; }

struct LogitArgs {
  int heads;
  int bins;
  bool noisy;
  uint64_t seed;
  uint64_t row_offset;
};

// s and z = (s + g) / tau for the thread's CPT bins of row b in the tile at k0; returns the mask
// of valid entries (row in the batch, bin < K). Division by tau is a multiplication by 1/tau, as
// torch's CUDA division by a scalar does.
template <typename Acc>
__device__ __forceinline__ unsigned tile_logits(const Acc* Cs, int m, int sub, int64_t b, bool row_ok,
                                                int h, int k0, const Acc* __restrict__ bias,
                                                Acc scale, Acc inv_tau, const LogitArgs& args,
                                                Acc (&s)[CPT], Acc (&z)[CPT]) {
  unsigned valid = 0u;
#pragma unroll
  for (int j = 0; j < QPT; ++j) {
    const int n0 = 4 * (sub + TPR * j);
    const int kq = k0 + n0;
    PhiloxWords words = {{0u, 0u, 0u, 0u}};
    if (args.noisy && row_ok && kq < args.bins) {
      words = philox4x32_10(noise_counter(args.row_offset, b, args.heads, h, args.bins, kq), args.seed);
    }
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int c = 4 * j + w;
      const int k = kq + w;
      s[c] = Acc(0);
      z[c] = Acc(0);
      if (row_ok && k < args.bins) {
        valid |= 1u << c;
        Acc sv = Cs[m * LDC + n0 + w] * scale;
        if (bias != nullptr) sv += bias[static_cast<int64_t>(h) * args.bins + k];
        s[c] = sv;
        z[c] = args.noisy ? (sv + gumbel_from_word(words.x[w], Acc(0))) * inv_tau : sv * inv_tau;
      }
    }
  }
  return valid;
}

// ---------------------------------------------------------------------------- forward

// The reduction of the forward, shared by reduce_kernel and the one-launch path. The partials are
// read through L2 (__ldcg): in the one-launch path other blocks of the same kernel wrote them.

// histogram[idx] for idx = h K + k: the P partials summed in group order, divided by B (torch
// divides by the row count as a multiplication by its reciprocal in the compute dtype), or NaN.
template <typename Acc, typename Partial>
__device__ __forceinline__ Acc histogram_entry(const Partial* __restrict__ partials, int64_t idx,
                                               int groups, int64_t entries, int64_t rows,
                                               bool poisoned) {
  const Acc inv_rows = Acc(1) / static_cast<Acc>(rows);
  Acc value;
  if constexpr (std::is_same<Partial, int>::value) {
    long long total = 0;  // counts: exact
    for (int g = 0; g < groups; ++g) total += __ldcg(partials + g * entries + idx);
    value = static_cast<Acc>(total) * inv_rows;
  } else {
    Acc total = Acc(0);
    for (int g = 0; g < groups; ++g) total += __ldcg(partials + g * entries + idx);
    value = total * inv_rows;
  }
  return poisoned ? quiet_nan<Acc>() : value;
}

// Whether any of `count` flags is set; every thread of the block must call it.
__device__ __forceinline__ int any_flag(const int* __restrict__ flags, int count) {
  int flag = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) flag |= __ldcg(flags + i);
  return __syncthreads_or(flag);
}

// The sum of every thread's `value`, in every thread: a tree over the block's threads in a fixed
// order (blockDim.x a power of two), through `scratch` (blockDim.x values of shared memory).
// Every thread of the block must call it.
template <typename Acc>
__device__ Acc block_sum(Acc value, Acc* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  for (unsigned stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) scratch[threadIdx.x] += scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const Acc total = scratch[0];
  __syncthreads();  // the next call may overwrite scratch[0]
  return total;
}

// The entropy in bits of each head of the (C, K) histogram, H[h] = -sum_k p log2(p + eps), into
// entropy[h], or their mean into entropy[0]; NaN bins give NaN. Run by one block, which must be
// able to read the whole histogram; every thread must call it.
template <typename Acc>
__device__ void write_entropy(const Acc* histogram, int heads, int bins, bool mean, Acc* entropy,
                              Acc* scratch) {
  const Acc eps = static_cast<Acc>(kEntropyEps);
  Acc total = Acc(0);
  for (int h = 0; h < heads; ++h) {
    Acc part = Acc(0);
    for (int k = threadIdx.x; k < bins; k += blockDim.x) {
      const Acc p = histogram[static_cast<int64_t>(h) * bins + k];
      part += p * log2_(p + eps);
    }
    const Acc value = -block_sum(part, scratch);
    total += value;
    if (!mean && threadIdx.x == 0) entropy[h] = value;
  }
  if (mean && threadIdx.x == 0) entropy[0] = total / static_cast<Acc>(heads);
}

// The one-launch forward's end: each block publishes its partial rows and flag, then takes a
// ticket; the block with the last ticket sums every partial into the histogram (and its entropy,
// when asked for, through `scratch`: kThreads values of shared memory). atomicInc wraps the
// counter to 0 at the last ticket, so it is 0 again for the next launch on the stream.
template <typename Acc, typename Partial>
__device__ void reduce_in_last_block(const ForwardParams& p, Acc* scratch) {
  __threadfence();  // this thread's partial and flag writes are visible device-wide before...
  __syncthreads();
  unsigned ticket = 0;
  if (threadIdx.x == 0) ticket = atomicInc(p.done_count, gridDim.x - 1);  // ...the ticket
  if (!__syncthreads_or(threadIdx.x == 0 && ticket == gridDim.x - 1)) return;
  __threadfence();
  const int groups = p.blocks_per_head;
  const int poisoned = any_flag(p.flags, groups * p.heads);
  const int64_t entries = static_cast<int64_t>(p.heads) * p.bins;
  const Partial* partials = static_cast<const Partial*>(p.partials);
  Acc* histogram = static_cast<Acc*>(p.histogram);
  for (int64_t idx = threadIdx.x; idx < entries; idx += blockDim.x) {
    histogram[idx] = histogram_entry<Acc>(partials, idx, groups, entries, p.rows, poisoned);
  }
  if (p.entropy != nullptr) {
    __syncthreads();  // the block's histogram writes are visible to the whole block
    write_entropy(histogram, p.heads, p.bins, p.entropy_mean, static_cast<Acc*>(p.entropy),
                  scratch);
  }
}

template <GemmMode M, typename Partial>
__global__ void __launch_bounds__(kThreads, 2) forward_kernel(ForwardParams p) {
  using T = Traits<M>;
  using In = typename T::In;
  using Acc = typename T::Acc;
  constexpr bool kHard = std::is_same<Partial, int>::value;
  FIERCE_DYNAMIC_SHARED(smem);
  Acc* Cs = reinterpret_cast<Acc*>(smem);
  unsigned char* staging = smem + Layout<M>::cs_bytes;

  const In* features = static_cast<const In*>(p.features);
  const Acc* bias = static_cast<const Acc*>(p.bias);
  Acc* lse_out = static_cast<Acc*>(p.lse);
  const int C = p.heads;
  const int K = p.bins;
  const int D = p.dim;
  const int64_t B = p.rows;
  const int h = blockIdx.x % C;
  const int group = blockIdx.x / C;
  const int tid = threadIdx.x;
  const int m = tid / TPR;
  const int sub = tid % TPR;
  const In* vt_head = static_cast<const In*>(p.vt) + static_cast<int64_t>(h) * K * D;
  const Acc inv_tau = Acc(1) / static_cast<Acc>(p.tau);
  const LogitArgs args{C, K, p.estimator != kSoftmax, p.seed, p.row_offset};
  const int64_t tiles = (B + BM - 1) / BM;
  const int ktiles = (K + BN - 1) / BN;

  // This block's partial histogram row, written by no other block.
  Partial* partial = static_cast<Partial*>(p.partials) + (static_cast<int64_t>(group) * C + h) * K;
  for (int k = tid; k < K; k += kThreads) partial[k] = Partial(0);
  __syncthreads();

  int poisoned = 0;
  for (int64_t tile = group; tile < tiles; tile += p.blocks_per_head) {
    const int64_t b0 = tile * BM;
    const int64_t b = b0 + m;
    const bool row_ok = b < B;
    const Acc scale = p.cosine ? row_scale<In, Acc>(features, b, row_ok, D, sub) : Acc(1);

    // Sweep 1: running max, argmax and sum of exp over the bin tiles (online log-sum-exp).
    Acc best = -infinity<Acc>();
    int best_k = 0;
    Acc sum = Acc(0);
    int bad = 0;  // 1: a NaN logit, 2: a +inf logit (the log-sum-exp is then NaN or +inf)
    Acc s[CPT], z[CPT];
    unsigned valid = 0u;
    for (int kt = 0; kt < ktiles; ++kt) {
      const int k0 = kt * BN;
      logit_tile<M>(features, vt_head, B, D, K, b0, k0, staging, Cs);
      valid = tile_logits<Acc>(Cs, m, sub, b, row_ok, h, k0, bias, scale, inv_tau, args, s, z);
      Acc tile_max = -infinity<Acc>();
      int tile_arg = INT_MAX;
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
        if (valid & (1u << c)) {  // bins ascend with c, so strict > keeps the lowest on ties
          if (z[c] > tile_max) {
            tile_max = z[c];
            tile_arg = k0 + column_of(c, sub);
          }
          if (isnan(z[c])) bad |= 1;
          if (z[c] == infinity<Acc>()) bad |= 2;
        }
      }
      group_argmax(tile_max, tile_arg);
      bad = group_or(bad);
      Acc tile_sum = Acc(0);
      if (tile_max > -infinity<Acc>()) {
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          if (valid & (1u << c)) tile_sum += exp_(z[c] - tile_max);
        }
      }
      tile_sum = group_sum(tile_sum);
      if (tile_max > best) {  // later tiles win only when strictly larger: ties to the lowest bin
        sum = sum * exp_(best - tile_max) + tile_sum;
        best = tile_max;
        best_k = tile_arg;
      } else if (tile_max > -infinity<Acc>()) {
        sum += tile_sum * exp_(tile_max - best);
      }
    }
    // torch.logsumexp's values in the corner cases: NaN, +inf, and -inf when every logit is -inf.
    Acc lse;
    if (bad & 1) {
      lse = quiet_nan<Acc>();
    } else if (bad & 2) {
      lse = infinity<Acc>();
    } else if (best == -infinity<Acc>()) {
      lse = -infinity<Acc>();
    } else {
      lse = best + log_(sum);
    }
    if (row_ok && sub == 0) {
      lse_out[b * C + h] = lse;
      // A row without a finite log-sum-exp makes the whole histogram NaN (the torch backend's
      // `counts + 0 * lse.sum()`).
      if (!isfinite(lse)) poisoned = 1;
      if constexpr (kHard) atomicAdd(partial + best_k, 1);  // integer: exact in any order
    }
    // y = exp(z - max) / sum rather than exp(z - lse): lse is rounded to ulp(lse), which is
    // large beside the row sum's own rounding when the logits are large (distance: ~1e4).
    const Acc inv_sum = Acc(1) / sum;

    if constexpr (!kHard) {
      // Sweep 2: y, summed over the tile's rows in a fixed order, per bin.
      for (int kt = 0; kt < ktiles; ++kt) {
        const int k0 = kt * BN;
        if (ktiles > 1) {  // with a single bin tile, z is still in registers
          logit_tile<M>(features, vt_head, B, D, K, b0, k0, staging, Cs);
          valid = tile_logits<Acc>(Cs, m, sub, b, row_ok, h, k0, bias, scale, inv_tau, args, s, z);
        }
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          Cs[m * LDC + column_of(c, sub)] = (valid & (1u << c)) ? exp_(z[c] - best) * inv_sum : Acc(0);
        }
        __syncthreads();
        if (tid < BN && k0 + tid < K) {
          Acc column = Acc(0);
          for (int row = 0; row < BM; ++row) column += Cs[row * LDC + tid];
          partial[k0 + tid] += column;  // this thread is the only writer of this bin here
        }
        __syncthreads();
      }
    }
  }
  const int any_poisoned = __syncthreads_or(poisoned);
  if (tid == 0) p.flags[group * C + h] = any_poisoned;
  if (p.done_count != nullptr) reduce_in_last_block<Acc, Partial>(p, Cs);  // Cs: >= kThreads values
}

// histogram[h][k] = (sum over groups p, in order, of partial[p][h][k]) / B, or NaN everywhere when
// any block saw a non-finite log-sum-exp.
template <typename Acc, typename Partial>
__global__ void __launch_bounds__(kThreads) reduce_kernel(const Partial* __restrict__ partials,
                                                          const int* __restrict__ flags,
                                                          Acc* __restrict__ histogram, int groups,
                                                          int heads, int bins, int64_t rows) {
  const int poisoned = any_flag(flags, groups * heads);
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t entries = static_cast<int64_t>(heads) * bins;
  if (idx < entries) {
    histogram[idx] = histogram_entry<Acc>(partials, idx, groups, entries, rows, poisoned);
  }
}

// The entropy of the reduced histogram (two-launch path): one block.
template <typename Acc>
__global__ void __launch_bounds__(kThreads) entropy_kernel(const Acc* __restrict__ histogram,
                                                           Acc* __restrict__ entropy, int heads,
                                                           int bins, bool mean) {
  FIERCE_DYNAMIC_SHARED(smem);  // kThreads values
  write_entropy(histogram, heads, bins, mean, entropy, reinterpret_cast<Acc*>(smem));
}

// ---------------------------------------------------------------------------- backward

// Gs[n] = G[h][k0 + n] = dL/dp for the bin tile at k0 (0 beyond K): as given, or, when the
// entropy's gradient came in, -w (log2(p + eps) + p / ((p + eps) ln 2)) from the histogram, with
// w = dL/dH[h], or dL/dH / C for all heads when the entropy was their mean
// (backends.entropy_bits_backward). It writes shared memory: callers order it with barriers.
template <typename Acc>
__device__ void grad_tile(const BackwardParams& p, int h, int k0, Acc* Gs) {
  const int64_t head = static_cast<int64_t>(h) * p.bins;
  const Acc* grad_entropy = static_cast<const Acc*>(p.grad_entropy);
  for (int n = threadIdx.x; n < BN; n += blockDim.x) {
    const int k = k0 + n;
    Acc g = Acc(0);
    if (k < p.bins && grad_entropy == nullptr) {
      g = static_cast<const Acc*>(p.grad_histogram)[head + k];
    } else if (k < p.bins) {
      const Acc weight = p.entropy_mean ? grad_entropy[0] / static_cast<Acc>(p.heads)
                                        : grad_entropy[h];
      const Acc q = static_cast<const Acc*>(p.histogram)[head + k];
      const Acc shifted = q + static_cast<Acc>(kEntropyEps);
      const Acc inv_ln2 = static_cast<Acc>(1.4426950408889634);  // 1 / ln 2
      g = (log2_(shifted) + inv_ln2 * (q / shifted)) * -weight;
    }
    Gs[n] = g;
  }
}

// expected[b][h] = (sum_k y G / n, 1 / n) with y = exp(z - lse) from the saved log-sum-exp and
// n = sum_k y: y / n sums to 1 exactly where lse, rounded to ulp(lse), leaves n = 1 +- ulp(lse)/2,
// and delta must sum to 0 over k for the gradient formula (distance drops a -|r|^2 r term that
// it cancels). Needed before delta when the bins span several tiles; one block per (row tile, head).
template <GemmMode M>
__global__ void __launch_bounds__(kThreads, 2) expected_kernel(BackwardParams p) {
  using T = Traits<M>;
  using In = typename T::In;
  using Acc = typename T::Acc;
  FIERCE_DYNAMIC_SHARED(smem);
  Acc* Cs = reinterpret_cast<Acc*>(smem);
  unsigned char* staging = smem + Layout<M>::cs_bytes + Layout<M>::ds_bytes;

  Acc* Gs = reinterpret_cast<Acc*>(smem + Layout<M>::gs_offset);

  const In* features = static_cast<const In*>(p.features);
  const Acc* bias = static_cast<const Acc*>(p.bias);
  const Acc* lse = static_cast<const Acc*>(p.lse);
  const int C = p.heads;
  const int K = p.bins;
  const int D = p.dim;
  const int64_t B = p.rows;
  const int h = blockIdx.x % C;
  const int64_t tile = blockIdx.x / C;
  const int tid = threadIdx.x;
  const int m = tid / TPR;
  const int sub = tid % TPR;
  const In* vt_head = static_cast<const In*>(p.vt) + static_cast<int64_t>(h) * K * D;
  const Acc inv_tau = Acc(1) / static_cast<Acc>(p.tau);
  const LogitArgs args{C, K, p.estimator != kSoftmax, p.seed, p.row_offset};
  const int ktiles = (K + BN - 1) / BN;

  const int64_t b0 = tile * BM;
  const int64_t b = b0 + m;
  const bool row_ok = b < B;
  const Acc scale = p.cosine ? row_scale<In, Acc>(features, b, row_ok, D, sub) : Acc(1);
  const Acc row_lse = row_ok ? lse[b * C + h] : Acc(0);
  Acc expected = Acc(0);
  Acc total = Acc(0);
  Acc s[CPT], z[CPT];
  for (int kt = 0; kt < ktiles; ++kt) {
    const int k0 = kt * BN;
    __syncthreads();  // every thread is done with the previous tile's Gs
    grad_tile<Acc>(p, h, k0, Gs);  // published by logit_tile's barriers
    logit_tile<M>(features, vt_head, B, D, K, b0, k0, staging, Cs);
    const unsigned valid = tile_logits<Acc>(Cs, m, sub, b, row_ok, h, k0, bias, scale, inv_tau, args, s, z);
#pragma unroll
    for (int c = 0; c < CPT; ++c) {
      if (valid & (1u << c)) {
        const Acc y = exp_(z[c] - row_lse);
        expected += y * Gs[column_of(c, sub)];
        total += y;
      }
    }
  }
  expected = group_sum(expected);
  total = group_sum(total);
  if (row_ok && sub == 0) {
    Acc* out = static_cast<Acc*>(p.expected) + 2 * (b * C + h);
    out[0] = expected / total;
    out[1] = Acc(1) / total;
  }
}

// accumulator[b0 + m][d] (+)= sum_n Ds[m][n] vt_head[k0 + n][d] for every column tile of the
// padded dimension; `first` starts the sum from zero instead of the stored value.
template <GemmMode M>
__device__ void gradient_update(const typename Traits<M>::In* __restrict__ vt_head, int dim,
                                int bins, int k0, int64_t b0, const typename Traits<M>::DIn* Ds,
                                typename Traits<M>::DIn* Vs, typename Traits<M>::Acc* accumulator,
                                int64_t padded, bool first) {
  using T = Traits<M>;
  using In = typename T::In;
  using DIn = typename T::DIn;
  using Acc = typename T::Acc;
  constexpr int BK = T::BK;
  const int tid = threadIdx.x;
  const int kcount = bins - k0 < BN ? bins - k0 : BN;  // bins of this tile; Ds is zero beyond
  const DIn zero = Cvt<DIn>::from(Acc(0));

  // Dictionary chunks (BK bins x BD columns) go global -> registers -> shared memory, the next
  // (kc, d0) step's loads issued before the current step's multiplies.
  constexpr int NV = BK * BD / kThreads;
  static_assert(BK * BD % kThreads == 0, "whole staging loads");
  DIn rv[NV];
  auto fetch = [&](int kc, int d0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int idx = tid + i * kThreads;
      const int k = k0 + kc + idx / BD;
      const int d = d0 + idx % BD;
      rv[i] = (k < bins && d < dim)
          ? Cvt<DIn>::from(Cvt<In>::to(vt_head[static_cast<int64_t>(k) * dim + d]))
          : zero;
    }
  };
  auto stage = [&](int kc, int d0) {
    __syncthreads();  // the previous step's readers of Vs (or of As/Bs, which it overlays) are done
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int idx = tid + i * kThreads;
      Vs[(idx / BD) * LDV + idx % BD] = rv[i];
    }
    __syncthreads();
    int next_kc = kc + BK, next_d0 = d0;
    if (next_kc >= kcount) {
      next_kc = 0;
      next_d0 = d0 + BD;
    }
    if (next_d0 < padded) fetch(next_kc, next_d0);
  };
  fetch(0, 0);

  for (int d0 = 0; d0 < padded; d0 += BD) {
    if constexpr (T::kWmma) {
      constexpr int NFN = BD / 16;
      constexpr int FPW = (BM / 16) * NFN / kWarps;
      const int warp = tid / 32;
      wmma::fragment<wmma::accumulator, 16, 16, T::DK, float> acc[FPW];
#pragma unroll
      for (int i = 0; i < FPW; ++i) {
        const int f = warp * FPW + i;
        float* tile = accumulator + (b0 + (f / NFN) * 16) * padded + d0 + (f % NFN) * 16;
        if (first) {
          wmma::fill_fragment(acc[i], 0.0f);
        } else {
          wmma::load_matrix_sync(acc[i], tile, static_cast<unsigned>(padded), wmma::mem_row_major);
        }
      }
      for (int kc = 0; kc < kcount; kc += BK) {
        stage(kc, d0);
#pragma unroll
        for (int i = 0; i < FPW; ++i) {
          const int f = warp * FPW + i;
          const int fm = f / NFN;
          const int fn = f % NFN;
#pragma unroll
          for (int kk = 0; kk < BK; kk += T::DK) {
            wmma::fragment<wmma::matrix_a, 16, 16, T::DK, typename T::DFrag, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, T::DK, typename T::DFrag, wmma::row_major> bfrag;
            wmma::load_matrix_sync(a, Ds + fm * 16 * LDD + kc + kk, LDD);
            wmma::load_matrix_sync(bfrag, Vs + kk * LDV + fn * 16, LDV);
            if constexpr (std::is_same<typename T::DFrag, wmma::precision::tf32>::value) {
              round_to_tf32(a);
              round_to_tf32(bfrag);
            }
            wmma::mma_sync(acc[i], a, bfrag, acc[i]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < FPW; ++i) {
        const int f = warp * FPW + i;
        float* tile = accumulator + (b0 + (f / NFN) * 16) * padded + d0 + (f % NFN) * 16;
        wmma::store_matrix_sync(tile, acc[i], static_cast<unsigned>(padded), wmma::mem_row_major);
      }
    } else {
      constexpr int NPT = BD / TPR;  // columns d0 + sub + TPR * j
      const int m = tid / TPR;
      const int sub = tid % TPR;
      Acc* row = accumulator + (b0 + m) * padded + d0;
      Acc acc[NPT];
#pragma unroll
      for (int j = 0; j < NPT; ++j) acc[j] = first ? Acc(0) : row[sub + TPR * j];
      for (int kc = 0; kc < kcount; kc += BK) {
        stage(kc, d0);
#pragma unroll 4
        for (int kk = 0; kk < BK; ++kk) {
          const Acc delta = Cvt<DIn>::to(Ds[m * LDD + kc + kk]);
#pragma unroll
          for (int j = 0; j < NPT; ++j) acc[j] += delta * Cvt<DIn>::to(Vs[kk * LDV + sub + TPR * j]);
        }
      }
#pragma unroll
      for (int j = 0; j < NPT; ++j) row[sub + TPR * j] = acc[j];
    }
  }
}

// One block per row tile: for every head and bin tile, recompute the logits, form delta and add
// delta . vt into the block's rows of the accumulator; then apply the row scale and the cosine
// correction and write the gradient once.
template <GemmMode M>
__global__ void __launch_bounds__(kThreads) gradient_kernel(BackwardParams p) {
  using T = Traits<M>;
  using In = typename T::In;
  using DIn = typename T::DIn;
  using Acc = typename T::Acc;
  FIERCE_DYNAMIC_SHARED(smem);
  Acc* Cs = reinterpret_cast<Acc*>(smem);
  DIn* Ds = reinterpret_cast<DIn*>(smem + Layout<M>::cs_bytes);
  unsigned char* staging = smem + Layout<M>::cs_bytes + Layout<M>::ds_bytes;
  DIn* Vs = reinterpret_cast<DIn*>(staging);  // shares the staging region with As/Bs
  Acc* Gs = reinterpret_cast<Acc*>(smem + Layout<M>::gs_offset);

  const In* features = static_cast<const In*>(p.features);
  const Acc* bias = static_cast<const Acc*>(p.bias);
  const Acc* lse = static_cast<const Acc*>(p.lse);
  const Acc* expected_in = static_cast<const Acc*>(p.expected);
  Acc* accumulator = static_cast<Acc*>(p.accumulator);
  const int C = p.heads;
  const int K = p.bins;
  const int D = p.dim;
  const int64_t B = p.rows;
  const int64_t padded = padded_dim(D);
  const int tid = threadIdx.x;
  const int m = tid / TPR;
  const int sub = tid % TPR;
  const Acc inv_tau = Acc(1) / static_cast<Acc>(p.tau);
  // torch computes delta's divisor rows * tau in double, then multiplies by its reciprocal.
  const Acc inv_rows_tau = Acc(1) / static_cast<Acc>(static_cast<double>(B) * p.tau);
  const LogitArgs args{C, K, p.estimator != kSoftmax, p.seed, p.row_offset};
  const int ktiles = (K + BN - 1) / BN;

  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t b = b0 + m;
  const bool row_ok = b < B;
  const Acc scale = p.cosine ? row_scale<In, Acc>(features, b, row_ok, D, sub) : Acc(1);
  Acc delta_dot_s = Acc(0);  // this thread's part of sum_hk delta s (cosine)
  bool first = true;
  Acc s[CPT], z[CPT];
  for (int h = 0; h < C; ++h) {
    const In* vt_head = static_cast<const In*>(p.vt) + static_cast<int64_t>(h) * K * D;
    const Acc row_lse = row_ok ? lse[b * C + h] : Acc(0);
    const bool stored = ktiles > 1 && row_ok;  // expected_kernel's (sum_k y G / n, 1 / n)
    Acc expected = stored ? expected_in[2 * (b * C + h)] : Acc(0);
    Acc inv_total = stored ? expected_in[2 * (b * C + h) + 1] : Acc(0);
    for (int kt = 0; kt < ktiles; ++kt) {
      const int k0 = kt * BN;
      // No thread reads Gs any more: the last tile's reads preceded the barrier before its
      // gradient_update. logit_tile's barriers publish the new tile.
      grad_tile<Acc>(p, h, k0, Gs);
      logit_tile<M>(features, vt_head, B, D, K, b0, k0, staging, Cs);
      const unsigned valid = tile_logits<Acc>(Cs, m, sub, b, row_ok, h, k0, bias, scale, inv_tau, args, s, z);
      Acc y[CPT];
#pragma unroll
      for (int c = 0; c < CPT; ++c) y[c] = (valid & (1u << c)) ? exp_(z[c] - row_lse) : Acc(0);
      if (ktiles == 1) {  // the whole row is in this tile: its sums need no other kernel
        Acc part = Acc(0);
        Acc total = Acc(0);
#pragma unroll
        for (int c = 0; c < CPT; ++c) {
          if (valid & (1u << c)) {
            part += y[c] * Gs[column_of(c, sub)];
            total += y[c];
          }
        }
        total = group_sum(total);
        inv_total = row_ok ? Acc(1) / total : Acc(0);
        expected = group_sum(part) * inv_total;
      }
#pragma unroll
      for (int c = 0; c < CPT; ++c) {
        Acc delta = Acc(0);
        if (valid & (1u << c)) {
          delta = y[c] * inv_total * (Gs[column_of(c, sub)] - expected) * inv_rows_tau;
          if (p.cosine) delta_dot_s += delta * s[c];
        }
        Ds[m * LDD + column_of(c, sub)] = Cvt<DIn>::from(delta);
      }
      __syncthreads();
      gradient_update<M>(vt_head, D, K, k0, b0, Ds, Vs, accumulator, padded, first);
      first = false;
    }
  }
  delta_dot_s = group_sum(delta_dot_s);
  __syncthreads();  // the accumulator rows were written by other threads of this block
  if (row_ok) {
    // a_b (sum delta v - a_b (sum delta s) r_b): never a_b^2, which underflows float32 for
    // |r_b| past ~1e19
    const Acc correction = scale * delta_dot_s;
    In* out = static_cast<In*>(p.grad_features) + b * D;
    const Acc* row = accumulator + b * padded;
    const In* r = features + b * D;
    for (int d = sub; d < D; d += TPR) {
      Acc value = row[d];
      if (p.cosine) value = scale * (value - correction * Cvt<In>::to(r[d]));
      out[d] = Cvt<In>::from(value);
    }
  }
}

// ---------------------------------------------------------------------------- launchers

template <typename Kernel>
cudaError_t allow_shared(Kernel kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              static_cast<int>(bytes));
}

template <GemmMode M>
cudaError_t forward_impl(const ForwardParams& p, cudaStream_t stream) {
  using Acc = typename Traits<M>::Acc;
  const size_t bytes = Layout<M>::forward_bytes;
  const bool hard = p.estimator == kGumbelHard;
  void (*kernel)(ForwardParams) = hard ? forward_kernel<M, int> : forward_kernel<M, Acc>;
  cudaError_t error = allow_shared(kernel, bytes);
  if (error != cudaSuccess) return error;
  FIERCE_LAUNCH(kernel, p.blocks_per_head * p.heads, kThreads, bytes, stream, p);
  error = cudaGetLastError();
  if (error != cudaSuccess || p.done_count != nullptr) return error;  // one launch: all done
  const int64_t entries = static_cast<int64_t>(p.heads) * p.bins;
  const unsigned grid = static_cast<unsigned>((entries + kThreads - 1) / kThreads);
  Acc* histogram = static_cast<Acc*>(p.histogram);
  if (hard) {
    void (*reduce)(const int*, const int*, Acc*, int, int, int, int64_t) = reduce_kernel<Acc, int>;
    FIERCE_LAUNCH(reduce, grid, kThreads, 0, stream,
                  static_cast<const int*>(p.partials), static_cast<const int*>(p.flags), histogram,
                  p.blocks_per_head, p.heads, p.bins, p.rows);
  } else {
    void (*reduce)(const Acc*, const int*, Acc*, int, int, int, int64_t) = reduce_kernel<Acc, Acc>;
    FIERCE_LAUNCH(reduce, grid, kThreads, 0, stream,
                  static_cast<const Acc*>(p.partials), static_cast<const int*>(p.flags), histogram,
                  p.blocks_per_head, p.heads, p.bins, p.rows);
  }
  if (p.entropy == nullptr) return cudaGetLastError();
  error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  FIERCE_LAUNCH(entropy_kernel<Acc>, 1, kThreads, kThreads * sizeof(Acc), stream, histogram,
                static_cast<Acc*>(p.entropy), p.heads, p.bins, p.entropy_mean);
  return cudaGetLastError();
}

template <GemmMode M>
cudaError_t backward_impl(const BackwardParams& p, cudaStream_t stream) {
  const size_t bytes = Layout<M>::backward_bytes;
  const int64_t tiles = (p.rows + BM - 1) / BM;
  cudaError_t error;
  if (p.bins > BN) {
    error = allow_shared(expected_kernel<M>, bytes);
    if (error != cudaSuccess) return error;
    FIERCE_LAUNCH(expected_kernel<M>, static_cast<unsigned>(tiles * p.heads), kThreads, bytes, stream, p);
    error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  error = allow_shared(gradient_kernel<M>, bytes);
  if (error != cudaSuccess) return error;
  FIERCE_LAUNCH(gradient_kernel<M>, static_cast<unsigned>(tiles), kThreads, bytes, stream, p);
  return cudaGetLastError();
}

}  // namespace

size_t forward_shared_bytes(GemmMode mode) {
  switch (mode) {
    case GemmMode::kHalf: return Layout<GemmMode::kHalf>::forward_bytes;
    case GemmMode::kBFloat16: return Layout<GemmMode::kBFloat16>::forward_bytes;
    case GemmMode::kTF32: return Layout<GemmMode::kTF32>::forward_bytes;
    case GemmMode::kFloat: return Layout<GemmMode::kFloat>::forward_bytes;
    case GemmMode::kDouble: return Layout<GemmMode::kDouble>::forward_bytes;
  }
  return 0;
}

size_t backward_shared_bytes(GemmMode mode) {
  switch (mode) {
    case GemmMode::kHalf: return Layout<GemmMode::kHalf>::backward_bytes;
    case GemmMode::kBFloat16: return Layout<GemmMode::kBFloat16>::backward_bytes;
    case GemmMode::kTF32: return Layout<GemmMode::kTF32>::backward_bytes;
    case GemmMode::kFloat: return Layout<GemmMode::kFloat>::backward_bytes;
    case GemmMode::kDouble: return Layout<GemmMode::kDouble>::backward_bytes;
  }
  return 0;
}

cudaError_t launch_histogram_forward(GemmMode mode, const ForwardParams& params, cudaStream_t stream) {
  switch (mode) {
    case GemmMode::kHalf: return forward_impl<GemmMode::kHalf>(params, stream);
    case GemmMode::kBFloat16: return forward_impl<GemmMode::kBFloat16>(params, stream);
    case GemmMode::kTF32: return forward_impl<GemmMode::kTF32>(params, stream);
    case GemmMode::kFloat: return forward_impl<GemmMode::kFloat>(params, stream);
    case GemmMode::kDouble: return forward_impl<GemmMode::kDouble>(params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_histogram_backward(GemmMode mode, const BackwardParams& params, cudaStream_t stream) {
  switch (mode) {
    case GemmMode::kHalf: return backward_impl<GemmMode::kHalf>(params, stream);
    case GemmMode::kBFloat16: return backward_impl<GemmMode::kBFloat16>(params, stream);
    case GemmMode::kTF32: return backward_impl<GemmMode::kTF32>(params, stream);
    case GemmMode::kFloat: return backward_impl<GemmMode::kFloat>(params, stream);
    case GemmMode::kDouble: return backward_impl<GemmMode::kDouble>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace fierce
