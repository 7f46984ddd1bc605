// The compiled ops of fierce_ext's `cuda` backend, registered with the dispatcher:
//
//   fierce_ext::cuda_histogram_forward(features, vt, bias, similarity, estimator, tau, seed,
//                                      row_offset, allow_tf32) -> (histogram (C, K), lse (B, C))
//   fierce_ext::cuda_histogram_backward(grad_histogram, features, vt, bias, lse, similarity,
//                                       estimator, tau, seed, row_offset, allow_tf32)
//                                       -> grad_features (B, D)
//   fierce_ext::cuda_entropy_forward(features, vt, bias, similarity, estimator, tau, seed,
//                                    row_offset, allow_tf32, mean)
//                                    -> (entropy (() if mean else (C,)), histogram, lse)
//   fierce_ext::cuda_entropy_backward(grad_entropy, histogram, features, vt, bias, lse,
//                                     similarity, estimator, tau, seed, row_offset, allow_tf32,
//                                     mean) -> grad_features (B, D)
//
// The entropy ops fuse the histogram's entropy (bits, fierce_ext.backends.entropy_bits) into the
// forward's reduction and its derivative into the backward, so that a training step at the paper's
// sizes runs one kernel each way instead of a dozen small torch ops more.
// `vt` is the dictionary already projected for the similarity (dictionary.project_dictionary)
// and laid out bins-major, (C, K, D), in the features' dtype; `bias` is the projected bias (C, K)
// in the compute dtype or None. fierce_ext/backends/cuda.py prepares both (and caches them) and
// registers the fake implementations. Only CUDA kernels are registered: on other devices the
// dispatcher reports that the op has no kernel for that backend.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include "fierce.h"

namespace fierce {
namespace {

void check_cuda(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "fierce_ext cuda backend: ", what, " failed: ",
              cudaGetErrorString(error));
}

at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

GemmMode gemm_mode(at::ScalarType dtype, bool allow_tf32) {
  switch (dtype) {
    case at::kHalf: return GemmMode::kHalf;
    case at::kBFloat16: return GemmMode::kBFloat16;
    case at::kFloat: return allow_tf32 ? GemmMode::kTF32 : GemmMode::kFloat;
    case at::kDouble: return GemmMode::kDouble;
    default:
      TORCH_CHECK(false, "fierce_ext cuda backend: features must be float16, bfloat16, float32 or "
                  "float64, got ", dtype);
  }
}

bool parse_cosine(std::string_view similarity) {
  TORCH_CHECK(similarity == "dot" || similarity == "cosine" || similarity == "distance",
              "similarity must be one of ('dot', 'cosine', 'distance'), got '",
              std::string(similarity), "'");
  return similarity == "cosine";
}

int parse_estimator(std::string_view estimator) {
  if (estimator == "gumbel_hard") return kGumbelHard;
  if (estimator == "gumbel_soft") return kGumbelSoft;
  if (estimator == "softmax") return kSoftmax;
  TORCH_CHECK(false, "estimator must be one of ('gumbel_hard', 'gumbel_soft', 'softmax'), got '",
              std::string(estimator), "'");
}

// Checks shared by both ops; returns the device index.
int check_common(const at::Tensor& features, const at::Tensor& vt,
                 const std::optional<at::Tensor>& bias, double tau, int64_t seed,
                 int64_t row_offset) {
  TORCH_CHECK(features.is_cuda(), "features must be a CUDA tensor, got device ", features.device());
  TORCH_CHECK(features.dim() == 2, "features must be 2-D (batch, dim), got shape ", features.sizes());
  TORCH_CHECK(vt.dim() == 3, "vt (the projected dictionary, heads x bins x dim) must be 3-D, got "
              "shape ", vt.sizes());
  TORCH_CHECK(vt.device() == features.device(), "vt is on ", vt.device(), " but features are on ",
              features.device());
  TORCH_CHECK(vt.scalar_type() == features.scalar_type(), "vt must have the features' dtype ",
              features.scalar_type(), ", got ", vt.scalar_type());
  const int64_t rows = features.size(0), dim = features.size(1);
  const int64_t heads = vt.size(0), bins = vt.size(1);
  TORCH_CHECK(rows >= 1 && dim >= 1, "features must have at least one row and one column, got "
              "shape ", features.sizes());
  TORCH_CHECK(heads >= 1 && bins >= 1, "vt needs heads >= 1 and bins >= 1, got shape ", vt.sizes());
  TORCH_CHECK(vt.size(2) == dim, "vt dim ", vt.size(2), " (shape ", vt.sizes(),
              ") does not match features dim ", dim);
  TORCH_CHECK(rows <= INT_MAX && dim <= INT_MAX && heads <= INT_MAX && bins <= INT_MAX,
              "fierce_ext cuda backend: sizes must fit in 32 bits, got features ", features.sizes(),
              " and vt ", vt.sizes());
  TORCH_CHECK(ceil_div(rows, kTileRows) * heads <= INT_MAX,
              "fierce_ext cuda backend: too many rows x heads for one launch");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == features.device(), "bias is on ", bias->device(),
                " but features are on ", features.device());
    TORCH_CHECK(bias->dim() == 2 && bias->size(0) == heads && bias->size(1) == bins,
                "bias must have shape (heads, bins) = (", heads, ", ", bins, "), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == compute_dtype(features.scalar_type()),
                "bias must be in the compute dtype ", compute_dtype(features.scalar_type()),
                ", got ", bias->scalar_type());
  }
  TORCH_CHECK(std::isfinite(tau) && tau > 0, "tau must be finite and > 0, got ", tau);
  TORCH_CHECK(seed >= 0, "seed must be in [0, 2^63), got ", seed);
  TORCH_CHECK(row_offset >= 0, "row_offset must be >= 0, got ", row_offset);

  const int device = features.get_device();
  int major = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "cudaDeviceGetAttribute");
  TORCH_CHECK(major >= 8, "fierce_ext cuda backend needs compute capability >= 8.0 (Ampere), "
              "device ", device, " has ", major, ".x");
  return device;
}

