"""The Triton backend (fierce_ext/backends/fused_triton.py) against the reference backend.

Without CUDA the kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set here (and in
tests/conftest.py) before the backend is first imported. With CUDA and the interpreter off they
run compiled on the GPU with exact fp32 multiplies, so this module doubles as a small-shape GPU
test. Shapes are small and ragged (not multiples of 16); `tiles` lowers the interpreter's block
caps so that the multi-tile, multi-block and multi-chunk paths run on these small shapes.

Tolerance rule: the backend is compared with the reference backend run in float64 on the same
(already rounded) inputs. With eps the unit roundoff of the compute dtype (2^-53 or 2^-24), u
the relative error of one GEMM product (float64/float32: (D + 2) eps for the accumulation;
float16/bfloat16 features: their products are exact in the float32 accumulator, so also
(D + 2) eps), dv = |v_dot - v| + 4 eps |v| the rounding of the projected dictionary to the dot
dtype (the features' for float16 and for bfloat16 on a GPU; computed from the data, 0 for
dot and distance when the dictionary is already in that dtype), and
    zerr = ((u + 4 eps) (max_b a_b |r_b| . max|v| + max|c|) + max_b a_b |r_b| . max dv
            + 8 eps max|g|) / tau,
a bound on the error of every logit z = (a r.v + c + g) / tau. Only the GEMM term sees the
operand rounding: the bias and the Gumbel noise g are computed and added in the compute dtype.
* hard histogram: float64 EXACTLY equal (the test asserts that its data hold no near-tie within
  1e-9); otherwise a row may change bin only if its float64 top-2 margin is below 2 zerr, so per
  head B * sum_k |dp| / 2 <= the number of such rows (+ 1/4 for the rounding of counts / B);
* soft histogram: |dp| <= (exp(2 zerr) - 1) p + 4 eps;
* lse (the torch backend's, same projected form): |d lse| <= zerr + 4 eps (1 + |lse|);
* gradient, per element: |dg| <= 8 (zerr + u_bwd) M + u_out |g| + floor, with
  M_bd = a_b sum_hk m_bhk |v_hdk| (+ a_b^2 sum_hk m_bhk |s| |r_bd| for cosine) the magnitude of
  the terms the GEMM sums, m = y (|G - e| + sum_j y_j |G_j - mean G|) / (B tau) (|delta| plus
  the effect of an error in e = sum_k y G), u_bwd = u + max dv/|v| + u_dot + (C K + 2) eps
  (the backward GEMM: its products, the dictionary's and the y (G - e) scratch's rounding to
  the dot dtype, its accumulation over the C K bins), u_out the unit roundoff of the
  gradient's dtype (doubled for bfloat16 in the interpreter, whose fp32 -> bf16 cast
  truncates) and floor = u_out tiny_out (subnormal outputs) + C K tiny_compute max_b a_b max|v|
  max|G - mean G| / (B tau) (y underflowing in the compute dtype): no absolute constant, so
  the check scales with the data (tau = 1e39 gives gradients ~1e-41). tau and 1 / (B tau)
  reach the kernels as two float32s (scalar_error: 2^-48 relative, but 2^-150 absolute where
  1 / (B tau) is a float32 subnormal, and 1 / tau = 0 beyond float32's range): zerr adds that
  error of 1 / tau times max |z|, u_out that of 1 / (B tau);
* gradient, float16/bfloat16 features, as a whole: max |dg| <= GRAD_RTOL max |g| (the
  elementwise rule is loose where a bfloat16 GPU run rounds the scratch and the dictionary).
A wrong formula, sign, noise index or mask is off by O(1), far outside these.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():  # before the first import of the kernels (see conftest.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fierce_ext.backends import triton_noise  # noqa: E402

if triton_noise.IMPORT_ERROR:  # not installed, broken or too old; CI asserts that it is None
    pytest.skip(triton_noise.IMPORT_ERROR, allow_module_level=True)

import fierce_ext  # noqa: E402
from fierce_ext.backends import chunked, fp32_precision, reference  # noqa: E402
from fierce_ext.backends import fused_triton as ft  # noqa: E402
from fierce_ext.dictionary import bin_dictionary, project_dictionary  # noqa: E402
from fierce_ext.noise import SEED_LIMIT, random_words  # noqa: E402
from oracle import (ESTIMATORS, SIMILARITIES, backend_pass,  # noqa: E402
                    check_huge_rows, check_large_logits, gradient_magnitude, large_logit_problem,
                    numpy_random_words, projected_logits64, top2_margin)

if ft.unavailable_reason(torch.device("cpu")) is None:
    DEVICE = torch.device("cpu")
elif torch.cuda.is_available() and ft.unavailable_reason(torch.device("cuda")) is None:
    DEVICE = torch.device("cuda")
elif triton_noise.INTERPRETER_ERROR:  # this Triton's interpreter and numpy; CI asserts it is None
    pytest.skip(triton_noise.INTERPRETER_ERROR, allow_module_level=True)
else:  # a misconfigured run (e.g. TRITON_INTERPRET=0 without a GPU) must fail, not skip
    raise RuntimeError("the Triton backend runs neither on cpu nor on cuda here: "
                       f"{ft.unavailable_reason(torch.device('cpu'))}")

EPS32 = 2.0**-24
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24,
                 torch.float64: 2.0**-53}
# max |d grad| / max |grad| for float16/bfloat16 features. Measured (interpreter, the low
# precision cases): float16 <= 6.7e-4; bfloat16 <= 7.1e-3 (its truncating output cast, up to
# 2^-7 per element). A bfloat16 GPU run adds the scratch's and the dictionary's rounding to
# bf16 (2^-8 per term, mostly cancelling over the C K terms of a gradient element).
GRAD_RTOL = {torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


@pytest.fixture(autouse=True)
def exact_fp32(monkeypatch):
    # The tolerance model assumes exact fp32 multiplies (TF32 is covered by tests/gpu).
    monkeypatch.setattr(ft, "FP32_PRECISION", "ieee")


@pytest.fixture
def tiles(monkeypatch):
    """16-wide tiles in the interpreter (GPU tiles are fixed), two forward programs per head
    (each summing several row blocks) and a backward scratch of one block of rows, so small
    shapes run several row blocks, bin tiles, D tiles and chunks."""
    monkeypatch.setattr(ft, "INTERPRETER_MAX_BLOCK", {"rows": 16, "bins": 16, "dim": 16})
    monkeypatch.setattr(ft, "MAX_ROW_PROGRAMS", 2)
    monkeypatch.setattr(ft, "SCRATCH_MIN_BYTES", 1)
    monkeypatch.setattr(ft, "SCRATCH_FRACTION", 0.0)


def make_problem(rows, dim, heads, bins, dtype=torch.float64, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    features = (torch.randn(rows, dim, generator=gen, dtype=torch.float64) * scale)
    dictionary = 2 * torch.rand(heads, dim, bins, generator=gen, dtype=torch.float64) - 1
    grad = torch.randn(heads, bins, generator=gen, dtype=torch.float64)
    return (features.to(dtype).to(DEVICE), dictionary.to(dtype).to(DEVICE),
            grad.to(DEVICE))


def run_triton(*args):
    return backend_pass(ft, *args)


def run_reference64(features, dictionary, grad, similarity, estimator, tau, seed, row_offset):
    """The reference backend in float64 on the same rounded inputs; lse from the torch backend
    (the fast backends' lse is that of the projected similarity, which drops a per-row
    constant for `distance`)."""
    r, w = features.double(), dictionary.double()
    hist, ref_lse = reference.histogram_forward(r, w, similarity, estimator, tau, seed,
                                                row_offset)
    grad_features = reference.histogram_backward(grad, r, w, ref_lse, similarity, estimator,
                                                 tau, seed, row_offset)
    _, lse = chunked.histogram_forward(r, w, similarity, estimator, tau, seed, row_offset)
    return hist, lse, grad_features


def scalar_error(value, compute):
    """The relative error of a positive scalar the kernels receive as two float32s hi + lo
    (tau, 1 / (B tau)): |value - hi - lo| <= 2^-24 |value - hi| + 2^-150 (hi or lo subnormal),
    and hi = inf (1 / tau = 0) beyond float32's range; float32 kernels use hi alone."""
    if value > torch.finfo(torch.float32).max:
        return 1.0
    return (2.0**-48 if compute == torch.float64 else 2.0**-24) + 2.0**-150 / value


