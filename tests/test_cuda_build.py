"""The compiled CUDA extension without a GPU: its kernels' logic, its registration, its fakes.

Two groups of tests:

* `test_emulated_*`: the kernels of csrc/fierce_kernels.cu compiled by g++ for the CPU emulation
  of csrc/emulation/ (each CUDA thread a fiber, real barriers and warp exchanges, WMMA tiles
  computed with the same input roundings: float16/bfloat16 operands, tf32 rounding to nearest
  with ties away), driven on small ragged shapes and compared with the torch backend in the same
  dtype. They need only g++ and run in the main CI. They check the kernels' tiling, masks, noise
  indexing, online log-sum-exp, partial histograms, NaN poisoning and the gradient's GEMM; not
  the GPU's own accumulation order or memory-model bugs (tests/gpu/test_cuda_gpu.py does).
* the others: the built extension `fierce_ext._C` (imports, op schemas, fake implementations,
  the backend's reason for being unavailable without a GPU). They need a CUDA build of torch and
  the installed extension: .ci/check_cuda_build.sh builds it in a second venv and runs them with
  FIERCE_EXT_REQUIRE_EXTENSION=1, which turns "not built" into a failure. Elsewhere (the CPU
  torch of the main CI, where setup.py builds fierce_ext._C with its CPU noise op only) they are
  skipped with that reason.

Tolerances of the emulated comparisons (kernel vs torch backend, same rounded inputs): float64
to 1e-14; float32 (exact FMAs) to a few float32 ulps of the logits (the sums run in another
order); tf32/float16/bfloat16 to the operand rounding (2^-11, 2^-11, 2^-8 relative per product);
each bound is 1.5-12x the error measured on these data (MODES), soft histograms relative to
their largest bin. Hard histograms must be identical except for
rows whose float64 top-2 logit margin is below the mode's tie tolerance (each such row may move
one count between two bins); the data are checked to hold few such rows.
"""

from __future__ import annotations

import ctypes
import importlib.util
import math
import os

import pytest
import torch

import fierce_ext
from fierce_ext import backends
from fierce_ext.backends import chunked
from fierce_ext.backends import cuda as cuda_backend
from fierce_ext.noise import random_words

import cuda_emulator
from oracle import check_huge_rows, check_large_logits, large_logit_problem, near_tie_count

REQUIRE_ENV = "FIERCE_EXT_REQUIRE_EXTENSION"
SIMILARITIES = ("dot", "cosine", "distance")
ESTIMATORS = ("gumbel_hard", "gumbel_soft", "softmax")
FORWARD_SCHEMA = ("fierce_ext::cuda_histogram_forward(Tensor features, Tensor vt, Tensor? bias, "
                  "str similarity, str estimator, float tau, int seed, int row_offset, "
                  "bool allow_tf32) -> (Tensor, Tensor)")
BACKWARD_SCHEMA = ("fierce_ext::cuda_histogram_backward(Tensor grad_histogram, Tensor features, "
                   "Tensor vt, Tensor? bias, Tensor lse, str similarity, str estimator, "
                   "float tau, int seed, int row_offset, bool allow_tf32) -> Tensor")
ENTROPY_FORWARD_SCHEMA = ("fierce_ext::cuda_entropy_forward(Tensor features, Tensor vt, "
                          "Tensor? bias, str similarity, str estimator, float tau, int seed, "
                          "int row_offset, bool allow_tf32, bool mean) -> (Tensor, Tensor, Tensor)")
ENTROPY_BACKWARD_SCHEMA = ("fierce_ext::cuda_entropy_backward(Tensor grad_entropy, "
                           "Tensor histogram, Tensor features, Tensor vt, Tensor? bias, "
                           "Tensor lse, str similarity, str estimator, float tau, int seed, "
                           "int row_offset, bool allow_tf32, bool mean) -> Tensor")
NOISE_SCHEMA = "fierce_ext::philox_uniform_(Tensor(a!) out, int seed, int row_offset) -> ()"


# ============================================================== the built extension (_C)

def _extension():
    """fierce_ext._C with its CUDA ops (a CPU build of it holds the noise op only)."""
    if importlib.util.find_spec("fierce_ext._C") is not None:
        import fierce_ext._C as extension  # noqa: PLC0415  (loading it registers the ops)
        if hasattr(torch.ops.fierce_ext, "cuda_histogram_forward"):
            return extension
    message = ("fierce_ext._C is not built with its CUDA kernels here (setup.py builds them only "
               "with a CUDA torch and nvcc); .ci/check_cuda_build.sh builds them and runs these "
               "tests")
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {message}")
    pytest.skip(message)