void check_shared_memory(int device, size_t bytes) {
  int limit = 0;
  check_cuda(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute");
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "fierce_ext cuda backend: the kernel needs ",
              bytes, " bytes of shared memory per block, device ", device, " allows ", limit);
}

// Row-tile groups per head in the forward: enough blocks for a few waves, few enough that the
// partial histograms stay small (P x C x K). Depends only on the shape and the device, so runs
// on one device sum in the same order.
int blocks_per_head(int device, int64_t rows, int64_t heads) {
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
             "cudaDeviceGetAttribute");
  const int64_t tiles = ceil_div(rows, kTileRows);
  const int64_t wanted = ceil_div(4 * static_cast<int64_t>(sms), heads);
  return static_cast<int>(std::max<int64_t>(1, std::min(tiles, wanted)));
}

// Whether work enqueued on `stream` is being captured into a CUDA graph. A failed query counts as
// capturing (the two-launch forward is always safe) and is cleared, so that the launch's own
// error check does not report it.
bool capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();
    return true;
  }
  return status != cudaStreamCaptureStatusNone;
}

// The one-launch forward's counter for (device, stream), created at 0 on first use and kept for
// the process's lifetime (4 bytes a stream). Launches on one stream run in order and each leaves
// the counter at 0, so one counter per stream is never shared by two running kernels. Graph
// captures do not use it (a graph may be replayed on any stream): they take two launches.
unsigned* done_counter(int device, cudaStream_t stream) {
  static std::mutex mutex;
  // Never destroyed: freeing CUDA memory from a static destructor can outlive the CUDA runtime.
  static auto* counters = new std::map<std::pair<int, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  auto found = counters->find({device, stream});
  if (found == counters->end()) {
    // at::zeros fills on the current stream, which is `stream`: the fill precedes the launch.
    const auto options = at::TensorOptions().device(at::kCUDA, device).dtype(at::kInt);
    found = counters->emplace(std::make_pair(device, stream), at::zeros({1}, options)).first;
  }
  return reinterpret_cast<unsigned*>(found->second.data_ptr<int>());
}

