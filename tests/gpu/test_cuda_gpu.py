"""The `cuda` backend (the compiled extension fierce_ext._C) on a GPU.

Skipped without CUDA (tests/gpu/conftest.py); with CUDA, a missing or broken extension FAILS
(the GPU check builds it first). Compared on the same device and the same rounded inputs with:
* the torch backend (same projected math): hard histograms identical except rows whose float64
  top-2 logit margin is below twice a bound on the logit error of the mode (each such row may
  move one count); soft histograms, lse and gradients within the per-mode tolerances below;
* the reference backend in float64 (float64 features: to 1e-10);
* the Triton backend when it is available: the same hard histograms (up to near ties);
* itself: bitwise identical outputs run to run.

Tolerances (kernel vs torch backend), from the operand rounding of each mode: float64 1e-12;
float32 with FIERCE_EXT_FP32_PRECISION=ieee: a few ulps (2e-5 relative); tf32 and float16:
2^-11 per operand (1e-2); bfloat16: 2^-8 (4e-2 on gradients relative to their max).
"""

from __future__ import annotations

import math

import pytest
import torch

import fierce_ext
from fierce_ext.backends import FP32_PRECISION_ENV, FP32_PRECISIONS, chunked, reference
from fierce_ext.backends import cuda as cuda_backend
from fierce_ext.dictionary import bin_dictionary, uniform_dictionary
from fierce_ext.noise import gumbel_noise
from measured_errors import within
from oracle import near_tie_count

if not torch.cuda.is_available():  # conftest.py skips this directory too; never run without CUDA
    pytest.skip("needs a CUDA device", allow_module_level=True)

DEVICE = torch.device("cuda")
SIMILARITIES = ("dot", "cosine", "distance")
ESTIMATORS = ("gumbel_hard", "gumbel_soft", "softmax")
# name: (features dtype, fp32 precision, (lse tol relative to 1 + |lse|, soft histogram atol,
#        gradient tol relative to max |grad|), operand rounding u for the tie bound)
MODES = {
    "float16": (torch.float16, "tf32", (1e-2, 2e-4, 1e-2), 2.0**-11),
    "bfloat16": (torch.bfloat16, "tf32", (6e-2, 2e-3, 4e-2), 2.0**-8),
    "tf32": (torch.float32, "tf32", (1e-2, 2e-4, 1e-2), 2.0**-10),
    "float32": (torch.float32, "ieee", (2e-5, 1e-6, 2e-5), 0.0),
    "float64": (torch.float64, "ieee", (1e-12, 1e-12, 1e-10), 0.0),
}


@pytest.fixture(scope="module", autouse=True)
def _cuda_backend_must_be_available():
    reason = cuda_backend.unavailable_reason(DEVICE)
    assert reason is None, f"the cuda backend cannot run on this GPU: {reason}"


@pytest.fixture
def precision(monkeypatch):
    def set_precision(value):
        monkeypatch.setenv(FP32_PRECISION_ENV, value)
    return set_precision


