"""The Triton backend compiled on a GPU, at real sizes. Skipped without CUDA (conftest.py).

Modes (features dtype, fp32 precision): float32 (exact, "ieee"), tf32, bfloat16, float16 and
float64. The dictionary is given in the features' dtype (a model moved to bf16 moves its
buffer too), and every result is compared with the float64 oracle on the same rounded inputs:
the torch backend run in float64 (the reference backend's math in projected form; the
reference itself would materialise B x C x D x K differences for `distance`).

Tolerances per mode, the error model of tests/test_triton_backend.py with the unit roundoff u
of each mode's dot operands: float32 (D + 2) 2^-24 (fp32 accumulation); tf32 2 x 2^-11 (both
operands rounded to TF32's 10-bit mantissa); float16 2^-11 and bfloat16 2^-8 (the rounded
dictionary; the features are exact in their own dtype); float64 (D + 2) 2^-53. With
zerr = (u + 4 eps) (max_b a_b |r_b| . max|v| + max|c| + max|g|) / tau bounding every logit's error:
* hard histogram: a row may change bin only if its float64 top-2 margin is below 2 zerr;
* soft histogram: |dp| <= (exp(2 zerr) - 1) p + 4 eps;  lse: |d lse| <= zerr + 4 eps (1 + |lse|);
* gradient, per element: |dg| <= 8 (zerr + u) M + u_out |g| (M: the magnitude of the terms the
  gradient GEMM sums, see check_against_oracle), u_out the unit roundoff of the output dtype.
And the rule for the low-precision modes (tf32, bfloat16, float16): the backend's error against
the float64 oracle is no worse than that of the paper's eager code (benchmarks/paper_baseline.py
similarities, then the same noise, softmax / one-hot and batch mean, autograd for the gradient)
run in the same dtype (tf32: fp32 with TF32 matmuls allowed). Errors: rows that changed bin
(hard, summed over heads), the RMS of dp (soft) and the relative Frobenius error of the gradient;
up to a floor of 2 rows, 1e-7 and 1e-5. bfloat16 and float16 get no margin (the backend keeps
logits and sums in fp32, the eager code in the low dtype); tf32 gets 25%: both sides then round
the same operands to the same precision, and two errors of one size differ by chance.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # conftest.py skips this folder too; never run without CUDA
    pytest.skip("needs a CUDA device: torch.cuda.is_available() is False",
                allow_module_level=True)

import fierce_ext  # noqa: E402
from fierce_ext.backends import chunked  # noqa: E402
from fierce_ext.backends import fused_triton as ft  # noqa: E402
from fierce_ext.dictionary import bin_dictionary  # noqa: E402
from fierce_ext.noise import SEED_LIMIT, gumbel_noise, random_words  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from paper_baseline import paper_similarity  # noqa: E402
from measured_errors import within  # noqa: E402
from oracle import backend_pass, gradient_magnitude, projected_logits64, top2_margin  # noqa: E402

DEVICE = torch.device("cuda")
# name: (features dtype, fp32 precision, unit roundoff of the dot operands or None for (D+2) eps)
MODES = {
    "float32": (torch.float32, "ieee", None),
    "tf32": (torch.float32, "tf32", 2 * 2.0**-11),
    "bfloat16": (torch.bfloat16, "tf32", 2.0**-8),
    "float16": (torch.float16, "tf32", 2.0**-11),
    "float64": (torch.float64, "ieee", None),
}
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24,
                 torch.float64: 2.0**-53}
ALIGNED = (8192, 512, 4, 256)  # B, D, C, K, all multiples of 16
RAGGED = (8191, 509, 3, 250)   # nothing a multiple of 16 (K not of 4)
SIMILARITIES = ("dot", "cosine", "distance")
ESTIMATORS = ("gumbel_hard", "gumbel_soft", "softmax")


@pytest.fixture(autouse=True)
def _triton_backend_must_be_available():
    reason = ft.unavailable_reason(DEVICE)
    assert reason is None, f"the triton backend cannot run on this GPU: {reason}"


@pytest.fixture
def mode(monkeypatch, request):
    """Selects a mode: sets the backend's fp32 precision, returns (dtype, u)."""
    dtype, precision, u = MODES[request.param]
    monkeypatch.setattr(ft, "FP32_PRECISION", precision)
    return request.param, dtype, u


