"""Properties of the estimator that hold whatever the backend: gradcheck, the straight-through
identity, Gumbel-max statistics, entropy bounds, invariances, seeding."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fierce_ext
from oracle import ESTIMATORS, SIMILARITIES, similarity_f64


def _data(rows, dim, heads, bins, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, dim, generator=gen, dtype=dtype)
    dictionary = (2 * torch.rand(heads, dim, bins, generator=gen, dtype=dtype) - 1)
    return features, dictionary


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("estimator", ["softmax", "gumbel_soft"])
def test_gradcheck(backend, similarity, estimator):
    features, dictionary = _data(6, 4, 2, 5, seed=1)
    features.requires_grad_(True)

    def hist(x):
        return fierce_ext.histogram(x, dictionary, similarity=similarity, estimator=estimator,
                                    tau=0.7, seed=4242, backend=backend)

    assert torch.autograd.gradcheck(hist, (features,), eps=1e-6, atol=1e-8, rtol=1e-6)

    def ent(x):
        return fierce_ext.entropy(x, dictionary, similarity=similarity, estimator=estimator,
                                  tau=0.7, seed=4242, backend=backend, reduction="none")

    assert torch.autograd.gradcheck(ent, (features,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_straight_through_identity(backend, similarity, dtype):
    # For a fixed seed and any fixed G, d sum(p_hard G)/dr == d sum(p_soft G)/dr: the hard
    # estimator's backward is the soft one's, on the same noise.
    features, dictionary = _data(40, 7, 3, 11, dtype=dtype, seed=2)
    grad_histogram = torch.randn(3, 11, generator=torch.Generator().manual_seed(5), dtype=dtype)
    grads, hists = {}, {}
    for estimator in ("gumbel_hard", "gumbel_soft"):
        x = features.clone().requires_grad_(True)
        p = fierce_ext.histogram(x, dictionary, similarity=similarity, estimator=estimator,
                                 tau=0.5, seed=77, backend=backend)
        (p * grad_histogram).sum().backward()
        grads[estimator], hists[estimator] = x.grad, p.detach()
    assert not torch.equal(hists["gumbel_hard"], hists["gumbel_soft"])  # forwards do differ
    assert grads["gumbel_soft"].abs().max() > 0
    torch.testing.assert_close(grads["gumbel_hard"], grads["gumbel_soft"], rtol=1e-12, atol=0)


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_gumbel_max_statistics(backend, similarity, tau=0.5):
    # B copies of one row: each copy's hard assignment is an independent Gumbel-max draw, so
    # each p[h,k] is a binomial proportion. Its mean is softmax(s), NOT softmax(s / tau): the
    # logits are (s + g) / tau (README.md, and torch's gumbel_softmax the paper calls), and
    # dividing by tau > 0 does not move the argmax; tau only shapes the soft sample/gradient.
    rows, heads, bins = 12000, 2, 6
    gen = torch.Generator().manual_seed(17)
    row = torch.randn(1, 3, generator=gen, dtype=torch.float64) * 0.8
    dictionary = torch.rand(heads, 3, bins, generator=gen, dtype=torch.float64)
    p = fierce_ext.histogram(row.expand(rows, 3), dictionary, similarity=similarity,
                             estimator="gumbel_hard", tau=tau, seed=123, backend=backend)
    expected = torch.softmax(similarity_f64(row, dictionary, similarity)[0], dim=-1)
    std = (expected * (1 - expected) / rows).sqrt()
    assert bool(((p - expected).abs() <= 5 * std + 1e-12).all()), (p, expected)
    # Hard counts are multiples of 1/B (the estimator is not the softmax itself). The
    # independence of tau itself is checked exactly by the next test.
    assert ((p * rows) - (p * rows).round()).abs().max().item() < 1e-9


def test_hard_histogram_independent_of_tau(backend):
    features, dictionary = _data(500, 6, 2, 12, seed=18)
    hists = [fierce_ext.histogram(features, dictionary, estimator="gumbel_hard", tau=tau,
                                  seed=5, backend=backend) for tau in (0.1, 1.0, 7.0)]
    assert torch.equal(hists[0], hists[1]) and torch.equal(hists[1], hists[2])
    soft = [fierce_ext.histogram(features, dictionary, estimator="gumbel_soft", tau=tau,
                                 seed=5, backend=backend) for tau in (0.1, 7.0)]
    assert not torch.allclose(soft[0], soft[1])  # while the soft one does depend on tau


@settings(max_examples=15)
@given(rows=st.integers(1, 200), dim=st.integers(1, 20), heads=st.integers(1, 3),
       bins=st.integers(1, 64), similarity=st.sampled_from(SIMILARITIES),
       estimator=st.sampled_from(ESTIMATORS), tau=st.sampled_from([0.1, 1.0, 10.0]),
       dtype=st.sampled_from([torch.float32, torch.float64]), data_seed=st.integers(0, 999))
def test_entropy_bounds(rows, dim, heads, bins, similarity, estimator, tau, dtype, data_seed):
    features, dictionary = _data(rows, dim, heads, bins, dtype=dtype, seed=data_seed)
    for backend in ("reference", "torch"):
        h = fierce_ext.entropy(features, dictionary, similarity=similarity, estimator=estimator,
                               tau=tau, seed=data_seed, reduction="none", backend=backend)
        slack = 1e-5 if dtype == torch.float32 else 1e-12
        assert h.shape == (heads,)
        assert bool((h >= -slack).all()) and bool((h <= math.log2(bins) + slack).all()), h


def test_entropy_extremes(backend):
    # All rows identical with softmax and a huge 1/tau: one bin takes everything -> H = 0.
    # Zero features with cosine: every similarity is 0, softmax is uniform -> H = log2 K.
    features, dictionary = _data(1, 5, 2, 16, seed=3)
    h0 = fierce_ext.entropy(features.expand(50, 5), dictionary, estimator="softmax",
                            tau=1e-4, backend=backend)
    assert abs(h0.item()) < 1e-9
    hmax = fierce_ext.entropy(torch.zeros(50, 5, dtype=torch.float64), dictionary,
                              estimator="softmax", backend=backend)
    assert abs(hmax.item() - 4.0) < 1e-9


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_batch_permutation_invariance(backend, similarity):
    # softmax: the histogram is a mean over rows, so permuting rows changes only the order of a
    # sum. The Gumbel estimators tie the noise to the row INDEX (the noise rule), so a permuted
    # batch draws different noise per row: exact invariance holds only in distribution, which
    # the next test checks.
    features, dictionary = _data(300, 9, 2, 13, seed=4)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(8))
    grad_histogram = torch.randn(2, 13, dtype=torch.float64)
    out = []
    for x in (features.clone(), features[perm].clone()):
        x.requires_grad_(True)
        p = fierce_ext.histogram(x, dictionary, similarity=similarity, estimator="softmax",
                                 backend=backend)
        (p * grad_histogram).sum().backward()
        out.append((p.detach(), x.grad))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(out[0][1][perm], out[1][1], rtol=1e-12, atol=1e-18)


@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft"])
def test_gumbel_histogram_statistically_permutation_invariant(backend, estimator):
    # With noise tied to row indices, a permuted batch gives a different draw of the same
    # distribution: the two histograms agree within sampling error (hard: binomial 5 sigma).
    features, dictionary = _data(4000, 4, 1, 5, seed=6)
    perm = torch.randperm(4000, generator=torch.Generator().manual_seed(9))
    kwargs = dict(similarity="cosine", estimator=estimator, seed=5, backend=backend)
    p = fierce_ext.histogram(features, dictionary, **kwargs)
    q = fierce_ext.histogram(features[perm], dictionary, **kwargs)
    assert not torch.equal(p, q)
    std = (p * (1 - p) / 4000).sqrt()
    assert bool(((p - q).abs() <= 5 * math.sqrt(2) * std + 1e-9).all())


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_cosine_invariant_to_positive_scaling(backend, estimator):
    features, dictionary = _data(120, 6, 2, 9, seed=10)
    scale = torch.rand(120, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    scale = 0.1 + 20 * scale  # per-row positive factors in [0.1, 20.1)
    grad_histogram = torch.randn(2, 9, dtype=torch.float64)
    results = []
    for x in (features.clone(), (features * scale).clone()):
        x.requires_grad_(True)
        p = fierce_ext.histogram(x, dictionary, similarity="cosine", estimator=estimator,
                                 tau=0.3, seed=21, backend=backend)
        (p * grad_histogram).sum().backward()
        results.append((p.detach(), x.grad))
    if estimator == "gumbel_hard":
        assert torch.equal(results[0][0], results[1][0])
    else:
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-15)
    # r -> c r leaves r/|r| unchanged, so the gradient scales as 1/c (homogeneous of degree -1).
    torch.testing.assert_close(results[1][1] * scale, results[0][1], rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft"])
def test_seed_reproducibility(backend, estimator):
    features, dictionary = _data(64, 5, 2, 10, dtype=torch.float32, seed=12)

    def run(seed):
        x = features.clone().requires_grad_(True)
        p = fierce_ext.histogram(x, dictionary, estimator=estimator, seed=seed, backend=backend)
        p.pow(2).sum().backward()
        return p.detach(), x.grad

    a, b, c = run(2**40 + 3), run(2**40 + 3), run(2**40 + 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same bits twice
    assert not torch.equal(a[0], c[0])  # another seed: another draw
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft"])
def test_seed_none_follows_torch_manual_seed(backend, estimator):
    features, dictionary = _data(64, 5, 2, 10, dtype=torch.float32, seed=13)

    def run():
        return fierce_ext.histogram(features, dictionary, estimator=estimator, backend=backend)

    torch.manual_seed(1234)
    first, second = run(), run()
    torch.manual_seed(1234)
    again = run()
    assert torch.equal(first, again)
    assert not torch.equal(first, second)  # each call draws a fresh seed


def test_softmax_ignores_seed(backend):
    features, dictionary = _data(30, 4, 1, 8, seed=14)
    a = fierce_ext.histogram(features, dictionary, estimator="softmax", seed=1, backend=backend)
    b = fierce_ext.histogram(features, dictionary, estimator="softmax", seed=2, backend=backend)
    assert torch.equal(a, b)


def test_backends_agree_bitwise_on_hard_counts():
    # Both CPU backends use the same noise words: on float64 data their hard histograms are
    # identical, not merely close (a backend with shifted noise indices would differ).
    features, dictionary = _data(500, 16, 3, 40, seed=15)
    hists = [fierce_ext.histogram(features, dictionary, seed=99, backend=name,
                                  row_offset=1000)
             for name in ("reference", "torch")]
    assert torch.equal(hists[0], hists[1])