def test_extension_imports_and_registers_its_ops():
    extension = _extension()
    assert extension.__name__ == "fierce_ext._C"
    assert str(torch.ops.fierce_ext.cuda_histogram_forward.default._schema) == FORWARD_SCHEMA
    assert str(torch.ops.fierce_ext.cuda_histogram_backward.default._schema) == BACKWARD_SCHEMA
    assert (str(torch.ops.fierce_ext.cuda_entropy_forward.default._schema)
            == ENTROPY_FORWARD_SCHEMA)
    assert (str(torch.ops.fierce_ext.cuda_entropy_backward.default._schema)
            == ENTROPY_BACKWARD_SCHEMA)
    assert str(torch.ops.fierce_ext.philox_uniform_.default._schema) == NOISE_SCHEMA  # CPU op
    # The ops name the module holding their fakes, so torch can import it on demand.
    for name in ("cuda_histogram_forward", "cuda_histogram_backward", "cuda_entropy_forward",
                 "cuda_entropy_backward"):
        stub = torch._C._dispatch_pystub(f"fierce_ext::{name}", "")
        assert stub is not None and stub[0] == "fierce_ext.backends.cuda", stub


def test_cuda_backend_says_why_it_cannot_run():
    _extension()
    assert "CUDA devices only" in cuda_backend.unavailable_reason(torch.device("cpu"))
    reason = cuda_backend.unavailable_reason(torch.device("cuda"))
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0):
        assert reason is None
    elif not torch.cuda.is_available():
        assert "no usable CUDA device" in reason
    status = fierce_ext.available_backends("cuda")["cuda"]
    assert status.available == (reason is None) and (status.reason == reason or reason is None)