def make_problem(shape, dtype, similarity, seed=0):
    rows, dim, heads, bins = shape
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    dictionary = 2 * torch.rand(heads, dim, bins, generator=gen, dtype=torch.float64) - 1
    if similarity == "dot":  # logits of order one, as cosine gives
        features = features * (1.5 / math.sqrt(dim))
    if similarity == "distance":
        features = features * 0.5
    grad = torch.randn(heads, bins, generator=gen, dtype=torch.float64)
    return (features.to(DEVICE, dtype), dictionary.to(DEVICE, dtype), grad.to(DEVICE))


def run_triton(*args):
    return backend_pass(ft, *args)


def oracle64(features, dictionary, grad, similarity, estimator, tau, seed, row_offset):
    r, w = features.double(), dictionary.double()
    hist, lse = chunked.histogram_forward(r, w, similarity, estimator, tau, seed, row_offset)
    grad_features = chunked.histogram_backward(grad, r, w, lse, similarity, estimator, tau,
                                               seed, row_offset)
    return hist, lse, grad_features


def flipped_rows(hist, want, rows):
    """Rows that changed bin, per head: each moves 1/B of mass out of one bin into another."""
    return (hist.double() - want).abs().sum(dim=1) * rows / 2


def check_against_oracle(result, want, features, dictionary, grad, similarity, estimator, tau,
                         seed, row_offset, u=None):
    hist, lse, grad_features = result
    want_hist, want_lse, want_grad = want
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    assert hist.dtype == lse.dtype == compute and grad_features.dtype == features.dtype
    assert grad_features.shape == features.shape
    z, s, v, a, bias = projected_logits64(features, dictionary, similarity, estimator, tau,
                                          seed, row_offset)
    rows, dim = features.shape
    eps = 2.0**-53 if features.dtype == torch.float64 else 2.0**-24
    if u is None:
        u = (dim + 2) * eps
    reach = (features.double().abs() @ v.abs().amax(dim=(0, 2))[:, None])[:, 0]
    noise = 17.0 if estimator != "softmax" else 0.0  # |g| <= -log(-log(1 - 2^-24)) < 17
    size = (a * reach).max().item() + (0 if bias is None else bias.abs().max().item()) + noise
    zerr = (u + 4 * eps) * size / tau
    if estimator == "gumbel_hard":
        near_ties = (top2_margin(z) < 2 * zerr).sum(dim=0).double()
        flips = flipped_rows(hist, want_hist, rows)
        # flips are whole rows
        assert within("flipped rows", flips, near_ties + 0.25), (flips, near_ties, zerr)
    else:
        err = (hist.double() - want_hist).abs()
        hist_bound = (math.exp(2 * zerr) - 1) * want_hist + 4 * eps
        assert within("histogram", err, hist_bound), (err.max(), zerr)
    lse_err = (lse.double() - want_lse).abs()
    lse_bound = zerr + 4 * eps * (1 + want_lse.abs())
    assert within("lse", lse_err, lse_bound)
    magnitude = gradient_magnitude(z, s, v, a, grad, features, similarity, tau)
    bound = 8 * (zerr + u) * magnitude + UNIT_ROUNDOFF[features.dtype] * want_grad.abs() + 1e-30
    err = (grad_features.double() - want_grad).abs()
    assert within("gradient", err, bound), (err.max(), (err / bound).max())


def paper_eager(features, dictionary, grad, similarity, estimator, tau, seed, row_offset):
    """The paper's eager formulation in the features' dtype, with the shared noise:
    (histogram, gradient of sum(histogram * G))."""
    r = features.detach().clone().requires_grad_(True)
    sim = paper_similarity(r, dictionary, similarity)
    rows, heads, bins = sim.shape
    # The shared noise, drawn in fp32 then rounded (drawn in bf16, u would round to 1: g = inf).
    noise = gumbel_noise(seed, rows, heads, bins, row_offset, device=DEVICE).to(sim.dtype)
    z = (sim + noise) / tau if estimator != "softmax" else sim / tau
    y = torch.softmax(z, dim=-1)
    if estimator == "gumbel_hard":
        hard = torch.nn.functional.one_hot(z.argmax(dim=-1), bins).to(y.dtype)
        e = hard - y.detach() + y
    else:
        e = y
    hist = e.sum(dim=0) / rows
    (g,) = torch.autograd.grad((hist * grad.to(hist.dtype)).sum(), r)
    return hist.detach(), g


def errors(hist, grad_features, want_hist, want_grad, estimator, rows):
    """(histogram error, gradient error): rows that changed bin (all heads) or the RMS of dp,
    and the relative Frobenius error of the gradient."""
    if estimator == "gumbel_hard":
        hist_err = flipped_rows(hist, want_hist, rows).sum().item()
    else:
        hist_err = (hist.double() - want_hist).pow(2).mean().sqrt().item()
    grad_err = ((grad_features.double() - want_grad).norm() / want_grad.norm()).item()
    return hist_err, grad_err