// The Problem of contiguous features r (B, D), projected dictionary v (C, K, D) and bias c
// (undefined when the similarity has none); sizes were checked to fit by check_common.
Problem problem_of(const at::Tensor& r, const at::Tensor& v, const at::Tensor& c, bool cosine,
                   int estimator, double tau, int64_t seed, int64_t row_offset) {
  Problem problem{};
  problem.features = r.data_ptr();
  problem.vt = v.data_ptr();
  problem.bias = c.defined() ? c.data_ptr() : nullptr;
  problem.rows = r.size(0);
  problem.dim = static_cast<int>(r.size(1));
  problem.heads = static_cast<int>(v.size(0));
  problem.bins = static_cast<int>(v.size(1));
  problem.cosine = cosine;
  problem.estimator = estimator;
  problem.tau = tau;
  problem.seed = static_cast<uint64_t>(seed);
  problem.row_offset = static_cast<uint64_t>(row_offset);
  return problem;
}

// The forward of both op pairs: the histogram and lse, and into `entropy` (when defined) the
// entropy, its mean over heads when entropy_mean.
std::tuple<at::Tensor, at::Tensor> forward(
    const at::Tensor& features, const at::Tensor& vt, const std::optional<at::Tensor>& bias,
    std::string_view similarity, std::string_view estimator, double tau, int64_t seed,
    int64_t row_offset, bool allow_tf32, const at::Tensor& entropy, bool entropy_mean) {
  const bool cosine = parse_cosine(similarity);
  const int estimator_id = parse_estimator(estimator);
  const int device = check_common(features, vt, bias, tau, seed, row_offset);
  const GemmMode mode = gemm_mode(features.scalar_type(), allow_tf32);
  check_shared_memory(device, forward_shared_bytes(mode));
  const c10::cuda::CUDAGuard guard(features.device());

  const at::Tensor r = features.contiguous();
  const at::Tensor v = vt.contiguous();
  const at::Tensor c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const int64_t rows = r.size(0), heads = v.size(0), bins = v.size(1);
  const auto acc = r.options().dtype(compute_dtype(r.scalar_type()));
  at::Tensor histogram = at::empty({heads, bins}, acc);
  at::Tensor lse = at::empty({rows, heads}, acc);
  const int groups = blocks_per_head(device, rows, heads);
  const auto partial_options = estimator_id == kGumbelHard ? r.options().dtype(at::kInt) : acc;
  at::Tensor partials = at::empty({groups, heads, bins}, partial_options);
  at::Tensor flags = at::empty({groups, heads}, r.options().dtype(at::kInt));

  ForwardParams params{};
  static_cast<Problem&>(params) = problem_of(r, v, c, cosine, estimator_id, tau, seed, row_offset);
  params.histogram = histogram.data_ptr();
  params.lse = lse.data_ptr();
  params.partials = partials.data_ptr();
  params.flags = flags.data_ptr<int>();
  params.blocks_per_head = groups;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  params.done_count = one_launch_forward(groups, heads, bins) && !capturing(stream)
      ? done_counter(device, stream) : nullptr;
  params.entropy = entropy.defined() ? entropy.data_ptr() : nullptr;
  params.entropy_mean = entropy_mean;
  check_cuda(launch_histogram_forward(mode, params, stream), "the histogram forward launch");
  return {histogram, lse};
}

