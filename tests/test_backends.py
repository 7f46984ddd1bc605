"""Every CPU backend against the independent float64 oracle (tests/oracle.py): histogram values and
gradients, on hypothesis-drawn shapes, similarities, estimators, layouts and dtypes.

Tolerance rule (eps = the compute dtype's epsilon: float64 for float64 features, else float32).
* Logits: the backend's z = (s + g) / tau carries an absolute error of at most
  tol_z = 4 sqrt(D+1) eps * zscale, where zscale bounds |z| from the inputs (Cauchy-Schwarz on the
  similarity, plus the largest possible noise value 17, over tau).
* Hard histogram, float64: EXACTLY equal (a near-tie within ~1e-13 of the winning logit has
  negligible probability on the continuous data drawn here).
* Hard histogram, float32: a bin can legitimately flip on a near-tie, so only rows whose float64
  top-2 margin is below 2 tol_z may pick another bin: per head, the number of rows that moved,
  sum_k |counts - oracle counts| / 2, must not exceed the number of such near-tie rows.
* Soft histograms: |dp| <= (exp(2 tol_z) - 1 + 1000 eps) p + eps (the relative error of each
  softmax, plus the sum over up to 600 rows).
* Gradient, per row b: |d grad_b| <= 4 dtol sum_hk m_bhk * |v| a_b (x2 for cosine, + 2|r_b| for
  distance, whose -|r|^2 term cancels only up to rounding) + 1000 eps |grad_b|, where
  dtol = 2 tol_z + 8 eps is the relative error of delta = y (G - yG) / (B tau) and
  m = y (|G - e| + sum_j y_j |G_j - mean G|) / (B tau) is |delta| plus the effect of an error in
  e = sum_k y G (README.md's backward formulas), from the oracle's logits.
* The data keep the logits O(1) / tau apart between bins, as in training: a saturated softmax
  has a gradient below its own tolerance, and its check would pass a wrong (even zero) one.
A wrong formula (sign, factor, noise index, missing term) is off by O(1) and fails: a 1% error
in tau in the backward fails every case, a noise row shifted by one every Gumbel case.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fierce_ext
from fierce_ext.backends import triton_noise
from oracle import (CPU_BACKENDS, ESTIMATORS, SIMILARITIES, check_huge_rows, check_large_logits,
                    large_logit_problem, oracle, top2_margin)

def make_features(gen, rows, dim, dtype, layout, scale):
    x = (torch.randn(rows, dim, generator=gen, dtype=torch.float64) * scale).to(dtype)
    if layout == "transposed":  # column-major storage
        return x.T.contiguous().T
    if layout == "strided":  # every other column of a wider buffer
        buffer = torch.zeros(rows, 2 * dim, dtype=dtype)
        buffer[:, ::2] = x
        return buffer[:, ::2]
    if layout == "expanded":  # stride 0 along the batch: every row the same vector
        return x[:1].expand(rows, dim)
    return x


def make_dictionary(gen, heads, dim, bins, dtype, layout, scale=1.0):
    w = ((2 * torch.rand(heads, dim, bins, generator=gen, dtype=torch.float64) - 1)
         * scale).to(dtype)
    if layout == "permuted":  # stored (C, K, D), viewed (C, D, K)
        return w.permute(0, 2, 1).contiguous().permute(0, 2, 1)
    if layout == "strided":  # every other bin of a wider buffer
        buffer = torch.zeros(heads, dim, 2 * bins, dtype=dtype)
        buffer[:, :, ::2] = w
        return buffer[:, :, ::2]
    return w


@st.composite
def problems(draw):
    rows = draw(st.integers(1, 600))
    dim = draw(st.integers(1, 300))
    return dict(
        rows=rows, dim=dim, heads=draw(st.integers(1, 4)), bins=draw(st.integers(1, 300)),
        similarity=draw(st.sampled_from(SIMILARITIES)),
        estimator=draw(st.sampled_from(ESTIMATORS)),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        tau=draw(st.sampled_from([0.25, 0.5, 1.0, 2.0, 4.0])),
        seed=draw(st.integers(0, 2**63 - 1)),
        row_offset=draw(st.one_of(st.just(0), st.integers(0, 2**40))),
        data_seed=draw(st.integers(0, 2**31)),
        feature_layout=draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded"])),
        dictionary_layout=draw(st.sampled_from(["contiguous", "permuted", "strided"])),
        # Features of a realistic size: |r| ~ scale for dot (so |s| stays tens, not hundreds).
        scale=draw(st.sampled_from([0.3, 1.0, 3.0])),
    )


def build(problem):
    gen = torch.Generator().manual_seed(problem["data_seed"])
    dim, dtype, similarity = problem["dim"], problem["dtype"], problem["similarity"]
    # Logits that differ between bins by O(1) / tau, as in training: otherwise the softmax
    # saturates and the gradient vanishes under its tolerance, checking nothing. dot: |r| ~
    # scale. distance: -|r - w|^2 varies over the bins by ~ sqrt(D) (|w|^2 and r . w), so r and
    # w are both shrunk by D^(-1/4).
    shrink = {"dot": 1 / math.sqrt(dim), "distance": dim ** -0.25}.get(similarity, 1.0)
    features = make_features(gen, problem["rows"], dim, dtype, problem["feature_layout"],
                             problem["scale"] * shrink)
    dictionary = make_dictionary(gen, problem["heads"], dim, problem["bins"], dtype,
                                 problem["dictionary_layout"],
                                 shrink if similarity == "distance" else 1.0)
    grad_histogram = torch.randn(problem["heads"], problem["bins"], generator=gen).to(dtype)
    return features, dictionary, grad_histogram


def logit_tolerance(features, dictionary, similarity, estimator, tau, eps):
    """Bound on the absolute error of z = (s + g) / tau computed in precision eps."""
    r = features.double()
    w = dictionary.double()
    r_max = r.norm(dim=1).max().item()
    w_max = w.norm(dim=1).max().item()
    s_bound = {"dot": r_max * w_max, "cosine": 1.0, "distance": (r_max + w_max) ** 2}[similarity]
    g_bound = 0.0 if estimator == "softmax" else 17.0  # |g| <= -log(-log(1 - 2^-24)) < 17
    zscale = (s_bound + g_bound) / tau
    return 4 * math.sqrt(features.shape[1] + 1) * eps * zscale


def run_backend(backend, features, dictionary, grad_histogram, problem):
    x = features.detach().requires_grad_(True)
    hist = fierce_ext.histogram(x, dictionary, similarity=problem["similarity"],
                                estimator=problem["estimator"], tau=problem["tau"],
                                seed=problem["seed"], backend=backend,
                                row_offset=problem["row_offset"])
    (hist * grad_histogram).sum().backward()
    return hist.detach(), x.grad


def check_against_oracle(backend, problem):
    features, dictionary, grad_histogram = build(problem)
    similarity, estimator, tau = problem["similarity"], problem["estimator"], problem["tau"]
    hist, grad = run_backend(backend, features, dictionary, grad_histogram, problem)
    ref = oracle(features, dictionary, similarity=similarity, estimator=estimator, tau=tau,
                 seed=problem["seed"], row_offset=problem["row_offset"],
                 grad_histogram=grad_histogram)
    rows, heads, bins = problem["rows"], problem["heads"], problem["bins"]
    compute = torch.float64 if problem["dtype"] == torch.float64 else torch.float32
    assert hist.shape == (heads, bins) and hist.dtype == compute
    assert grad.shape == features.shape and grad.dtype == features.dtype
    hist, grad = hist.double(), grad.double()

    eps = float(torch.finfo(compute).eps)
    tol_z = logit_tolerance(features, dictionary, similarity, estimator, tau, eps)
    if estimator == "gumbel_hard" and compute == torch.float64:
        assert torch.equal(hist, ref.histogram), (hist - ref.histogram).abs().max()
    elif estimator == "gumbel_hard":
        counts = hist * rows  # integers up to float32 rounding of count / B
        assert (counts - counts.round()).abs().max().item() < 1e-3
        ref_counts = (ref.histogram * rows).round()
        flips = (counts.round() - ref_counts).abs().sum(dim=1) / 2  # rows that changed bin
        near_ties = (top2_margin(ref.logits) < 2 * tol_z).sum(dim=0)  # per head
        assert bool((flips <= near_ties).all()), (flips, near_ties, tol_z)
    else:
        bound = (math.expm1(2 * tol_z) + 1000 * eps) * ref.histogram + eps
        excess = (hist - ref.histogram).abs() - bound
        assert excess.max().item() <= 0, (excess.max().item(), tol_z)

    r = features.double()
    w = dictionary.double()
    # sum_hk of |delta| = y |G - e| / (B tau) plus the effect of an error in e = sum_k y G.
    y = torch.softmax(ref.logits, dim=-1)
    g = grad_histogram.double()
    g_centred = g - g.mean(dim=1, keepdim=True)
    expected = (y * g).sum(dim=-1, keepdim=True)
    delta_sum = (y * ((g - expected).abs() + (y * g_centred.abs()).sum(dim=-1, keepdim=True))
                 ).sum(dim=(1, 2)) / (rows * tau)
    dtol = 2 * tol_z + 8 * eps
    if similarity == "cosine":
        through_v = 2 / r.norm(dim=1).clamp_min(1e-12)  # a_b |v| (=1), twice for the a_b term
    else:
        through_v = (2 if similarity == "distance" else 1) * w.norm(dim=1).max().item()
        # distance: the -|r|^2 term contributes r_b * sum(delta), zero only up to rounding
        through_v = through_v + (2 * r.norm(dim=1) if similarity == "distance" else 0)
    absolute = 4 * dtol * delta_sum * through_v
    bound = absolute + 1000 * eps * ref.grad.norm(dim=1)
    err = (grad - ref.grad).norm(dim=1)
    assert bool((err <= bound).all()), ((err - bound).max().item(), tol_z)
    # How far above its absolute tolerance the gradient lies: where this is not >> 1, the
    # gradient check above could not tell a wrong gradient (even zero) from the right one.
    return (ref.grad.norm(dim=1) / absolute.clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=30)
@given(problem=problems())
def test_backend_matches_oracle(backend, problem):
    check_against_oracle(backend, problem)


# Hand-picked corners hypothesis may not reach in a few dozen draws.
CORNERS = [
    dict(rows=1, dim=1, heads=1, bins=1),          # everything degenerate: p = [[1]]
    dict(rows=3, dim=1, heads=2, bins=100),        # the age setting: D = 1, many bins
    dict(rows=257, dim=5, heads=3, bins=7),        # K not a multiple of 4 (Philox quads)
    dict(rows=2, dim=300, heads=4, bins=2),        # wide features, two bins
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("corner", CORNERS, ids=lambda c: "x".join(map(str, c.values())))
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_backend_corners(backend, corner, similarity, dtype):
    for estimator in ESTIMATORS:
        problem = dict(corner, similarity=similarity, estimator=estimator, dtype=dtype, tau=0.5,
                       seed=2**62 + 12345, row_offset=0, data_seed=7,
                       feature_layout="transposed", dictionary_layout="permuted", scale=1.0)
        check_against_oracle(backend, problem)


@pytest.mark.parametrize("similarity, estimator",
                         [("dot", "softmax"), ("cosine", "gumbel_hard"),
                          ("distance", "gumbel_soft")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_torch_backend_largest_shape(similarity, estimator, dtype):
    # The largest drawn shape, for the backend meant for scale (see REFERENCE_DISTANCE_VOLUME).
    problem = dict(rows=600, dim=300, heads=4, bins=300, similarity=similarity,
                   estimator=estimator, dtype=dtype, tau=0.5, seed=31337, row_offset=0,
                   data_seed=11, feature_layout="strided", dictionary_layout="strided",
                   scale=1.0)
    signal = check_against_oracle("torch", problem)
    assert signal > 5, signal  # the gradient lies well above its tolerance: the check has teeth


def test_chunked_backend_crosses_chunks(monkeypatch):
    # Force many small chunks in the torch backend (a few rows each) to check the chunk
    # boundaries: the noise row index, the lse slices, the gradient slices.
    from fierce_ext.backends import chunked
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 3 * 2 * 9)
    for similarity in SIMILARITIES:
        for estimator in ESTIMATORS:
            problem = dict(rows=20, dim=6, heads=2, bins=9, similarity=similarity,
                           estimator=estimator, dtype=torch.float64, tau=0.7, seed=99,
                           row_offset=5, data_seed=3, feature_layout="contiguous",
                           dictionary_layout="contiguous", scale=1.0)
            check_against_oracle("torch", problem)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_torch_backend_far_bins_of_the_age_experiment(estimator, monkeypatch):
    # The age experiment's term (distance, bins at 1..100, features spread over them): most
    # logits lie hundreds to thousands below their row's max, where the torch backend floors the
    # softmax weights at e^-64 of the max (CPU speed, see chunked._EXP_FLOOR). In float64, the
    # same code without the floor must give the same histogram to within e^-64 per bin and the
    # same gradient to within 1e-24 (the floor's own bound), up to rounding; a floor at e^-40
    # fails for every estimator.
    from fierce_ext.backends import chunked

    gen = torch.Generator().manual_seed(8)
    features = 50.5 + 16.5 * torch.randn(128, 1, generator=gen, dtype=torch.float64)
    dictionary = fierce_ext.bin_dictionary(100, 1.0, 100.0, dtype=torch.float64)
    grad_histogram = torch.randn(1, 100, generator=gen, dtype=torch.float64)

    def run():
        x = features.clone().requires_grad_(True)
        hist = fierce_ext.histogram(x, dictionary, similarity="distance", estimator=estimator,
                                    seed=4, backend="torch")
        (hist * grad_histogram).sum().backward()
        return hist.detach(), x.grad

    hist, grad = run()
    monkeypatch.setattr(chunked, "_EXP_FLOOR", -math.inf)
    want_hist, want_grad = run()
    assert (want_hist > 0.005).sum() > 20  # the batch spans the bins
    if estimator != "gumbel_hard":  # and some bins get less than the floor
        assert (want_hist < math.exp(-64)).any()
    torch.testing.assert_close(hist, want_hist, rtol=1e-15, atol=math.exp(-64))
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-24)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", ["softmax", "gumbel_soft"])
def test_float32_cosine_of_huge_rows(backend, estimator):
    def run(features, dictionary, grad_histogram):
        x = features.clone().requires_grad_(True)
        hist = fierce_ext.histogram(x, dictionary, estimator=estimator, seed=5, backend=backend)
        (hist * grad_histogram).sum().backward()
        return hist.detach(), x.grad

    check_huge_rows(run, estimator)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_float32_gradient_with_large_logits(backend, estimator):
    features, dictionary, grad_histogram = large_logit_problem()
    x = features.clone().requires_grad_(True)
    hist = fierce_ext.histogram(x, dictionary, similarity="distance", estimator=estimator,
                                seed=3, backend=backend)
    (hist * grad_histogram).sum().backward()
    check_large_logits(hist.detach(), x.grad, features, dictionary, grad_histogram, estimator,
                       seed=3)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_torch_backend_masked_bins_weigh_nothing(estimator):
    # A bin whose logit is -inf (here: an atom at -inf, dot similarity) weighs exactly 0, not
    # the floor e^-64, and the rows stay finite. (Its gradient is NaN: 0 * inf in delta . v.)
    features = torch.tensor([[1.0, 2.0], [0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    dictionary = torch.rand(1, 2, 20, generator=torch.Generator().manual_seed(17),
                            dtype=torch.float64)
    dictionary[0, 0, :5], dictionary[0, 1, :5] = -math.inf, 0.0
    hist = fierce_ext.histogram(features, dictionary, similarity="dot", estimator=estimator,
                                seed=5, backend="torch")
    assert (hist[0, :5] == 0).all() and (hist[0, 5:] > 0).any()
    torch.testing.assert_close(hist.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_chunked_backward_with_and_without_the_kept_logits(similarity, estimator, monkeypatch):
    # A one-chunk batch keeps (s, z) from the forward; the backward takes them (and must get
    # the very bits a recompute gives), a changed tensor or seed must never match them, and
    # nothing stays behind after the backward.
    from fierce_ext.backends import chunked

    torch.manual_seed(3)
    features = torch.randn(33, 7)
    dictionary = fierce_ext.uniform_dictionary(7, 19, 2)
    grad = torch.randn(2, 19)
    args = (similarity, estimator, 0.7)
    monkeypatch.setattr(chunked, "_kept", chunked._Kept())
    _, lse = chunked.histogram_forward(features, dictionary, *args, 11, 5)
    assert len(chunked._kept._entries) == 1
    kept = chunked.histogram_backward(grad, features, dictionary, lse, *args, 11, 5)
    assert len(chunked._kept._entries) == 0
    recomputed = chunked.histogram_backward(grad, features, dictionary, lse, *args, 11, 5)
    assert torch.equal(kept, recomputed)

    # Another call's backward (changed features, seed or offset) must recompute and leave
    # this call's entry in place.
    changes = {"features": (features * 2.0, 11, 5), "seed": (features, 12, 5),
               "row_offset": (features, 11, 6)}
    for change, (other_features, seed, row_offset) in changes.items():
        monkeypatch.setattr(chunked, "_kept", chunked._Kept())
        expected = chunked.histogram_backward(grad, other_features, dictionary, lse, *args,
                                              seed, row_offset)
        chunked.histogram_forward(features, dictionary, *args, 11, 5)
        got = chunked.histogram_backward(grad, other_features, dictionary, lse, *args, seed,
                                         row_offset)
        assert torch.equal(got, expected), change
        assert len(chunked._kept._entries) == 1, change


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16],
                         ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "transposed"])
def test_chunked_kept_logits_any_dtype_and_layout(dtype, transposed, monkeypatch):
    # The kept path compares the features' bits (an int view of their dtype, any strides) and
    # writes fp32/fp64 gradients in place only when the gradient is contiguous: every case
    # must give the bits of a recompute.
    from fierce_ext.backends import chunked

    torch.manual_seed(4)
    features = torch.randn(7, 21) if transposed else torch.randn(21, 7)
    features = (features.T if transposed else features).to(dtype)
    assert features.is_contiguous() != transposed
    dictionary = fierce_ext.uniform_dictionary(7, 10, 2)
    grad = torch.randn(2, 10)
    args = ("cosine", "gumbel_soft", 0.7, 11, 5)
    monkeypatch.setattr(chunked, "_kept", chunked._Kept())
    _, lse = chunked.histogram_forward(features, dictionary, *args)
    recomputes = []
    logits = chunked._chunk_logits
    monkeypatch.setattr(chunked, "_chunk_logits", lambda *a: recomputes.append(1) or logits(*a))
    kept = chunked.histogram_backward(grad, features, dictionary, lse, *args)
    assert not recomputes and len(chunked._kept._entries) == 0  # it used the kept logits
    recomputed = chunked.histogram_backward(grad, features, dictionary, lse, *args)
    assert recomputes
    assert kept.dtype == dtype and kept.stride() == features.stride()
    assert torch.equal(kept, recomputed) and kept.abs().sum() > 0


def test_chunked_kept_logits_ignore_in_place_changes(monkeypatch):
    from fierce_ext.backends import chunked

    features = torch.randn(20, 5)
    dictionary = fierce_ext.uniform_dictionary(5, 9)
    args = ("dot", "softmax", 1.0, 3, 0)
    monkeypatch.setattr(chunked, "_kept", chunked._Kept())
    _, lse = chunked.histogram_forward(features, dictionary, *args)
    features.add_(1.0)  # same storage, new version: the kept logits are stale
    grad = torch.randn(1, 9)
    got = chunked.histogram_backward(grad, features, dictionary, lse, *args)
    monkeypatch.setattr(chunked, "_kept", chunked._Kept())
    assert torch.equal(got, chunked.histogram_backward(grad, features, dictionary, lse, *args))


def test_chunked_kept_logits_ignore_changes_through_data(monkeypatch):
    # `.data` writes bypass the version counter (gradcheck perturbs inputs that way): the
    # values check must still reject the stale logits.
    from fierce_ext.backends import chunked

    monkeypatch.setattr(chunked, "_kept", chunked._Kept())
    features = torch.randn(20, 5)
    dictionary = fierce_ext.uniform_dictionary(5, 9)
    args = ("cosine", "gumbel_soft", 0.5, 3, 0)
    _, lse = chunked.histogram_forward(features, dictionary, *args)
    version = features._version
    features.data[0, 0] += 0.25
    assert features._version == version  # the premise
    grad = torch.randn(1, 9)
    got = chunked.histogram_backward(grad, features, dictionary, lse, *args)
    assert torch.equal(got, chunked.histogram_backward(grad, features, dictionary, lse, *args))


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.3.5", False), ("3.6.0", "2.4.0", True), ("3.6.0+git1234", "2.5.1", True),
    ("3.7.0", "2.4.0", False), ("3.9.0", "2.5.1", False), ("3.5.1", "1.26.4", False)])
def test_triton_interpreter_gate(triton_version, numpy_version, refused, monkeypatch):
    # Triton 3.6's interpreter fails on every launch beside numpy >= 2.4 (triton-lang/triton#9171):
    # the backend must say so on the CPU instead of failing inside the interpreter. (A Triton
    # older than 3.6 is refused by the version check before this one is read.)
    monkeypatch.setattr(np, "__version__", numpy_version)
    reason = triton_noise._interpreter_breaks(types.SimpleNamespace(__version__=triton_version))
    assert (reason is not None) == refused
    if refused:
        assert "9171" in reason and "numpy<2.4" in reason and triton_version in reason