def check_against_reference(features, dictionary, grad, similarity, estimator, tau=0.7,
                            seed=2**40 + 12345, row_offset=5, u=None):
    """Runs both backends and asserts the tolerance rule of this module's docstring."""
    hist, lse, grad_features = run_triton(features, dictionary, grad, similarity, estimator,
                                          tau, seed, row_offset)
    want_hist, want_lse, want_grad = run_reference64(features, dictionary, grad, similarity,
                                                     estimator, tau, seed, row_offset)
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    assert hist.dtype == lse.dtype == compute and grad_features.dtype == features.dtype
    assert hist.shape == want_hist.shape and lse.shape == want_lse.shape
    assert grad_features.shape == features.shape
    z, s, v, a, bias = projected_logits64(features, dictionary, similarity, estimator, tau,
                                          seed, row_offset)
    rows, dim = features.shape
    heads, bins = want_hist.shape
    margin = top2_margin(z)
    eps = 2.0**-53 if features.dtype == torch.float64 else 2.0**-24
    dot = ft._dot_dtype(features)
    if u is None:
        u = (dim + 2) * eps
    # The projected dictionary as the kernels multiply it: projected in the compute dtype,
    # then rounded to the dot dtype.
    v_dot = project_dictionary(dictionary, similarity, compute)[0]
    dv = (v_dot.to(dot).double() - v).abs() + 4 * eps * v.abs()
    u_v = (dv / v.abs()).nan_to_num(0.0, posinf=0.0).max().item()  # relative, per element
    reach = (features.double().abs() @ v.abs().amax(dim=(0, 2))[:, None])[:, 0]
    reach_dv = (features.double().abs() @ dv.amax(dim=(0, 2))[:, None])[:, 0]
    noise = 17.0 if estimator != "softmax" else 0.0  # |g| <= -log(-log(1 - 2^-24)) < 17
    bias_max = 0.0 if bias is None else bias.abs().max().item()
    zerr = ((u + 4 * eps) * ((a * reach).max().item() + bias_max)
            + (a * reach_dv).max().item() + 8 * eps * noise) / tau \
        + scalar_error(tau, compute) * z.abs().max().item()
    if estimator == "gumbel_hard":
        if features.dtype == torch.float64:
            assert margin.min() > 1e-9, "test data holds a float64 near-tie"
            assert torch.equal(hist, want_hist)
        near_ties = (margin < 2 * zerr).sum(dim=0).double()  # per head
        flips = (hist.double() - want_hist).abs().sum(dim=1) * rows / 2
        assert (flips <= near_ties + 0.25).all(), (flips, near_ties)  # flips are whole rows
    else:
        bound = (math.exp(2 * zerr) - 1) * want_hist + 4 * eps
        assert ((hist.double() - want_hist).abs() <= bound).all(), \
            ((hist.double() - want_hist).abs().max(), zerr)
    assert ((lse.double() - want_lse).abs() <= zerr + 4 * eps * (1 + want_lse.abs())).all(), \
        ((lse.double() - want_lse).abs().max(), zerr)
    magnitude = gradient_magnitude(z, s, v, a, grad, features, similarity, tau)
    u_bwd = u + u_v + UNIT_ROUNDOFF[dot] + (heads * bins + 2) * eps
    u_out = UNIT_ROUNDOFF[features.dtype]
    if features.dtype == torch.bfloat16 and DEVICE.type == "cpu":
        u_out *= 2  # the interpreter's fp32 -> bf16 cast truncates
    g_centred_max = (grad.double() - grad.double().mean(dim=1, keepdim=True)).abs().max().item()
    floor = (u_out * torch.finfo(features.dtype).tiny
             + heads * bins * torch.finfo(compute).tiny * a.max().item()
             * v.abs().max().item() * g_centred_max / (rows * tau))
    u_out_scaled = u_out + scalar_error(1.0 / (rows * tau), compute)
    bound = 8 * (zerr + u_bwd) * magnitude + u_out_scaled * want_grad.abs() + floor
    err = (grad_features.double() - want_grad).abs()
    assert (err <= bound).all(), (err.max(), (err / bound).max())
    if features.dtype in GRAD_RTOL:
        assert err.max() <= GRAD_RTOL[features.dtype] * want_grad.abs().max(), \
            (err.max(), want_grad.abs().max())