def make_case(rows, dim, heads, bins, similarity, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    dictionary = uniform_dictionary(dim, bins, heads, seed=seed, dtype=torch.float64)
    if similarity == "dot":
        features = features * (1.5 / math.sqrt(dim))
    if similarity == "distance":
        # Small features: the GEMM part of s = 2 r.w - |w|^2, the only part rounded to the
        # operand precision, stays small beside the bias-driven spread of the bins (fewer near
        # ties in the bfloat16 bound).
        features = features * 0.2
    return features.to(DEVICE, dtype), dictionary.to(DEVICE)


def near_ties(mode, features, dictionary, similarity, tau, seed, row_offset):
    """Rows whose float64 top-2 logit margin is below twice a bound on the kernel's logit error
    (oracle.near_tie_count) for the operand rounding of the mode."""
    dtype, _, _, operand = MODES[mode]
    vt, bias = cuda_backend.project(dictionary, similarity, dtype)
    eps = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    return near_tie_count(features.double(), vt.double(), bias, operand, eps, similarity, tau,
                          seed, row_offset)


def assert_same_counts(histogram, expected, rows, ties, mode=None):
    counts = (histogram.double() * rows).round()
    moved = (counts - (expected.double() * rows).round()).abs().sum().item() / 2
    assert within("moved rows", moved, ties, mode), \
        f"{moved} counts moved, {ties} near-tie rows allow"


def run_cuda(features, dictionary, similarity, estimator, tau, seed, row_offset, grad_histogram):
    histogram, lse = cuda_backend.histogram_forward(features, dictionary, similarity, estimator,
                                                    tau, seed, row_offset)
    grad = cuda_backend.histogram_backward(grad_histogram, features, dictionary, lse, similarity,
                                           estimator, tau, seed, row_offset)
    return histogram, lse, grad


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("shape", [(300, 70, 3, 150), (257, 33, 1, 100)], ids=["K150", "K100"])
def test_matches_the_torch_backend(precision, mode, similarity, estimator, shape):
    dtype, fp32_precision, (lse_tol, hist_tol, grad_tol), _ = MODES[mode]
    precision(fp32_precision)
    rows, dim, heads, bins = shape
    features, dictionary = make_case(rows, dim, heads, bins, similarity, dtype=dtype)
    tau, seed, row_offset = 0.5, 2024, 7
    grad_histogram = torch.randn(heads, bins, device=DEVICE, dtype=torch.float64)
    histogram, lse, grad = run_cuda(features, dictionary, similarity, estimator, tau, seed,
                                    row_offset, grad_histogram)
    expected_histogram, expected_lse = chunked.histogram_forward(
        features, dictionary, similarity, estimator, tau, seed, row_offset)
    expected_grad = chunked.histogram_backward(grad_histogram, features, dictionary,
                                               expected_lse, similarity, estimator, tau, seed,
                                               row_offset)
    assert histogram.dtype == expected_histogram.dtype and grad.dtype == dtype
    assert within("lse", (lse - expected_lse).abs() / (1 + expected_lse.abs()), lse_tol)
    if estimator == "gumbel_hard":
        ties = near_ties(mode, features, dictionary, similarity, tau, seed, row_offset)
        # The bound is worst-case (bfloat16 distance flags ~9% of the rows): a wrong kernel
        # moves most rows, so up to 1/8 of them may be near ties and the test still bites.
        assert ties <= max(3, rows * heads // 8), f"{ties} near-tie rows: data too tied"
        assert_same_counts(histogram, expected_histogram, rows, ties)
    else:
        assert within("histogram", (histogram - expected_histogram).abs(), hist_tol)
    error = ((grad.double() - expected_grad.double()).abs().max()
             / expected_grad.double().abs().max()).item()
    assert within("gradient", error, grad_tol), error


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_float64_matches_the_reference(similarity, estimator):
    features, dictionary = make_case(200, 40, 2, 300, similarity, seed=1, dtype=torch.float64)
    grad_histogram = torch.randn(2, 300, device=DEVICE, dtype=torch.float64)
    histogram, lse, grad = run_cuda(features, dictionary, similarity, estimator, 1.3, 5, 0,
                                    grad_histogram)
    expected_histogram, expected_lse = reference.histogram_forward(
        features, dictionary, similarity, estimator, 1.3, 5, 0)
    expected_grad = reference.histogram_backward(grad_histogram, features, dictionary,
                                                 expected_lse, similarity, estimator, 1.3, 5, 0)
    torch.testing.assert_close(histogram, expected_histogram, atol=1e-12, rtol=0)
    # The fast backends' lse is that of the projected similarity, which for `distance` drops
    # the per-row constant -|r|^2 / tau: compare it with the torch backend's (same projection).
    _, projected_lse = chunked.histogram_forward(features, dictionary, similarity, estimator,
                                                 1.3, 5, 0)
    torch.testing.assert_close(lse, projected_lse, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grad, expected_grad, atol=1e-10 * expected_grad.abs().max(),
                               rtol=1e-8)


@pytest.mark.parametrize("mode", ["bfloat16", "tf32", "float32"])
def test_same_hard_histogram_as_triton(precision, mode):
    triton_status = fierce_ext.available_backends(DEVICE)["triton"]
    if not triton_status.available:
        pytest.skip(f"triton backend unavailable: {triton_status.reason}")
    from fierce_ext.backends import fused_triton  # noqa: PLC0415

    dtype, fp32_precision, _, _ = MODES[mode]
    precision(fp32_precision)
    for similarity in SIMILARITIES:
        features, dictionary = make_case(1000, 96, 4, 130, similarity, seed=2, dtype=dtype)
        ours, _ = cuda_backend.histogram_forward(features, dictionary, similarity, "gumbel_hard",
                                                 1.0, 77, 0)
        theirs, _ = fused_triton.histogram_forward(features, dictionary, similarity,
                                                   "gumbel_hard", 1.0, 77, 0)
        # Both round the operands; the tie bound of the coarser (the same mode) covers both.
        ties = near_ties(mode, features, dictionary, similarity, 1.0, 77, 0)
        assert_same_counts(ours, theirs, 1000, 2 * ties)


def soft_histogram_bound(features, dictionary, estimator, tau, seed):
    """Per-bin bound on |p_kernel - p_torch| for 1-D `distance` in float32, to first order.

    Both sides round s = r (2w) - w^2 and z = (s + g) / tau, each step to u = 2^-24 of its size
    (a kernel may fuse the first two into one FMA); with logit errors e[b, k] on each side, a
    soft assignment moves by y (e_k + sum_j y_j e_j). At the paper's bins (1..100) the far bins
    have |s| ~ 1e4, but they carry no weight: a bound from the weights is ~20x tighter than one
    from the largest logit, and a wrong bin or bias still exceeds it by orders of magnitude."""
    u = 2.0**-24
    r, w = features.double()[:, 0], dictionary.double()[0, 0]
    product = 2 * r[:, None] * w
    s = product - w * w
    z = s
    if estimator != "softmax":
        z = s + gumbel_noise(seed, len(r), 1, len(w), 0, device=r.device,
                             dtype=torch.float64)[:, 0]
    z = z / tau
    y = torch.softmax(z, dim=1)
    shifted = z - torch.logsumexp(z, dim=1, keepdim=True)
    # per side: the product, the bias add, the noise add, the division, the shift by lse and
    # exp (a few ulps, relative); two sides
    e = 2 * u * ((product.abs() + s.abs()) / tau + 2 * z.abs() + shifted.abs() + 4)
    moved = y * (e + (y * e).sum(dim=1, keepdim=True))
    rows = len(r)
    return 1.1 * moved.mean(dim=0) + 2 * rows * u * y.mean(dim=0) + 1e-12


def test_age_case_one_dimensional_distance(precision):
    precision("ieee")
    generator = torch.Generator().manual_seed(3)
    ages = (torch.rand(256, 1, generator=generator) * 99 + 1).to(DEVICE)
    dictionary = bin_dictionary(100, 1, 100, device=DEVICE)
    for estimator in ESTIMATORS:
        histogram, lse = cuda_backend.histogram_forward(ages, dictionary, "distance", estimator,
                                                        1.0, 11, 0)
        expected, expected_lse = chunked.histogram_forward(ages, dictionary, "distance",
                                                           estimator, 1.0, 11, 0)
        if estimator == "gumbel_hard":
            assert_same_counts(histogram, expected, 256,
                               near_ties("float32", ages, dictionary, "distance", 1.0, 11, 0),
                               "float32")
        else:
            error = (histogram - expected).double().abs()[0]
            bound = soft_histogram_bound(ages, dictionary, estimator, 1.0, 11)
            assert within("histogram", error, bound, "float32"), (error / bound).max().item()
        assert within("lse", (lse - expected_lse).abs() / (1 + expected_lse.abs()), 2e-5,
                      "float32")


@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft"])
def test_many_bins_and_many_heads(precision, estimator):
    precision("ieee")
    for rows, dim, heads, bins in [(257, 33, 2, 4096), (100, 17, 16, 20)]:
        features, dictionary = make_case(rows, dim, heads, bins, "cosine", seed=4)
        grad_histogram = torch.randn(heads, bins, device=DEVICE)
        histogram, lse, grad = run_cuda(features, dictionary, "cosine", estimator, 0.3, 9, 0,
                                        grad_histogram)
        expected, expected_lse = chunked.histogram_forward(features, dictionary, "cosine",
                                                           estimator, 0.3, 9, 0)
        expected_grad = chunked.histogram_backward(grad_histogram, features, dictionary,
                                                   expected_lse, "cosine", estimator, 0.3, 9, 0)
        if estimator == "gumbel_hard":
            assert_same_counts(histogram, expected, rows,
                               near_ties("float32", features, dictionary, "cosine", 0.3, 9, 0),
                               "float32")
        else:
            assert within("histogram", (histogram - expected).abs(), 1e-6, "float32")
        grad_error = ((grad - expected_grad).abs().max() / expected_grad.abs().max()).item()
        assert within("gradient", grad_error, 2e-5, "float32")


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_bitwise_deterministic(precision, mode, estimator):
    dtype, fp32_precision, _, _ = MODES[mode]
    precision(fp32_precision)
    features, dictionary = make_case(3000, 130, 3, 200, "cosine", seed=5, dtype=dtype)
    grad_histogram = torch.randn(3, 200, device=DEVICE, dtype=torch.float64)
    first = run_cuda(features, dictionary, "cosine", estimator, 0.7, 13, 0, grad_histogram)
    for _ in range(2):
        again = run_cuda(features, dictionary, "cosine", estimator, 0.7, 13, 0, grad_histogram)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_row_offset_splits_the_batch(precision):
    precision("ieee")
    features, dictionary = make_case(500, 64, 2, 100, "dot", seed=6)
    whole, _ = cuda_backend.histogram_forward(features, dictionary, "dot", "gumbel_hard", 1.0,
                                              21, 0)
    head, _ = cuda_backend.histogram_forward(features[:173], dictionary, "dot", "gumbel_hard",
                                             1.0, 21, 0)
    tail, _ = cuda_backend.histogram_forward(features[173:], dictionary, "dot", "gumbel_hard",
                                             1.0, 21, 173)
    torch.testing.assert_close((head * 173 + tail * 327).round(), (whole * 500).round(), atol=0,
                               rtol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_rows_poison_the_histogram(estimator, poison):
    features, dictionary = make_case(100, 20, 2, 150, "dot", seed=7)
    features[42, 3] = float(poison)
    histogram, lse = cuda_backend.histogram_forward(features, dictionary, "dot", estimator, 1.0,
                                                    3, 0)
    assert torch.isnan(histogram).all()
    assert not torch.isfinite(lse[42]).any()
    assert torch.isfinite(torch.cat([lse[:42], lse[43:]])).all()
    grad = cuda_backend.histogram_backward(torch.randn(2, 150, device=DEVICE), features,
                                           dictionary, lse, "dot", estimator, 1.0, 3, 0)
    assert torch.isnan(grad[42]).all()
    assert torch.isfinite(torch.cat([grad[:42], grad[43:]])).all()


def test_precision_switch(precision):
    features, dictionary = make_case(512, 512, 1, 100, "dot", seed=8)
    exact, _ = reference.histogram_forward(features.double(), dictionary, "dot", "softmax", 0.2,
                                           1, 0)
    errors = {}
    for value in FP32_PRECISIONS:
        precision(value)
        histogram, _ = cuda_backend.histogram_forward(features, dictionary, "dot", "softmax", 0.2,
                                                      1, 0)
        errors[value] = (histogram.double() - exact).abs().max().item()
    assert errors["ieee"] < 1e-5 and errors["ieee"] * 10 < errors["tf32"], errors
    assert errors["tf32x3"] == errors["ieee"]  # this backend computes tf32x3 exactly
    precision("fp8")
    with pytest.raises(ValueError, match=FP32_PRECISION_ENV):
        cuda_backend.histogram_forward(features, dictionary, "dot", "softmax", 0.2, 1, 0)


def test_public_api_autograd_and_compile(precision):
    precision("ieee")
    features, dictionary = make_case(256, 64, 2, 100, "cosine", seed=9)
    weights = torch.randn(2, 100, device=DEVICE)  # a fixed upstream gradient for both backends
    results = {}
    for backend in ("cuda", "torch"):
        r = features.clone().requires_grad_(True)
        histogram = fierce_ext.histogram(r, dictionary, similarity="cosine", seed=5,
                                         backend=backend)
        (histogram * weights).sum().backward()
        results[backend] = (histogram.detach(), r.grad)
    assert_same_counts(results["cuda"][0], results["torch"][0], 256,
                       near_ties("float32", features, dictionary, "cosine", 1.0, 5, 0),
                       "float32")
    grad_error = ((results["cuda"][1] - results["torch"][1]).abs().max()
                  / results["torch"][1].abs().max()).item()
    assert within("gradient", grad_error, 2e-5, "float32")

    compiled = torch.compile(lambda r: fierce_ext.histogram(r, dictionary, similarity="cosine",
                                                            seed=5, backend="cuda"),
                             fullgraph=True)
    torch.testing.assert_close(compiled(features), results["cuda"][0], atol=0, rtol=0)


def test_opcheck_compiled_ops(precision):
    features, dictionary = make_case(70, 20, 2, 150, "distance", seed=10)
    vt, bias = cuda_backend.project(dictionary, "distance", features.dtype)
    forward_args = (features, vt, bias, "distance", "gumbel_soft", 0.9, 4, 1, True)
    torch.library.opcheck(torch.ops.fierce_ext.cuda_histogram_forward.default, forward_args)
    histogram, lse = torch.ops.fierce_ext.cuda_histogram_forward(*forward_args)
    backward_args = (torch.randn_like(histogram), features, vt, bias, lse, "distance",
                     "gumbel_soft", 0.9, 4, 1, True)
    torch.library.opcheck(torch.ops.fierce_ext.cuda_histogram_backward.default, backward_args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_batch_against_the_torch_backend(precision, dtype):
    # A shape with thousands of row tiles and several blocks per head (the partial histograms).
    precision("tf32")
    features, dictionary = make_case(40000, 256, 4, 256, "cosine", seed=11, dtype=dtype)
    histogram, lse = cuda_backend.histogram_forward(features, dictionary, "cosine",
                                                    "gumbel_hard", 1.0, 99, 0)
    expected, expected_lse = chunked.histogram_forward(features, dictionary, "cosine",
                                                       "gumbel_hard", 1.0, 99, 0)
    mode = "tf32" if dtype == torch.float32 else "bfloat16"
    ties = near_ties(mode, features, dictionary, "cosine", 1.0, 99, 0)
    assert_same_counts(histogram, expected, 40000, ties, mode)
    assert torch.isfinite(lse).all()
    assert within("lse", (lse - expected_lse).abs() / (1 + expected_lse.abs()),
                  MODES[mode][2][0], mode)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_one_launch_forward_on_streams_and_in_graphs(precision, estimator):
    # The paper's shapes run the forward in one launch, with a counter per stream that the
    # kernel's last block leaves at 0; a CUDA graph capture takes the two-launch path. All three
    # must give the same bits, call after call, on any stream.
    precision("tf32")
    features, dictionary = make_case(256, 640, 1, 100, "cosine", seed=12)

    def forward():
        return cuda_backend.histogram_forward(features, dictionary, "cosine", estimator, 1.0,
                                              77, 0)

    first = forward()
    side = torch.cuda.Stream()
    for _ in range(3):
        again = forward()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side = forward()
        torch.cuda.current_stream().wait_stream(side)
        for a, b, c in zip(first, again, on_side):
            assert torch.equal(a, b) and torch.equal(a, c)

    graph = torch.cuda.CUDAGraph()
    forward()  # warm-up on the capture stream's side, as torch.cuda.graph expects
    with torch.cuda.graph(graph):
        captured = forward()
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(first, captured):
            assert torch.equal(a, b)
    expected, _ = chunked.histogram_forward(features, dictionary, "cosine", estimator, 1.0, 77, 0)
    if estimator == "gumbel_hard":
        assert_same_counts(first[0], expected, 256,
                           near_ties("tf32", features, dictionary, "cosine", 1.0, 77, 0), "tf32")
    else:
        assert within("histogram", (first[0] - expected).abs(), MODES["tf32"][2][1], "tf32")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("mode", ["bfloat16", "tf32", "float64"])
@pytest.mark.parametrize("shape", [(256, 640, 1, 100), (300, 70, 3, 150), (9000, 64, 4, 256)],
                         ids=["few-shot", "K150", "two-launch"])
def test_fused_entropy_matches_the_entropy_of_its_histogram(precision, mode, estimator,
                                                            reduction, shape):
    # cuda_entropy_forward: the histogram of cuda_histogram_forward (same bits) and
    # backends.entropy_bits of it; cuda_entropy_backward: the gradient of cuda_histogram_backward
    # for dL/dp = entropy_bits_backward(dL/dH). One launch (few-shot), and two (the reduce and
    # entropy kernels) where the partials are too many for one block.
    dtype, fp32_precision, (_, _, grad_tol), _ = MODES[mode]
    precision(fp32_precision)
    features, dictionary = make_case(*shape, "cosine", seed=13, dtype=dtype)
    args = (features, dictionary, "cosine", estimator, 0.8, 41, 3)
    entropy, histogram, lse = cuda_backend.entropy_forward(*args, reduction)
    plain_histogram, plain_lse = cuda_backend.histogram_forward(*args)
    assert torch.equal(histogram, plain_histogram) and torch.equal(lse, plain_lse)
    expected = fierce_ext.backends.entropy_bits(histogram, reduction)
    eps = torch.finfo(histogram.dtype).eps
    assert entropy.shape == expected.shape and entropy.dtype == expected.dtype
    assert within("entropy", (entropy - expected).abs(), 64 * eps * math.log2(shape[3]))

    grad_entropy = torch.rand(entropy.shape, device=DEVICE, dtype=entropy.dtype) + 0.5
    grad = cuda_backend.entropy_backward(grad_entropy, histogram, *args[:2], lse, *args[2:],
                                         reduction)
    grad_histogram = fierce_ext.backends.entropy_bits_backward(grad_entropy, histogram, reduction)
    expected_grad = cuda_backend.histogram_backward(grad_histogram, features, dictionary, lse,
                                                    *args[2:])
    assert grad.dtype == features.dtype and torch.isfinite(grad).all()
    scale = expected_grad.double().abs().max().item()
    assert scale > 0
    assert within("gradient", (grad.double() - expected_grad.double()).abs().max().item() / scale,
                  grad_tol)


def test_fused_entropy_public_api_graphs_and_determinism(precision, monkeypatch):
    # fierce_ext.entropy on CUDA runs the fused ops (never the composed torch formulas): same
    # value and gradient as the torch backend within tf32's tolerance, bitwise repeatable, and
    # the same bits captured in a graph.
    precision("tf32")
    features, dictionary = make_case(256, 640, 1, 100, "cosine", seed=14)
    features.requires_grad_(True)

    def step():
        value = fierce_ext.entropy(features, dictionary, seed=9, backend="cuda")
        (grad,) = torch.autograd.grad(value, features)
        return value, grad

    with monkeypatch.context() as patch:
        for name in ("entropy_bits", "entropy_bits_backward"):
            patch.setattr(fierce_ext.backends, name, lambda *args: pytest.fail("composed"))
        value, grad = step()
        again = step()
    assert torch.equal(value, again[0]) and torch.equal(grad, again[1])
    expected = fierce_ext.entropy(features, dictionary, seed=9, backend="torch")
    (expected_grad,) = torch.autograd.grad(expected, features)
    value_error = abs(value.item() - expected.item()) / max(1.0, expected.item())
    assert within("entropy", value_error, 2e-2, "tf32")
    grad_error = ((grad - expected_grad).abs().max() / expected_grad.abs().max()).item()
    assert within("gradient", grad_error, 5e-2, "tf32")

    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up off the default stream, as torch.cuda.graph expects
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured[0], value) and torch.equal(captured[1], grad)


def test_opcheck_fused_entropy_ops(precision):
    precision("tf32")
    features, dictionary = make_case(70, 12, 2, 40, "dot", seed=15)
    vt, bias = cuda_backend.project(dictionary, "dot", features.dtype)
    for mean in (True, False):
        forward_args = (features, vt, bias, "dot", "gumbel_hard", 1.1, 6, 0, True, mean)
        torch.library.opcheck(torch.ops.fierce_ext.cuda_entropy_forward.default, forward_args)
        entropy, histogram, lse = torch.ops.fierce_ext.cuda_entropy_forward(*forward_args)
        backward_args = (torch.rand_like(entropy), histogram, features, vt, bias, lse, "dot",
                         "gumbel_hard", 1.1, 6, 0, True, mean)
        torch.library.opcheck(torch.ops.fierce_ext.cuda_entropy_backward.default, backward_args)