# ------------------------------------------------------------------------------------ noise

def test_noise_words_on_gpu():
    seed, rows, heads, bins, row_offset = SEED_LIMIT - 1, 3000, 3, 257, 2**31 + 5
    words = ft.noise_words(seed, rows, heads, bins, row_offset, device=DEVICE)
    assert torch.equal(words, random_words(seed, rows, heads, bins, row_offset, device=DEVICE))


# -------------------------------------------------------------------- against the oracle

@pytest.mark.parametrize("mode", ["float32"], indirect=True)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_ragged_float32_every_similarity_and_estimator(mode, similarity, estimator):
    _, dtype, u = mode
    features, dictionary, grad = make_problem(RAGGED, dtype, similarity, seed=1)
    args = (similarity, estimator, 0.7, 2**40 + 7, 11)
    result = run_triton(features, dictionary, grad, *args)
    want = oracle64(features, dictionary, grad, *args)
    check_against_oracle(result, want, features, dictionary, grad, *args, u=u)


@pytest.mark.parametrize("mode", ["tf32", "bfloat16", "float16"], indirect=True)
@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft"])
def test_low_precision_no_worse_than_paper_eager(mode, estimator):
    name, dtype, u = mode
    similarity, tau = "cosine", 1.0  # the paper's configuration
    features, dictionary, grad = make_problem(ALIGNED, dtype, similarity, seed=2)
    args = (similarity, estimator, tau, 12345, 0)
    result = run_triton(features, dictionary, grad, *args)
    want = oracle64(features, dictionary, grad, *args)
    check_against_oracle(result, want, features, dictionary, grad, *args, u=u)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    try:
        eager = paper_eager(features, dictionary, grad, *args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    rows = features.shape[0]
    ours = errors(result[0], result[2], want[0], want[2], estimator, rows)
    theirs = errors(*eager, want[0], want[2], estimator, rows)
    factor = 1.25 if name == "tf32" else 1.0
    hist_floor = 2.0 if estimator == "gumbel_hard" else 1e-7
    assert within("hist vs eager", ours[0], factor * theirs[0] + hist_floor), (ours, theirs)
    assert within("grad vs eager", ours[1], factor * theirs[1] + 1e-5), (ours, theirs)


@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft"])
def test_float64_matches_torch_backend(estimator):
    features, dictionary, grad = make_problem(RAGGED, torch.float64, "dot", seed=3)
    args = ("dot", estimator, 0.7, 99, 3)
    hist, lse, grad_features = run_triton(features, dictionary, grad, *args)
    want_hist, want_lse, want_grad = oracle64(features, dictionary, grad, *args)
    if estimator == "gumbel_hard":
        z, *_ = projected_logits64(features, dictionary, *args)
        assert top2_margin(z).min() > 1e-9, "test data holds a float64 near-tie"
        assert torch.equal(hist, want_hist)
    else:
        torch.testing.assert_close(hist, want_hist, rtol=0, atol=1e-13)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_features, want_grad, rtol=0,
                               atol=1e-10 * want_grad.abs().max().item())