std::tuple<at::Tensor, at::Tensor> histogram_forward(
    const at::Tensor& features, const at::Tensor& vt, const std::optional<at::Tensor>& bias,
    std::string_view similarity, std::string_view estimator, double tau, int64_t seed,
    int64_t row_offset, bool allow_tf32) {
  return forward(features, vt, bias, similarity, estimator, tau, seed, row_offset, allow_tf32,
                 at::Tensor(), false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_forward(
    const at::Tensor& features, const at::Tensor& vt, const std::optional<at::Tensor>& bias,
    std::string_view similarity, std::string_view estimator, double tau, int64_t seed,
    int64_t row_offset, bool allow_tf32, bool mean) {
  TORCH_CHECK(vt.dim() == 3, "vt (the projected dictionary, heads x bins x dim) must be 3-D, got "
              "shape ", vt.sizes());
  const auto acc = features.options().dtype(compute_dtype(features.scalar_type()));
  at::Tensor entropy = mean ? at::empty({}, acc) : at::empty({vt.size(0)}, acc);
  auto [histogram, lse] = forward(features, vt, bias, similarity, estimator, tau, seed,
                                  row_offset, allow_tf32, entropy, mean);
  return {entropy, histogram, lse};
}

// The backward of both op pairs. dL/dp comes in as grad_histogram (C, K), or as dL/dH
// grad_entropy (() when entropy_mean, else (C,)) with the forward's histogram (C, K).
at::Tensor backward(const at::Tensor& grad_histogram, const at::Tensor& grad_entropy,
                    const at::Tensor& histogram, const at::Tensor& features,
                    const at::Tensor& vt, const std::optional<at::Tensor>& bias,
                    const at::Tensor& lse, std::string_view similarity,
                    std::string_view estimator, double tau, int64_t seed, int64_t row_offset,
                    bool allow_tf32, bool entropy_mean) {
  const bool cosine = parse_cosine(similarity);
  const int estimator_id = parse_estimator(estimator);
  const int device = check_common(features, vt, bias, tau, seed, row_offset);
  const GemmMode mode = gemm_mode(features.scalar_type(), allow_tf32);
  check_shared_memory(device, backward_shared_bytes(mode));
  const int64_t rows = features.size(0), dim = features.size(1);
  const int64_t heads = vt.size(0), bins = vt.size(1);
  const at::ScalarType acc_type = compute_dtype(features.scalar_type());
  const bool from_entropy = grad_entropy.defined();
  const at::Tensor& grad_in = from_entropy ? histogram : grad_histogram;
  const char* grad_name = from_entropy ? "histogram" : "grad_histogram";
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == heads && grad_in.size(1) == bins,
              grad_name, " must have shape (heads, bins) = (", heads, ", ", bins, "), got ",
              grad_in.sizes());
  TORCH_CHECK(grad_in.device() == features.device(), grad_name, " is on ", grad_in.device(),
              " but features are on ", features.device());
  if (from_entropy) {
    TORCH_CHECK(entropy_mean ? grad_entropy.dim() == 0
                             : grad_entropy.dim() == 1 && grad_entropy.size(0) == heads,
                "grad_entropy must have shape ", entropy_mean ? "() (mean over heads)" : "(heads,)",
                " with heads = ", heads, ", got ", grad_entropy.sizes());
    TORCH_CHECK(grad_entropy.device() == features.device(), "grad_entropy is on ",
                grad_entropy.device(), " but features are on ", features.device());
  }
  TORCH_CHECK(lse.dim() == 2 && lse.size(0) == rows && lse.size(1) == heads,
              "lse must have shape (rows, heads) = (", rows, ", ", heads, "), got ", lse.sizes());
  TORCH_CHECK(lse.device() == features.device(), "lse is on ", lse.device(),
              " but features are on ", features.device());
  TORCH_CHECK(lse.scalar_type() == acc_type, "lse must be in the compute dtype ", acc_type,
              ", got ", lse.scalar_type());
  const c10::cuda::CUDAGuard guard(features.device());

  const at::Tensor r = features.contiguous();
  const at::Tensor v = vt.contiguous();
  const at::Tensor c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const at::Tensor g = grad_in.to(acc_type).contiguous();  // dL/dp, or p for the entropy's
  const at::Tensor ge = from_entropy ? grad_entropy.to(acc_type).contiguous() : at::Tensor();
  const at::Tensor l = lse.contiguous();
  const auto acc = r.options().dtype(acc_type);
  at::Tensor grad_features = at::empty({rows, dim}, r.options());
  at::Tensor expected = bins > kTileBins ? at::empty({rows, heads, 2}, acc) : at::Tensor();
  // Whole tiles in the compute dtype (float32 or float64 features, rows and dim multiples of the
  // tile): the gradient's memory is the accumulator too, since each block overwrites its own rows'
  // sums with their final values element by element. Saves a B x D buffer (512 MiB at xl).
  const bool in_place = r.scalar_type() == acc_type && padded_rows(rows) == rows &&
                        padded_dim(dim) == dim;
  at::Tensor accumulator =
      in_place ? grad_features : at::empty({padded_rows(rows), padded_dim(dim)}, acc);

  BackwardParams params{};
  static_cast<Problem&>(params) = problem_of(r, v, c, cosine, estimator_id, tau, seed, row_offset);
  if (from_entropy) {
    params.grad_entropy = ge.data_ptr();
    params.histogram = g.data_ptr();
    params.entropy_mean = entropy_mean;
  } else {
    params.grad_histogram = g.data_ptr();
  }
  params.lse = l.data_ptr();
  params.expected = expected.defined() ? expected.data_ptr() : nullptr;
  params.accumulator = accumulator.data_ptr();
  params.grad_features = grad_features.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  check_cuda(launch_histogram_backward(mode, params, stream), "the histogram backward launch");
  return grad_features;
}

at::Tensor histogram_backward(const at::Tensor& grad_histogram, const at::Tensor& features,
                              const at::Tensor& vt, const std::optional<at::Tensor>& bias,
                              const at::Tensor& lse, std::string_view similarity,
                              std::string_view estimator, double tau, int64_t seed,
                              int64_t row_offset, bool allow_tf32) {
  return backward(grad_histogram, at::Tensor(), at::Tensor(), features, vt, bias, lse, similarity,
                  estimator, tau, seed, row_offset, allow_tf32, false);
}

at::Tensor entropy_backward(const at::Tensor& grad_entropy, const at::Tensor& histogram,
                            const at::Tensor& features, const at::Tensor& vt,
                            const std::optional<at::Tensor>& bias, const at::Tensor& lse,
                            std::string_view similarity, std::string_view estimator, double tau,
                            int64_t seed, int64_t row_offset, bool allow_tf32, bool mean) {
  return backward(at::Tensor(), grad_entropy, histogram, features, vt, bias, lse, similarity,
                  estimator, tau, seed, row_offset, allow_tf32, mean);
}

}  // namespace
}  // namespace fierce