def test_compiled_ops_reject_cpu_tensors_clearly():
    _extension()
    features, vt = torch.randn(5, 3), torch.randn(2, 4, 3)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.fierce_ext.cuda_histogram_forward(features, vt, None, "dot", "gumbel_hard",
                                                    1.0, 0, 0, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fake_implementations_give_shapes_and_dtypes(dtype):
    _extension()
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    compute = torch.float64 if dtype == torch.float64 else torch.float32
    with FakeTensorMode():
        features = torch.empty(37, 11, dtype=dtype)
        vt = torch.empty(3, 130, 11, dtype=dtype)
        bias = torch.empty(3, 130, dtype=compute)
        histogram, lse = torch.ops.fierce_ext.cuda_histogram_forward(
            features, vt, bias, "distance", "gumbel_soft", 0.5, 7, 2, True)
        grad = torch.ops.fierce_ext.cuda_histogram_backward(
            histogram, features.t().contiguous().t(), vt, bias, lse, "distance", "gumbel_soft",
            0.5, 7, 2, True)
        entropies = [torch.ops.fierce_ext.cuda_entropy_forward(
            features, vt, bias, "distance", "gumbel_soft", 0.5, 7, 2, True, mean)[0]
            for mean in (True, False)]
        entropy_grad = torch.ops.fierce_ext.cuda_entropy_backward(
            entropies[0], histogram, features.t().contiguous().t(), vt, bias, lse, "distance",
            "gumbel_soft", 0.5, 7, 2, True, True)
    assert (histogram.shape, histogram.dtype) == ((3, 130), compute)
    assert (lse.shape, lse.dtype) == ((37, 3), compute)
    assert (grad.shape, grad.dtype) == ((37, 11), dtype)
    assert grad.is_contiguous()  # the kernel writes a contiguous gradient whatever the input
    assert [(e.shape, e.dtype) for e in entropies] == [((), compute), ((3,), compute)]
    assert (entropy_grad.shape, entropy_grad.dtype) == ((37, 11), dtype)
    assert entropy_grad.is_contiguous()


# The projection cache keys on data_ptr, which fake tensors only warn about.
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backend_functions_run_on_fake_cuda_tensors(dtype):
    # The adapters of fierce_ext/backends/cuda.py against the ops' schemas and fakes: arguments,
    # their order and types, output shapes and dtypes (no GPU: fake CUDA tensors).
    _extension()
    from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: PLC0415

    with FakeTensorMode(allow_non_fake_inputs=False):
        features = torch.empty(37, 11, dtype=dtype, device="cuda")
        dictionary = torch.empty(3, 11, 130, device="cuda")
        histogram, lse = cuda_backend.histogram_forward(features, dictionary, "cosine",
                                                        "gumbel_hard", 0.5, 7, 2)
        grad = cuda_backend.histogram_backward(histogram, features, dictionary, lse, "cosine",
                                               "gumbel_hard", 0.5, 7, 2)
        outputs = [cuda_backend.entropy_forward(features, dictionary, "distance", "softmax", 1.0,
                                                3, 0, reduction) for reduction in ("mean", "none")]
        entropy_grads = [cuda_backend.entropy_backward(entropy, hist, features, dictionary, l,
                                                       "distance", "softmax", 1.0, 3, 0, reduction)
                         for (entropy, hist, l), reduction in zip(outputs, ("mean", "none"))]
    assert (histogram.shape, histogram.dtype, lse.shape) == ((3, 130), torch.float32, (37, 3))
    assert [o[0].shape for o in outputs] == [(), (3,)]
    assert all(o[1].shape == (3, 130) and o[2].shape == (37, 3) for o in outputs)
    assert all((g.shape, g.dtype) == ((37, 11), dtype) for g in [grad, *entropy_grads])


def test_fake_implementations_trace_into_a_graph():
    _extension()
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415

    def step(features, vt, grad_histogram):
        histogram, lse = torch.ops.fierce_ext.cuda_histogram_forward(
            features, vt, None, "cosine", "gumbel_hard", 1.0, 3, 0, False)
        return histogram, torch.ops.fierce_ext.cuda_histogram_backward(
            grad_histogram, features, vt, None, lse, "cosine", "gumbel_hard", 1.0, 3, 0, False)

    graph = make_fx(step, tracing_mode="fake")(torch.randn(8, 5), torch.randn(2, 6, 5),
                                               torch.randn(2, 6))
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert {"fierce_ext.cuda_histogram_forward.default",
            "fierce_ext.cuda_histogram_backward.default"} <= targets


# ============================================================== the kernels, emulated on the CPU

# GemmMode of csrc/fierce.h and the tolerances of the module docstring: (lse: |d| <= tol
# (1 + |lse|), soft histogram: |d| <= tol max p, gradient: tol relative to max |grad|). Measured
# on these data (every similarity and estimator, the worst): float16 7.8e-5, 6.2e-4, 2.5e-3;
# bfloat16 9.4e-4, 7.2e-3, 2.7e-2; tf32 1.8e-4, 7.2e-4, 2.5e-3; float32 1.6e-7, 5.1e-7,
# 1.5e-6; float64 2e-16, 8e-16, 8e-15. The emulation is deterministic, so these hold exactly.
MODES = {
    "float16": (0, torch.float16, False, (1e-3, 5e-3, 1e-2)),
    "bfloat16": (1, torch.bfloat16, False, (6e-3, 4e-2, 4e-2)),
    "tf32": (2, torch.float32, True, (1.5e-3, 5e-3, 1e-2)),
    "float32": (3, torch.float32, False, (1e-6, 4e-6, 1e-5)),
    "float64": (4, torch.float64, False, (1e-14, 1e-14, 1e-13)),
}
ESTIMATOR_IDS = {"gumbel_hard": 0, "gumbel_soft": 1, "softmax": 2}
TILE_ROWS, TILE_DIM = 32, 128  # kTileRows / kTileDim of csrc/fierce.h (workspace shapes)


@pytest.fixture(scope="module")
def emu():
    """The emulated kernels as a ctypes library, built once per source version."""
    try:
        return cuda_emulator.build()
    except cuda_emulator.BuildError as error:
        if "no C++ compiler" in str(error):
            pytest.skip(str(error))
        pytest.fail(str(error))


def _ptr(tensor):
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


def _launch_inputs(mode, features, dictionary, similarity):
    """What the cuda backend hands its kernels in `mode`: (mode id, features dtype, compute
    dtype, contiguous features, projected dictionary vt, bias)."""
    mode_id, dtype, _, _ = MODES[mode]
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    vt, bias = cuda_backend.project(dictionary, similarity, dtype)
    return mode_id, dtype, compute, features.to(dtype).contiguous(), vt, bias


def emulated_forward(lib, mode, features, dictionary, similarity, estimator, tau, seed,
                     row_offset, groups=2, one_launch=False, reduction=None):
    """The kernels' (histogram, lse), with workspaces full of garbage (the kernels must not
    assume zeros). `one_launch`: the forward kernel's last block reduces (no reduce kernel),
    with a zeroed counter that it must leave at zero. `reduction` ("mean" or "none"): also the
    fused entropy, returned first."""
    mode_id, dtype, compute, features, vt, bias = _launch_inputs(mode, features, dictionary,
                                                                 similarity)
    rows, dim = features.shape
    heads, bins, _ = vt.shape
    groups = max(1, min(groups, -(-rows // TILE_ROWS)))
    histogram = torch.full((heads, bins), 123.0, dtype=compute)
    lse = torch.full((rows, heads), 77.0, dtype=compute)
    partial_dtype = torch.int32 if estimator == "gumbel_hard" else compute
    partials = torch.full((groups, heads, bins), 999, dtype=partial_dtype)
    flags = torch.full((groups, heads), 5, dtype=torch.int32)
    counter = torch.zeros(1, dtype=torch.int32) if one_launch else None
    entropy = (None if reduction is None else
               torch.full(() if reduction == "mean" else (heads,), 55.0, dtype=compute))
    error = lib.fierce_emu_forward(
        mode_id, _ptr(features), _ptr(vt), _ptr(bias), _ptr(histogram), _ptr(lse),
        _ptr(partials), _ptr(flags), rows, dim, heads, bins, groups,
        int(similarity == "cosine"), ESTIMATOR_IDS[estimator], tau, seed, row_offset,
        _ptr(counter), _ptr(entropy), int(reduction == "mean"))
    assert error == 0, f"emulated forward launch failed ({error})"
    if one_launch:
        assert counter.item() == 0, "the one-launch forward must leave its counter at 0"
    return (histogram, lse) if reduction is None else (entropy, histogram, lse)


def emulated_backward(lib, mode, grad_histogram, features, dictionary, lse, similarity,
                      estimator, tau, seed, row_offset, entropy_of=None, in_place=False):
    """The kernels' gradient for dL/dp = grad_histogram, or, with `entropy_of` = (histogram,
    reduction), for dL/dH = grad_histogram of the fused entropy. `in_place`: the gradient's
    memory is the accumulator too, as the op does for whole tiles in the compute dtype."""
    mode_id, dtype, compute, features, vt, bias = _launch_inputs(mode, features, dictionary,
                                                                 similarity)
    rows, dim = features.shape
    heads, bins, _ = vt.shape
    nan = float("nan")
    expected = torch.full((rows, heads, 2), nan, dtype=compute) if bins > 128 else None
    accumulator = torch.full((-(-rows // TILE_ROWS) * TILE_ROWS, -(-dim // TILE_DIM) * TILE_DIM),
                             nan, dtype=compute)
    grad = torch.full((rows, dim), nan, dtype=dtype)
    if in_place:
        assert accumulator.shape == grad.shape and dtype == compute, "not an in-place shape"
        accumulator = grad
    grad_in = grad_histogram.to(compute).contiguous()
    grad_entropy = histogram = None
    mean = False
    if entropy_of is not None:
        (histogram, reduction), grad_entropy, grad_in = entropy_of, grad_in, None
        histogram, mean = histogram.to(compute).contiguous(), reduction == "mean"
    error = lib.fierce_emu_backward(
        mode_id, _ptr(grad_in), _ptr(features), _ptr(vt),
        _ptr(bias), _ptr(lse.contiguous()), _ptr(expected), _ptr(accumulator), _ptr(grad), rows,
        dim, heads, bins, int(similarity == "cosine"), ESTIMATOR_IDS[estimator], tau, seed,
        row_offset, _ptr(grad_entropy), _ptr(histogram), int(mean))
    assert error == 0, f"emulated backward launch failed ({error})"
    return grad


def _kernel_inputs(mode, features, dictionary, similarity):
    """Features and projected dictionary as the kernel multiplies them, in float64."""
    _, dtype, tf32, _ = MODES[mode]
    r = features.to(dtype).double()
    vt, bias = cuda_backend.project(dictionary, similarity, dtype)
    v = vt.double()
    if tf32:  # round to 10 mantissa bits, nearest with ties away (cvt.rna.tf32.f32)
        def rna(x):
            bits = x.float().view(torch.int32)
            return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()
        r, v = rna(r), rna(v)
    return r, v, (None if bias is None else bias.double())


def _near_ties(mode, features, dictionary, similarity, tau, seed, row_offset):
    """Rows (b, h) whose float64 top-2 logit margin is below twice a bound on the logit error
    (oracle.near_tie_count) for the operand rounding of the mode."""
    r, v, bias = _kernel_inputs(mode, features, dictionary, similarity)
    eps = 2.0**-53 if MODES[mode][1] == torch.float64 else 2.0**-24
    operand = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "tf32": 2.0**-10}.get(mode, 0.0)
    return near_tie_count(r, v, bias, operand, eps, similarity, tau, seed, row_offset)


def _case(similarity, seed=0):
    """Small ragged shapes that reach every path: several bin tiles (K > 128: the second soft
    sweep and the expected-value kernel), a single bin tile, D = 1, several row tiles/heads."""
    generator = torch.Generator().manual_seed(seed)
    if similarity == "dot":
        rows, dim, heads, bins = 40, 24, 2, 150
        scale = 0.3
    elif similarity == "cosine":
        rows, dim, heads, bins = 33, 20, 3, 100
        scale = 1.0
    else:  # the age case: one-dimensional features, distance to bin centres
        rows, dim, heads, bins = 70, 1, 1, 130
        scale = 0.05
    features = torch.randn(rows, dim, generator=generator, dtype=torch.float64) * scale
    dictionary = (torch.rand(heads, dim, bins, generator=generator, dtype=torch.float64) * 2 - 1)
    if similarity == "distance":
        features, dictionary = features * 20, dictionary * 1.0
    return features, dictionary


def test_emulated_philox_words_match_the_noise_rule(emu):
    seed, row_offset, heads, bins = 0x0123456789ABCDEF, 5, 2, 9
    words = random_words(seed, 3, heads, bins, row_offset)
    out = (ctypes.c_uint32 * 4)()
    quads = -(-bins // 4)
    for b in range(3):
        for h in range(heads):
            for q in range(quads):
                emu.fierce_emu_philox(((row_offset + b) * heads + h) * quads + q, seed, out)
                for w in range(4):
                    if 4 * q + w < bins:
                        assert int(words[b, h, 4 * q + w]) == out[w], (b, h, q, w)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("mode", list(MODES))
def test_emulated_kernels_match_the_torch_backend(emu, mode, similarity, estimator):
    _, dtype, _, (lse_tol, hist_tol, grad_tol) = MODES[mode]
    features, dictionary = _case(similarity)
    features = features.to(dtype)  # both sides see the same rounded features
    tau, seed, row_offset = 0.7, 1234, 3
    histogram, lse = emulated_forward(emu, mode, features, dictionary, similarity, estimator,
                                      tau, seed, row_offset)
    expected_histogram, expected_lse = chunked.histogram_forward(
        features, dictionary, similarity, estimator, tau, seed, row_offset)
    rows = features.shape[0]
    assert histogram.dtype == expected_histogram.dtype and lse.dtype == expected_lse.dtype
    assert torch.isfinite(histogram).all() and torch.isfinite(lse).all()
    assert ((lse - expected_lse).abs() <= lse_tol * (1 + expected_lse.abs())).all(), \
        (lse - expected_lse).abs().max()
    if estimator == "gumbel_hard":
        counts = (histogram.double() * rows).round()
        assert (counts - histogram.double() * rows).abs().max() < 1e-3  # whole counts
        moved = (counts - (expected_histogram.double() * rows).round()).abs().sum() / 2
        ties = _near_ties(mode, features, dictionary, similarity, tau, seed, row_offset)
        assert ties <= max(2, rows * dictionary.shape[0] // 20), "test data too close to ties"
        assert moved <= ties, (moved, ties)
    else:
        assert (histogram - expected_histogram).abs().max() <= \
            hist_tol * expected_histogram.abs().max()
    torch.testing.assert_close(histogram.sum(dim=1).double(),
                               torch.ones(histogram.shape[0], dtype=torch.float64),
                               atol=1e-5 if dtype != torch.float64 else 1e-12, rtol=0)

    grad_histogram = torch.randn(histogram.shape, generator=torch.Generator().manual_seed(1),
                                 dtype=torch.float64).to(histogram.dtype)
    grad = emulated_backward(emu, mode, grad_histogram, features, dictionary, lse, similarity,
                             estimator, tau, seed, row_offset)
    expected_grad = chunked.histogram_backward(grad_histogram, features, dictionary,
                                               expected_lse, similarity, estimator, tau, seed,
                                               row_offset)
    assert grad.dtype == features.dtype and torch.isfinite(grad).all()
    scale = expected_grad.double().abs().max()
    assert scale > 0
    error = (grad.double() - expected_grad.double()).abs().max() / scale
    assert error <= grad_tol, error


@pytest.mark.parametrize("bins", [100, 200], ids=["one-bin-tile", "two-bin-tiles"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_emulated_float32_with_large_logits(emu, estimator, bins):
    # The age term's logits (~1e4): the kernels must normalise exp(z - lse) themselves, in the
    # one-tile backward and through expected_kernel (K > 128).
    features, dictionary, grad_histogram = large_logit_problem(bins=bins)
    histogram, lse = emulated_forward(emu, "float32", features, dictionary, "distance",
                                      estimator, 1.0, 3, 0)
    grad = emulated_backward(emu, "float32", grad_histogram, features, dictionary, lse,
                             "distance", estimator, 1.0, 3, 0)
    check_large_logits(histogram, grad, features, dictionary, grad_histogram, estimator, seed=3)


@pytest.mark.parametrize("estimator", ["softmax", "gumbel_soft"])
def test_emulated_float32_cosine_of_huge_rows(emu, estimator):
    # |r|^2 past float32's range in row_scale, a^2 below it in gradient_kernel's epilogue.
    def run(features, dictionary, grad_histogram):
        histogram, lse = emulated_forward(emu, "float32", features, dictionary, "cosine",
                                          estimator, 1.0, 5, 0)
        grad = emulated_backward(emu, "float32", grad_histogram, features, dictionary, lse,
                                 "cosine", estimator, 1.0, 5, 0)
        return histogram, grad

    check_huge_rows(run, estimator)


@pytest.mark.parametrize("bins", [100, 200], ids=["one-bin-tile", "two-bin-tiles"])
def test_emulated_float16_under_a_loss_scale(emu, bins):
    # dL/dp of a GradScaler-scaled entropy (2^16 x ~70 on empty bins) is far past float16's
    # 65504: the kernels' delta must not pass through float16 (they keep it in TF32).
    features, dictionary = _case("cosine")
    features = features.to(torch.float16)
    dictionary = torch.rand(1, features.shape[1], bins, generator=torch.Generator().manual_seed(2),
                            dtype=torch.float64) * 2 - 1
    histogram, lse = emulated_forward(emu, "float16", features, dictionary, "cosine",
                                      "gumbel_hard", 1.0, 9, 0)
    grad_histogram = 2.0**16 * 70 * torch.randn(histogram.shape,
                                                generator=torch.Generator().manual_seed(3))
    grad = emulated_backward(emu, "float16", grad_histogram, features, dictionary, lse,
                             "cosine", "gumbel_hard", 1.0, 9, 0)
    want = chunked.histogram_backward(grad_histogram, features, dictionary, lse, "cosine",
                                      "gumbel_hard", 1.0, 9, 0)
    assert torch.isfinite(want).all() and torch.isfinite(grad).all()
    error = (grad.double() - want.double()).abs().max() / want.double().abs().max()
    assert error <= MODES["float16"][3][2], error


@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft"])
def test_emulated_row_groups_only_reorder_sums(emu, estimator):
    # One block per head walking every row tile, or several: the same counts, the same soft sums
    # up to rounding.
    features, dictionary = _case("dot", seed=3)
    features = torch.cat([features, features[:30] * 0.5])  # 70 rows: 3 row tiles
    results = [emulated_forward(emu, "float32", features, dictionary, "dot", estimator, 1.0, 99,
                                0, groups=groups)[0] for groups in (1, 2, 3)]
    for other in results[1:]:
        if estimator == "gumbel_hard":
            assert torch.equal(results[0], other)
        else:
            torch.testing.assert_close(other, results[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("mode", ["tf32", "float64"])
def test_emulated_one_launch_forward_gives_the_two_launch_bits(emu, mode, similarity, estimator):
    # Tiny problems skip the reduce kernel: the forward kernel's last block sums the same
    # partials in the same order, so the histogram keeps its bits (and lse is untouched).
    features, dictionary = _case(similarity, seed=6)
    args = (emu, mode, features, dictionary, similarity, estimator, 0.8, 31, 2)
    for groups in (1, 2, 3):
        two = emulated_forward(*args, groups=groups)
        one = emulated_forward(*args, groups=groups, one_launch=True)
        assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    poisoned = features.clone()
    poisoned[-1, 0] = float("nan")
    histogram, _ = emulated_forward(emu, mode, poisoned, dictionary, similarity, estimator, 0.8,
                                    31, 2, one_launch=True)
    assert torch.isnan(histogram).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("mode", ["tf32", "float64"])
def test_emulated_fused_entropy_matches_the_entropy_formulas(emu, mode, similarity, estimator,
                                                             reduction):
    # Forward: the kernels' entropy of their own histogram is backends.entropy_bits of it, one
    # launch or two, and asking for it leaves the histogram's bits alone. Backward: dL/dH turned
    # into dL/dp in the kernels gives the gradient of dL/dp = entropy_bits_backward(dL/dH).
    features, dictionary = _case(similarity, seed=8)
    args = (emu, mode, features, dictionary, similarity, estimator, 0.9, 17, 1)
    compute = MODES[mode][1] if mode == "float64" else torch.float32
    eps = torch.finfo(compute).eps
    plain_histogram, plain_lse = emulated_forward(*args)
    for one_launch in (False, True):
        entropy, histogram, lse = emulated_forward(*args, one_launch=one_launch,
                                                   reduction=reduction)
        assert torch.equal(histogram, plain_histogram) and torch.equal(lse, plain_lse)
        expected = backends.entropy_bits(histogram, reduction)
        assert entropy.shape == expected.shape and entropy.dtype == compute
        bound = math.log2(dictionary.shape[2])
        torch.testing.assert_close(entropy, expected, rtol=0, atol=64 * eps * bound)

    generator = torch.Generator().manual_seed(2)
    grad_entropy = (torch.randn(entropy.shape, generator=generator, dtype=torch.float64) + 2
                    ).to(compute)
    grad = emulated_backward(emu, mode, grad_entropy, features, dictionary, lse, similarity,
                             estimator, 0.9, 17, 1, entropy_of=(histogram, reduction))
    grad_histogram = backends.entropy_bits_backward(grad_entropy, histogram, reduction)
    expected_grad = emulated_backward(emu, mode, grad_histogram, features, dictionary, lse,
                                      similarity, estimator, 0.9, 17, 1)
    scale = expected_grad.double().abs().max()
    assert scale > 0 and torch.isfinite(grad).all()
    # G differs from torch's by a few ulps of |G| <= 71 |dL/dH|; delta and the GEMM carry that.
    assert (grad.double() - expected_grad.double()).abs().max() <= 1e3 * eps * scale


def test_emulated_fused_entropy_of_a_poisoned_histogram_is_nan(emu):
    features, dictionary = _case("cosine", seed=9)
    features[5, 2] = float("nan")
    for one_launch in (False, True):
        entropy, histogram, lse = emulated_forward(emu, "float32", features, dictionary,
                                                   "cosine", "gumbel_hard", 1.0, 3, 0,
                                                   one_launch=one_launch, reduction="none")
        assert torch.isnan(histogram).all() and torch.isnan(entropy).all()
    grad = emulated_backward(emu, "float32", torch.ones(entropy.shape), features, dictionary,
                             lse, "cosine", "gumbel_hard", 1.0, 3, 0,
                             entropy_of=(histogram, "none"))
    assert torch.isnan(grad).all()  # G is NaN in every bin, so every row's gradient is


def test_emulated_one_launch_rule_covers_the_paper_shapes(emu):
    # Row-tile groups per head are at most ceil(B / 32): the paper's few-shot (256 x 1 x 100),
    # hyperspectral (200 x 1 x 100) and age (B = 256, K = 100) forwards take one launch on any
    # GPU; a large problem does not.
    for rows, heads, bins in ((256, 1, 100), (200, 1, 100)):
        assert emu.fierce_emu_one_launch_forward(-(-rows // TILE_ROWS), heads, bins) == 1
    assert emu.fierce_emu_one_launch_forward(66, 8, 256) == 0  # the benchmark's "mid" on 132 SMs


def test_emulated_many_bins_single_head(emu):
    # K = 600: five bin tiles, the last one partial.
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(35, 6, generator=generator, dtype=torch.float64)
    dictionary = torch.rand(1, 6, 600, generator=generator, dtype=torch.float64) * 2 - 1
    for estimator in ("gumbel_hard", "softmax"):
        histogram, lse = emulated_forward(emu, "float64", features, dictionary, "cosine",
                                          estimator, 0.25, 7, 11)
        expected_histogram, expected_lse = chunked.histogram_forward(
            features, dictionary, "cosine", estimator, 0.25, 7, 11)
        torch.testing.assert_close(lse, expected_lse, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(histogram, expected_histogram, atol=1e-12, rtol=0)
        grad_histogram = torch.randn(1, 600, generator=generator, dtype=torch.float64)
        grad = emulated_backward(emu, "float64", grad_histogram, features, dictionary, lse,
                                 "cosine", estimator, 0.25, 7, 11)
        expected = chunked.histogram_backward(grad_histogram, features, dictionary,
                                              expected_lse, "cosine", estimator, 0.25, 7, 11)
        torch.testing.assert_close(grad, expected, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_emulated_non_finite_rows_poison_like_the_torch_backend(emu, estimator, poison):
    features, dictionary = _case("dot", seed=4)
    features[7, 3] = float(poison)
    histogram, lse = emulated_forward(emu, "float32", features, dictionary, "dot", estimator,
                                      1.0, 5, 0)
    expected_histogram, expected_lse = chunked.histogram_forward(
        features.float(), dictionary, "dot", estimator, 1.0, 5, 0)
    # The rule: a row without finite logits makes the whole histogram NaN, in every estimator.
    assert torch.isnan(expected_histogram).all()
    assert torch.isnan(histogram).all()
    assert torch.equal(torch.isfinite(lse), torch.isfinite(expected_lse))
    assert not torch.isfinite(lse[7]).any() and torch.isfinite(lse[:7]).all()
    grad = emulated_backward(emu, "float32", torch.randn(histogram.shape), features, dictionary,
                             lse, "dot", estimator, 1.0, 5, 0)
    assert torch.isnan(grad[7]).all()
    others = torch.cat([grad[:7], grad[8:]])
    assert torch.isfinite(others).all()  # only the poisoned row's gradient is NaN


@pytest.mark.parametrize("mode", ["tf32", "float32", "float64"])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_emulated_gradient_written_over_its_accumulator(emu, mode, similarity):
    # For whole tiles in the compute dtype the op hands the kernels the gradient's own memory as
    # the accumulator (csrc/fierce_ops.cpp): each block overwrites its rows' sums with their final
    # values, element by element. That must give the bits of a separate accumulator.
    generator = torch.Generator().manual_seed(23)
    rows, dim, heads, bins = 2 * TILE_ROWS, 2 * TILE_DIM, 2, 150
    features = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    dictionary = torch.rand(heads, dim, bins, generator=generator, dtype=torch.float64) * 2 - 1
    if similarity == "distance":
        features, dictionary = features * 0.2, dictionary * 0.2
    for estimator in ESTIMATORS:
        _, lse = emulated_forward(emu, mode, features, dictionary, similarity, estimator, 0.7, 5,
                                  0)
        grad_histogram = torch.randn(heads, bins, generator=generator)
        args = (emu, mode, grad_histogram, features, dictionary, lse, similarity, estimator, 0.7,
                5, 0)
        separate, in_place = emulated_backward(*args), emulated_backward(*args, in_place=True)
        assert torch.isfinite(separate).all()
        torch.testing.assert_close(in_place, separate, rtol=0, atol=0,
                                   msg=lambda m: f"{estimator}: {m}")


SCHEDULES = ("reverse", "shuffle:1")


@pytest.mark.parametrize("mode", ["tf32", "bfloat16", "float64"])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_emulated_kernels_give_the_same_bits_in_any_thread_order(emu, monkeypatch, mode,
                                                                 similarity):
    # The emulation runs threads in a fixed order between barriers and blocks one after another,
    # which hides races (a missing barrier, a last block that is not the highest index). Other
    # orders (FIERCE_EMU_SCHEDULE) must give the same bits: the kernels are race-free and
    # deterministic, whichever thread or block runs first.
    features, dictionary = _case(similarity, seed=11)
    args = (emu, mode, features, dictionary, similarity)

    def everything():
        out = []
        for estimator in ESTIMATORS:
            common = (0.8, 31, 2)
            two = emulated_forward(*args, estimator, *common, groups=2)
            one = emulated_forward(*args, estimator, *common, groups=2, one_launch=True,
                                   reduction="mean")
            grad_histogram = torch.randn(two[0].shape,
                                         generator=torch.Generator().manual_seed(5))
            out += [*two, *one, emulated_backward(emu, mode, grad_histogram, features,
                                                  dictionary, two[1], similarity, estimator,
                                                  *common)]
        return out

    monkeypatch.delenv("FIERCE_EMU_SCHEDULE", raising=False)
    expected = everything()
    for schedule in SCHEDULES:
        monkeypatch.setenv("FIERCE_EMU_SCHEDULE", schedule)
        for got, want in zip(everything(), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"{schedule}: {m}")


@pytest.mark.parametrize("schedule", [None, *SCHEDULES])
def test_emulated_barriers_keep_each_threads_locals(emu, monkeypatch, schedule):
    # The emulation's own contract, which every kernel test above relies on: each fiber resumes
    # after a barrier with its locals intact and sees what the others wrote before it. Ragged
    # thread counts leave a partial warp; stacks are reused from block to block.
    if schedule is None:
        monkeypatch.delenv("FIERCE_EMU_SCHEDULE", raising=False)
    else:
        monkeypatch.setenv("FIERCE_EMU_SCHEDULE", schedule)
    grid, threads, rounds = 3, 70, 6
    out = (ctypes.c_int64 * (grid * threads))()
    assert emu.fierce_emu_check_barrier_rounds(grid, threads, rounds, out) == 0
    for block in range(grid):
        values = [block * 1000 + t for t in range(threads)]
        for _ in range(rounds):
            values = [3 * values[t] + values[(t + 1) % threads] for t in range(threads)]
        assert list(out[block * threads:(block + 1) * threads]) == values, f"block {block}"


def test_emulated_launch_fails_when_some_threads_skip_a_barrier(emu, capfd):
    reached = (ctypes.c_int * 64)()
    assert emu.fierce_emu_check_skipped_barrier(64, reached) != 0
    assert "deadlock in block 0: 32 of 64 threads finished" in capfd.readouterr().err
    assert list(reached) == [0] * 64
    # The error is reported once and the next launch runs normally.
    out = (ctypes.c_int64 * 32)()
    assert emu.fierce_emu_check_barrier_rounds(1, 32, 1, out) == 0
    assert list(out) == [3 * t + (t + 1) % 32 for t in range(32)]