@pytest.mark.parametrize("mode", ["float32"], indirect=True)
def test_hard_histogram_matches_torch_backend_float32(mode):
    # Same fp32 data, both exact fp32: only near-tie rows may differ (see the module docstring).
    _, dtype, _ = mode
    features, dictionary, _ = make_problem(ALIGNED, dtype, "cosine", seed=4)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        args = ("cosine", "gumbel_hard", 0.5, 2024, 0)
        hist, _ = ft.histogram_forward(features, dictionary, *args)
        want, _ = chunked.histogram_forward(features, dictionary, *args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    z, *_ = projected_logits64(features, dictionary, *args)
    zerr = (2 * (ALIGNED[1] + 2) * 2.0**-24) * (math.sqrt(ALIGNED[1]) + 17) / 0.5
    ties = (top2_margin(z) < 2 * zerr).sum(dim=0).double()
    flips = flipped_rows(hist, want.double(), ALIGNED[0])
    assert (flips <= ties + 0.25).all(), (flips, ties)  # flips are whole rows


@pytest.mark.parametrize("mode", ["float32"], indirect=True)
@pytest.mark.parametrize("estimator", ["gumbel_hard", "softmax"])
def test_age_case_one_dimensional_features(mode, estimator):
    # The paper's age experiment: D = 1 (no tensor-core tile fits: padded to 16), bins 1..100.
    _, dtype, u = mode
    gen = torch.Generator().manual_seed(5)
    features = (1 + 99 * torch.rand(4096, 1, generator=gen, dtype=torch.float64)).to(DEVICE,
                                                                                    dtype)
    dictionary = bin_dictionary(100, 1, 100, device=DEVICE, dtype=dtype)
    grad = torch.randn(1, 100, generator=gen, dtype=torch.float64).to(DEVICE)
    args = ("distance", estimator, 1.0, 7, 0)
    result = run_triton(features, dictionary, grad, *args)
    want = oracle64(features, dictionary, grad, *args)
    check_against_oracle(result, want, features, dictionary, grad, *args, u=u)


@pytest.mark.parametrize("mode", ["tf32"], indirect=True)
def test_many_bins(mode):
    _, dtype, u = mode
    features, dictionary, grad = make_problem((1024, 64, 2, 4096), dtype, "cosine", seed=6)
    args = ("cosine", "gumbel_soft", 0.5, 5, 0)
    result = run_triton(features, dictionary, grad, *args)
    want = oracle64(features, dictionary, grad, *args)
    check_against_oracle(result, want, features, dictionary, grad, *args, u=u)


# ---------------------------------------------------------------------------- determinism

@pytest.mark.parametrize("mode", ["bfloat16", "tf32"], indirect=True)
def test_bitwise_deterministic(mode):
    _, dtype, _ = mode
    features, dictionary, grad = make_problem(ALIGNED, dtype, "cosine", seed=7)
    for estimator in ("gumbel_hard", "gumbel_soft"):
        args = ("cosine", estimator, 1.0, 31337, 0)
        first = run_triton(features, dictionary, grad, *args)
        second = run_triton(features, dictionary, grad, *args)
        for a, b in zip(first, second):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", ["tf32"], indirect=True)
def test_backward_chunks_do_not_change_the_gradient(mode, monkeypatch):
    # Rows are independent in the gradient GEMM: 64 chunks of 128 rows give the same bits.
    _, dtype, _ = mode
    features, dictionary, grad = make_problem(ALIGNED, dtype, "cosine", seed=8)
    args = ("cosine", "gumbel_soft", 1.0, 8, 0)
    _, lse, one_chunk = run_triton(features, dictionary, grad, *args)
    monkeypatch.setattr(ft, "SCRATCH_MIN_BYTES", 1)
    monkeypatch.setattr(ft, "SCRATCH_FRACTION", 0.0)
    many_chunks = ft.histogram_backward(grad.float(), features, dictionary, lse, *args)
    assert torch.equal(one_chunk, many_chunks)


@pytest.mark.parametrize("mode", ["tf32"], indirect=True)
def test_row_offset_splits_the_batch(mode):
    # Two halves with row_offset draw the noise of the whole batch: the counts add up exactly.
    _, dtype, _ = mode
    features, dictionary, _ = make_problem(ALIGNED, dtype, "cosine", seed=9)
    args = ("cosine", "gumbel_hard", 1.0, 4, 1000)
    whole, _ = ft.histogram_forward(features, dictionary, *args)
    half = ALIGNED[0] // 2
    first, _ = ft.histogram_forward(features[:half], dictionary, *args)
    second, _ = ft.histogram_forward(features[half:], dictionary, *args[:-1], 1000 + half)
    assert torch.equal(whole * ALIGNED[0], first * half + second * (ALIGNED[0] - half))


# ---------------------------------------------------------------------- poisoning, memory, API

@pytest.mark.parametrize("mode", ["float32"], indirect=True)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_non_finite_row_poisons_the_histogram_only(mode, estimator):
    _, dtype, _ = mode
    features, dictionary, grad = make_problem((1000,) + RAGGED[1:], dtype, "dot", seed=10)
    features[42, 3] = float("nan")
    hist, lse, grad_features = run_triton(features, dictionary, grad, "dot", estimator, 1.0, 3,
                                          0)
    assert torch.isnan(hist).all()
    assert not torch.isfinite(lse[42]).any()
    assert torch.isfinite(torch.cat([lse[:42], lse[43:]])).all()
    assert torch.isnan(grad_features[42]).all()
    assert torch.isfinite(torch.cat([grad_features[:42], grad_features[43:]])).all()


@pytest.mark.parametrize("mode", ["tf32"], indirect=True)
def test_extra_memory_of_forward_and_backward(mode):
    # The benchmark's `large` shape: the target is extra memory <= 1.2x the gradient's size.
    _, dtype, _ = mode
    rows, dim, heads, bins = 65536, 1024, 4, 256
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    features = torch.randn(rows, dim, generator=gen, device=DEVICE, dtype=dtype)
    dictionary = fierce_ext.uniform_dictionary(dim, bins, heads, seed=0, device=DEVICE)
    fierce_ext.histogram(features[:256].requires_grad_(True), dictionary, backend="triton",
                         seed=1).sum().backward()  # compile and cache the projection first
    features.requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    hist = fierce_ext.histogram(features, dictionary, backend="triton", seed=1)
    (grad_features,) = torch.autograd.grad(fierce_ext.histogram_entropy(hist), features)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grad_bytes = grad_features.numel() * grad_features.element_size()
    assert extra <= 1.2 * grad_bytes, (extra / 2**20, grad_bytes / 2**20)


@pytest.mark.parametrize("mode", ["float32"], indirect=True)
def test_public_api_autograd(mode):
    _, dtype, _ = mode
    features, dictionary, _ = make_problem((3000, 96, 2, 130), dtype, "cosine", seed=12)
    features.requires_grad_(True)
    hist = fierce_ext.histogram(features, dictionary, similarity="cosine",
                                estimator="gumbel_soft", tau=0.5, seed=3, backend="triton")
    (grad,) = torch.autograd.grad(fierce_ext.histogram_entropy(hist), features)
    ref = features.detach().double().requires_grad_(True)
    hist_ref = fierce_ext.histogram(ref, dictionary.double(), similarity="cosine",
                                    estimator="gumbel_soft", tau=0.5, seed=3, backend="torch")
    (grad_ref,) = torch.autograd.grad(fierce_ext.histogram_entropy(hist_ref), ref)
    torch.testing.assert_close(hist.double(), hist_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(grad.double(), grad_ref, rtol=0,
                               atol=1e-4 * grad_ref.abs().max().item())


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("mode", ["tf32", "bfloat16"], indirect=True)
@pytest.mark.parametrize("shape", [(256, 640, 1, 100), RAGGED], ids=["few-shot", "ragged"])
def test_fused_entropy_matches_the_entropy_formulas(mode, shape, reduction):
    # The entropy from the one-program reduce kernel (few-shot) or the entropy kernel after a
    # per-tile reduce (ragged: P x C x K > REDUCE_ONE_PROGRAM_ENTRIES), and the backward's
    # softmax kernel forming dL/dp: the entropy_bits of the histogram, and the gradient of
    # dL/dp = entropy_bits_backward(dL/dH). (float64 and the tile loops: the interpreter
    # tests; here the compiled kernels.)
    _, dtype, _ = mode
    features, dictionary, _ = make_problem(shape, dtype, "cosine", seed=21)
    args = (features, dictionary, "cosine", "gumbel_soft", 0.9, 31, 2)
    entropy, histogram, lse = ft.entropy_forward(*args, reduction)
    rows, _, heads, bins = shape
    for block_rows in (32, 64):  # the GPU forward's row blocks, either size, take those paths
        partials = min(-(-rows // block_rows), ft.MAX_ROW_PROGRAMS) * heads * bins
        assert ft._interpreting() or (partials > ft.REDUCE_ONE_PROGRAM_ENTRIES) == (shape == RAGGED)
    plain_histogram, plain_lse = ft.histogram_forward(*args)
    assert torch.equal(histogram, plain_histogram) and torch.equal(lse, plain_lse)
    eps = torch.finfo(histogram.dtype).eps
    expected = fierce_ext.backends.entropy_bits(histogram, reduction)
    torch.testing.assert_close(entropy, expected, rtol=0, atol=64 * eps * math.log2(shape[3]))
    grad_entropy = torch.rand(entropy.shape, device=DEVICE, dtype=entropy.dtype) + 0.5
    grad = ft.entropy_backward(grad_entropy, histogram, features, dictionary, lse, *args[2:],
                               reduction)
    expected_grad = ft.histogram_backward(
        fierce_ext.backends.entropy_bits_backward(grad_entropy, histogram, reduction), features,
        dictionary, lse, *args[2:])
    scale = expected_grad.double().abs().max()
    assert scale > 0 and torch.isfinite(grad).all()
    # Same kernels, a G a few ulps apart: the low-precision delta tiles round alike or by one ulp.
    assert (grad.double() - expected_grad.double()).abs().max() <= 2e-2 * scale