# ------------------------------------------------------------------------------------ noise

@pytest.mark.parametrize("seed, rows, heads, bins, row_offset", [
    (0, 5, 1, 1, 0),
    (12345, 7, 3, 13, 0),
    (SEED_LIMIT - 1, 9, 2, 17, 11),
    (0x7ABCDEF0_89ABCDEF, 4, 5, 32, 2**33 + 3),  # key words >= 2^31, counters >= 2^32
])
def test_noise_words_are_the_noise_rule(seed, rows, heads, bins, row_offset):
    words = ft.noise_words(seed, rows, heads, bins, row_offset, device=DEVICE).cpu()
    assert words.dtype == torch.int64 and words.shape == (rows, heads, bins)
    assert torch.equal(words, random_words(seed, rows, heads, bins, row_offset))
    assert torch.equal(words, torch.from_numpy(
        numpy_random_words(seed, rows, heads, bins, row_offset).astype("int64")))


def test_noise_words_across_tiles(tiles):
    words = ft.noise_words(987654321, 20, 2, 37, 7, device=DEVICE).cpu()
    assert torch.equal(words, random_words(987654321, 20, 2, 37, 7))


# ------------------------------------------------------------------ against the reference

@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_matches_reference(dtype, similarity, estimator):
    features, dictionary, grad = make_problem(37, 11, 2, 23, dtype, seed=1)
    check_against_reference(features, dictionary, grad, similarity, estimator)