TORCH_LIBRARY_FRAGMENT(fierce_ext, m) {
  // The fake (meta) implementations live in Python; torch imports this module to find them.
  m.set_python_module("fierce_ext.backends.cuda");
  m.def("cuda_histogram_forward(Tensor features, Tensor vt, Tensor? bias, str similarity, "
        "str estimator, float tau, int seed, int row_offset, bool allow_tf32) -> (Tensor, Tensor)");
  m.def("cuda_histogram_backward(Tensor grad_histogram, Tensor features, Tensor vt, Tensor? bias, "
        "Tensor lse, str similarity, str estimator, float tau, int seed, int row_offset, "
        "bool allow_tf32) -> Tensor");
  m.def("cuda_entropy_forward(Tensor features, Tensor vt, Tensor? bias, str similarity, "
        "str estimator, float tau, int seed, int row_offset, bool allow_tf32, bool mean) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("cuda_entropy_backward(Tensor grad_entropy, Tensor histogram, Tensor features, Tensor vt, "
        "Tensor? bias, Tensor lse, str similarity, str estimator, float tau, int seed, "
        "int row_offset, bool allow_tf32, bool mean) -> Tensor");
}

TORCH_LIBRARY_IMPL(fierce_ext, CUDA, m) {
  m.impl("cuda_histogram_forward", &fierce::histogram_forward);
  m.impl("cuda_histogram_backward", &fierce::histogram_backward);
  m.impl("cuda_entropy_forward", &fierce::entropy_forward);
  m.impl("cuda_entropy_backward", &fierce::entropy_backward);
}