@pytest.mark.parametrize("dtype, similarity, estimator", [
    (torch.float64, "cosine", "gumbel_hard"), (torch.float32, "distance", "gumbel_soft"),
    (torch.float64, "dot", "softmax")], ids=["f64-cosine-hard", "f32-distance-soft",
                                             "f64-dot-softmax"])
def test_matches_reference_across_tiles_blocks_and_chunks(tiles, dtype, similarity, estimator):
    # 40 rows: 3 row blocks (2 programs) and 3 backward chunks; D = 20: 2 D tiles; K = 21: 2
    # bin tiles.
    features, dictionary, grad = make_problem(40, 20, 2, 21, dtype, seed=2)
    check_against_reference(features, dictionary, grad, similarity, estimator, tau=0.5,
                            row_offset=123)


@pytest.mark.parametrize("similarity, estimator", [("cosine", "gumbel_soft"), ("dot", "softmax")])
def test_tf32_operands_rounded(monkeypatch, similarity, estimator):
    # "tf32": both GEMM operands are rounded to TF32 (10-bit mantissa) before the tensor cores
    # see them; the interpreter then multiplies them exactly, as tensor cores do. So here the
    # result must differ from exact fp32 and meet the bound with u = 2 * 2^-11 per product.
    features, dictionary, grad = make_problem(37, 11, 2, 23, torch.float32, seed=18)
    exact = run_triton(features, dictionary, grad, similarity, estimator, 0.7, 3, 0)
    monkeypatch.setattr(ft, "FP32_PRECISION", "tf32")
    tf32 = run_triton(features, dictionary, grad, similarity, estimator, 0.7, 3, 0)
    if DEVICE.type == "cpu":
        assert not torch.equal(exact[1], tf32[1]) and not torch.equal(exact[2], tf32[2])
    check_against_reference(features, dictionary, grad, similarity, estimator, seed=3,
                            row_offset=0, u=2 * 2.0**-11 + 13 * EPS32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("similarity, estimator", [
    ("dot", "gumbel_soft"), ("cosine", "gumbel_soft"), ("distance", "softmax"),
    ("cosine", "gumbel_hard")])
def test_low_precision_features(dtype, similarity, estimator):
    features, dictionary, grad = make_problem(37, 11, 2, 23, dtype, seed=3)
    check_against_reference(features, dictionary, grad, similarity, estimator)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_features_under_a_loss_scale(dtype):
    # A GradScaler multiplies dL/dH by 2^16 (its initial scale): dL/dp then reaches ~5e6 on
    # empty bins, past float16's 65504, while the gradient itself (~100 here) is finite. It
    # must stay finite and agree with the torch backend's (which computes in float32).
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(64, 16, generator=gen).to(dtype)
    dictionary = fierce_ext.uniform_dictionary(16, 100)
    grads = {}
    for backend in ("triton", "torch"):
        x = features.to(DEVICE, copy=True).requires_grad_(True)
        value = fierce_ext.entropy(x, dictionary.to(DEVICE), seed=5, backend=backend)
        (-(2.0**16) * value).backward()
        grads[backend] = x.grad.float().cpu()
    assert torch.isfinite(grads["torch"]).all()
    assert torch.isfinite(grads["triton"]).all()
    # float16 / bfloat16 operands of the gradient GEMM (the scratch is rounded to TF32 or
    # bfloat16): a few of their ulps relative to the largest element.
    operand = 2.0**-11 if dtype == torch.float16 else 2.0**-8
    error = (grads["triton"] - grads["torch"]).abs().max() / grads["torch"].abs().max()
    assert error <= 16 * operand, error


def test_float32_dictionary_with_half_features():
    features, dictionary, grad = make_problem(37, 11, 2, 23, torch.float16, seed=4)
    check_against_reference(features, dictionary.float(), grad, "cosine", "gumbel_soft")


@pytest.mark.parametrize("rows, dim, heads, bins", [
    (1, 5, 3, 1),     # one row, one bin: p = 1, zero gradient
    (3, 2, 1, 2),
    (19, 7, 4, 5),    # K = 5: the last Philox quad half used
    (23, 300, 1, 9),  # D > 256: several D tiles at the default caps
])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_ragged_shapes(rows, dim, heads, bins, similarity):
    features, dictionary, grad = make_problem(rows, dim, heads, bins, seed=rows + dim)
    check_against_reference(features, dictionary, grad, similarity, "gumbel_hard")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_age_case_one_dimensional_features(dtype):
    # The paper's age experiment: D = 1, bins at 1..100, distance logits -(f - bin)^2.
    gen = torch.Generator().manual_seed(5)
    features = (1 + 99 * torch.rand(50, 1, generator=gen, dtype=torch.float64)).to(dtype)
    dictionary = bin_dictionary(100, 1, 100, dtype=dtype)
    grad = torch.randn(1, 100, generator=gen, dtype=torch.float64)
    for estimator in ("gumbel_hard", "softmax"):
        check_against_reference(features.to(DEVICE), dictionary.to(DEVICE), grad.to(DEVICE),
                                "distance", estimator, tau=1.0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # |r|^2, as meant
@pytest.mark.parametrize("estimator", ["softmax", "gumbel_soft"])
def test_float32_cosine_of_huge_rows(estimator, monkeypatch):
    # |r|^2 past float32's range in _row_scale, a^2 below it in _grad_kernel's epilogue.
    monkeypatch.setattr(ft, "FP32_PRECISION", "ieee")

    def run(features, dictionary, grad_histogram):
        x = features.to(DEVICE, copy=True).requires_grad_(True)
        hist = fierce_ext.histogram(x, dictionary.to(DEVICE), estimator=estimator, seed=5,
                                    backend="triton")
        (hist * grad_histogram.to(DEVICE)).sum().backward()
        return hist.detach(), x.grad

    check_huge_rows(run, estimator)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_float32_gradient_with_large_logits(estimator, monkeypatch):
    # The age term's logits (~1e4): the backward must normalise exp(z - lse) itself. Exact
    # float32 products (on a GPU, TF32 would round the features: another error, tested apart).
    monkeypatch.setattr(ft, "FP32_PRECISION", "ieee")
    features, dictionary, grad_histogram = large_logit_problem()
    x = features.to(DEVICE, copy=True).requires_grad_(True)
    hist = fierce_ext.histogram(x, dictionary.to(DEVICE), similarity="distance",
                                estimator=estimator, seed=3, backend="triton")
    (hist * grad_histogram.to(DEVICE)).sum().backward()
    check_large_logits(hist.detach(), x.grad, features, dictionary, grad_histogram, estimator,
                       seed=3)


def test_many_bins():
    # K = 4100 > 4096: 17 bin tiles of the online log-sum-exp and argmax.
    features, dictionary, grad = make_problem(9, 3, 1, 4100, seed=6)
    check_against_reference(features, dictionary, grad, "dot", "gumbel_hard", tau=0.3)


@pytest.mark.parametrize("layout", ["transposed", "strided", "expanded"])
def test_non_contiguous_inputs(layout):
    features, dictionary, grad = make_problem(21, 13, 2, 10, seed=7)
    if layout == "transposed":
        features = features.T.contiguous().T
        dictionary = dictionary.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    elif layout == "strided":
        wide = torch.zeros(21, 26, dtype=features.dtype, device=DEVICE)
        wide[:, ::2] = features
        features = wide[:, ::2]
    else:
        features = features[:1].expand(21, 13)
    assert not features.is_contiguous()
    check_against_reference(features, dictionary, grad, "cosine", "gumbel_soft")


@pytest.mark.parametrize("seed", [0, 1, SEED_LIMIT - 1])
def test_seed_extremes(seed):
    features, dictionary, grad = make_problem(17, 6, 2, 11, seed=8)
    check_against_reference(features, dictionary, grad, "dot", "gumbel_hard", seed=seed,
                            row_offset=2**35)


@pytest.mark.parametrize("tau", [0.05, 10.0, 1e39])  # 1e39: beyond float32, float64 kernels
def test_temperatures(tau):
    features, dictionary, grad = make_problem(17, 6, 2, 11, seed=9)
    check_against_reference(features, dictionary, grad, "cosine", "gumbel_soft", tau=tau)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_hard_histogram_identical_to_torch_backend(dtype):
    # Features near one atom each: every row's winner is far ahead of the runner-up, so both
    # backends must pick the same bins, whatever their rounding.
    gen = torch.Generator().manual_seed(10)
    dictionary = 2 * torch.rand(2, 8, 12, generator=gen, dtype=torch.float64) - 1
    pick = torch.randint(0, 12, (60,), generator=gen)
    features = 3 * dictionary[0, :, pick].T + 0.01 * torch.randn(60, 8, generator=gen,
                                                                   dtype=torch.float64)
    features, dictionary = features.to(dtype).to(DEVICE), dictionary.to(dtype).to(DEVICE)
    args = ("dot", "gumbel_hard", 0.5, 4242, 17)
    z, *_ = projected_logits64(features, dictionary, *args)
    assert top2_margin(z).min() > 1e-3, "test data holds a near-tie"
    hist, _ = ft.histogram_forward(features, dictionary, *args)
    want, _ = chunked.histogram_forward(features, dictionary, *args)
    assert torch.equal(hist, want)


# ---------------------------------------------------------------------------- determinism

def test_deterministic(tiles):
    # Several row blocks (partial histograms) and backward chunks: bitwise equal run to run.
    features, dictionary, grad = make_problem(40, 20, 2, 21, torch.float32, seed=11)
    first = run_triton(features, dictionary, grad, "cosine", "gumbel_soft", 0.7, 99, 0)
    second = run_triton(features, dictionary, grad, "cosine", "gumbel_soft", 0.7, 99, 0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # A different seed changes the draw (the seed reaches the kernels).
    third, _ = ft.histogram_forward(features, dictionary, "cosine", "gumbel_soft", 0.7, 100, 0)
    assert not torch.equal(first[0], third)


# ---------------------------------------------------------------------------- NaN poisoning

def _nan_cases():
    features, dictionary, _ = make_problem(20, 5, 3, 7, torch.float32, seed=12)
    nan_row = features.clone()
    nan_row[4, 2] = float("nan")
    inf_row = features.clone()
    inf_row[9, 0] = float("inf")
    nan_head = dictionary.clone()
    nan_head[1, 3, 2] = float("nan")
    return {"nan row": (nan_row, dictionary), "inf row": (inf_row, dictionary),
            "nan atom": (features, nan_head)}


@pytest.mark.parametrize("case", ["nan row", "inf row", "nan atom"])
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft"])
def test_nan_poisoning(case, similarity, estimator):
    # The package's rule: a row whose logits are not all finite makes the whole histogram NaN.
    # (The torch backend's soft path NaNs only some bins for an inf feature, or one head for a
    # NaN atom: this checks that wherever it has a NaN, this backend is all NaN.)
    features, dictionary = _nan_cases()[case]
    grad = torch.randn(3, 7, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    args = (similarity, estimator, 0.7, 77, 0)
    hist, lse, grad_features = run_triton(features, dictionary, grad, *args)
    want_hist, want_lse = chunked.histogram_forward(features, dictionary, *args)
    want_grad = chunked.histogram_backward(grad, features, dictionary, want_lse, *args)
    assert torch.isnan(want_hist).any(), "the case must poison the torch backend"
    assert torch.isnan(hist).all()
    # A poisoned row's gradient is not finite; the other rows' gradients stay finite.
    assert torch.equal(torch.isfinite(grad_features).all(dim=1),
                       torch.isfinite(want_grad).all(dim=1))


@pytest.mark.parametrize("estimator", ["softmax", "gumbel_hard"])
def test_minus_inf_logits_do_not_poison(tiles, estimator):
    # Bins 0..15 (the whole first 16-wide bin tile) have logit -inf, the others are finite:
    # like torch, y = 0 there and the lse stays finite (the online log-sum-exp must not form
    # exp(-inf - (-inf)) = NaN while its running maximum is still -inf).
    features = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    dictionary = torch.rand(1, 2, 20, generator=torch.Generator().manual_seed(17),
                            dtype=torch.float64)
    dictionary[0, 0, :16], dictionary[0, 1, :16] = -float("inf"), 0.0
    features, dictionary = features.to(DEVICE), dictionary.to(DEVICE)
    args = ("dot", estimator, 1.0, 5, 0)
    hist, lse = ft.histogram_forward(features, dictionary, *args)
    want_hist, want_lse = chunked.histogram_forward(features, dictionary, *args)
    assert torch.isfinite(want_lse).all() and (want_hist[0, :16] == 0).all()
    torch.testing.assert_close(hist, want_hist, rtol=0, atol=1e-14)
    torch.testing.assert_close(lse, want_lse, rtol=1e-14, atol=1e-14)


# ------------------------------------------------------------------------ fused entropy

def test_reduce_grids_give_the_same_histogram(tiles, monkeypatch):
    features, dictionary, _ = make_problem(45, 7, 3, 37, dtype=torch.float32, seed=5)
    args = (features, dictionary, "dot", "gumbel_soft", 0.9, 17, 0)
    one_program, _ = ft.histogram_forward(*args)
    monkeypatch.setattr(ft, "REDUCE_ONE_PROGRAM_ENTRIES", 0)
    per_tile, _ = ft.histogram_forward(*args)
    assert torch.equal(one_program, per_tile)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_fused_entropy_matches_the_entropy_formulas(tiles, dtype, estimator, reduction):
    # Small problems: the reduce kernel, as one program, writes the entropy.
    check_fused_entropy(dtype, estimator, reduction)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_entropy_after_a_per_tile_reduce(tiles, monkeypatch, reduction):
    # Larger problems: one reduce program per (head, bin tile), then the entropy kernel.
    monkeypatch.setattr(ft, "REDUCE_ONE_PROGRAM_ENTRIES", 0)
    check_fused_entropy(torch.float32, "gumbel_soft", reduction)


def check_fused_entropy(dtype, estimator, reduction):
    # entropy_forward: the histogram of histogram_forward (same bits) and backends.entropy_bits
    # of it; entropy_backward (the softmax kernel forming dL/dp from dL/dH): histogram_backward's
    # gradient for dL/dp = entropy_bits_backward(dL/dH). 16-bin tiles: the kernels loop over
    # tiles.
    features, dictionary, _ = make_problem(45, 7, 3, 37, dtype=dtype, seed=3)
    args = (features, dictionary, "cosine", estimator, 0.8, 99, 4)
    entropy, histogram, lse = ft.entropy_forward(*args, reduction)
    plain_histogram, plain_lse = ft.histogram_forward(*args)
    assert torch.equal(histogram, plain_histogram) and torch.equal(lse, plain_lse)
    eps = torch.finfo(histogram.dtype).eps
    expected = fierce_ext.backends.entropy_bits(histogram, reduction)
    assert entropy.shape == expected.shape and entropy.dtype == histogram.dtype
    torch.testing.assert_close(entropy, expected, rtol=0, atol=64 * eps * math.log2(37))

    gen = torch.Generator().manual_seed(8)
    grad_entropy = (torch.rand(entropy.shape, generator=gen, dtype=torch.float64) + 0.5
                    ).to(entropy.dtype).to(DEVICE)
    grad = ft.entropy_backward(grad_entropy, histogram, features, dictionary, lse, *args[2:],
                               reduction)
    grad_histogram = fierce_ext.backends.entropy_bits_backward(grad_entropy, histogram, reduction)
    expected_grad = ft.histogram_backward(grad_histogram, features, dictionary, lse, *args[2:])
    scale = expected_grad.double().abs().max()
    assert scale > 0 and torch.isfinite(grad).all()
    assert (grad.double() - expected_grad.double()).abs().max() <= 1e3 * eps * scale


def test_fused_entropy_of_a_poisoned_histogram_is_nan():
    features, dictionary, _ = make_problem(20, 5, 2, 11, dtype=torch.float32, seed=4)
    features[3, 1] = float("nan")
    entropy, histogram, lse = ft.entropy_forward(features, dictionary, "dot", "gumbel_hard", 1.0,
                                                 5, 0, "none")
    assert torch.isnan(histogram).all() and torch.isnan(entropy).all()
    grad = ft.entropy_backward(torch.ones_like(entropy), histogram, features, dictionary, lse,
                               "dot", "gumbel_hard", 1.0, 5, 0, "none")
    assert torch.isnan(grad).all()


def test_public_entropy_runs_the_fused_kernels(monkeypatch):
    # fierce_ext.entropy on the triton backend must take its entropy kernels, never the composed
    # torch formulas (which are what the fusion saves).
    def composed(*args):
        raise AssertionError("the composed entropy formulas ran")
    monkeypatch.setattr(fierce_ext.backends, "entropy_bits", composed)
    monkeypatch.setattr(fierce_ext.backends, "entropy_bits_backward", composed)
    features, dictionary, _ = make_problem(30, 4, 2, 9, dtype=torch.float32, seed=6)
    features.requires_grad_(True)
    value = fierce_ext.entropy(features, dictionary, seed=3, backend="triton")
    (grad,) = torch.autograd.grad(value, features)
    assert value.shape == () and 0 < value.item() <= math.log2(9)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# ------------------------------------------------------------------ through the public API

def test_public_api_autograd():
    features, dictionary, _ = make_problem(29, 9, 2, 15, seed=14)
    features.requires_grad_(True)
    entropy = fierce_ext.histogram_entropy(fierce_ext.histogram(
        features, dictionary, similarity="cosine", estimator="gumbel_hard", tau=0.5, seed=3,
        backend="triton"))
    (grad,) = torch.autograd.grad(entropy, features)
    features_ref = features.detach().clone().requires_grad_(True)
    entropy_ref = fierce_ext.histogram_entropy(fierce_ext.histogram(
        features_ref, dictionary, similarity="cosine", estimator="gumbel_hard", tau=0.5, seed=3,
        backend="reference"))
    (grad_ref,) = torch.autograd.grad(entropy_ref, features_ref)
    assert torch.equal(entropy.detach(), entropy_ref.detach())
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-14)


def test_reports_itself_available_here():
    assert fierce_ext.available_backends(DEVICE)["triton"].available


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the interpreter switch on a CPU machine")
def test_unavailable_on_cpu_without_interpreter():
    code = ("import fierce_ext.backends.fused_triton as ft, torch; "
            "print(ft.unavailable_reason(torch.device('cpu')))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout


# -------------------------------------------------------------------------- argument errors

def test_rejects_unknown_estimator_and_similarity():
    features, dictionary, _ = make_problem(4, 3, 1, 5, seed=15)
    with pytest.raises(ValueError, match="estimator"):
        ft.histogram_forward(features, dictionary, "dot", "hard", 1.0, 0, 0)
    with pytest.raises(ValueError, match="similarity"):
        ft.histogram_forward(features, dictionary, "euclid", "softmax", 1.0, 0, 0)


@pytest.mark.parametrize("heads, dim, bins, named", [
    (ft.MAX_GRID_Y + 1, 1, 1, r"heads \(dictionary.shape\[0\]\)"),
    (1, 1, 128 * ft.MAX_GRID_Y + 1, r"bins \(dictionary.shape\[2\]\)"),
    (1, 128 * ft.MAX_GRID_Y + 1, 1, r"feature dimensions \(dictionary.shape\[1\]\)"),
])
def test_sizes_beyond_the_launch_grid_are_an_error(heads, dim, bins, named):
    # CUDA launches at most 65535 programs on a grid's second axis; the interpreter has no such
    # limit, so without this check these sizes would run here and fail only on a GPU.
    features = torch.zeros(2, dim)
    dictionary = torch.zeros(heads, dim, bins)
    with pytest.raises(ValueError, match=named + r".*backend='torch'"):
        ft.histogram_forward(features, dictionary, "dot", "softmax", 1.0, 0, 0)
    with pytest.raises(ValueError, match=r"heads \(dictionary"):
        ft.noise_words(0, 1, ft.MAX_GRID_Y + 1, 1, device=torch.device("cpu"))
    # The largest sizes the grid takes pass the check (nothing is launched here).
    ft._check_grid(ft.MAX_GRID_Y, 128 * ft.MAX_GRID_Y, 128 * ft.MAX_GRID_Y)


def test_precision_setting_is_validated(monkeypatch):
    monkeypatch.delenv("FIERCE_EXT_FP32_PRECISION", raising=False)
    assert fp32_precision() == "tf32" and fp32_precision("cosine") == "tf32"
    assert fp32_precision("distance") == "ieee"  # unset: exact float32 for distance alone
    monkeypatch.setattr(ft, "FP32_PRECISION", None)  # None: the environment decides, per call
    assert ft._precision(torch.float32, "dot") == "tf32"
    assert ft._precision(torch.float32, "distance") == "ieee"
    monkeypatch.setenv("FIERCE_EXT_FP32_PRECISION", " IEEE ")
    assert fp32_precision() == "ieee"
    monkeypatch.setenv("FIERCE_EXT_FP32_PRECISION", "tf32")  # a setting applies to distance too
    assert fp32_precision("distance") == "tf32"
    monkeypatch.setenv("FIERCE_EXT_FP32_PRECISION", "tf32x3")
    assert ft._precision(torch.float32, "cosine") == "tf32x3"
    assert ft._precision(torch.bfloat16, "dot") == "tf32"
    assert ft._precision(torch.float64, "dot") == "ieee"
    monkeypatch.setattr(ft, "FP32_PRECISION", "ieee")  # the module setting wins
    assert ft._precision(torch.float32, "cosine") == "ieee"
    monkeypatch.setattr(ft, "FP32_PRECISION", None)
    monkeypatch.setenv("FIERCE_EXT_FP32_PRECISION", "fp64")
    features, dictionary, _ = make_problem(4, 3, 1, 5, torch.float32, seed=16)
    with pytest.raises(ValueError, match="FIERCE_EXT_FP32_PRECISION"):
        ft.histogram_forward(features, dictionary, "dot", "softmax", 1.0, 0, 0)
    monkeypatch.setattr(ft, "FP32_PRECISION", "half")
    with pytest.raises(ValueError, match="FP32_PRECISION"):
        ft.histogram_forward(features, dictionary, "dot", "softmax", 1.0, 0, 0)
