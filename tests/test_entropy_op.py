"""The entropy op (fierce_ext.ops.entropy): the histogram and its entropy in one autograd op.

`fierce_ext.entropy` runs it so that a backend may fuse the entropy into its kernels; where a
backend does not, ops.py composes it from the histogram functions and the formulas of
backends.entropy_bits / entropy_bits_backward. Either way it must give what the two-step form
`histogram_entropy(histogram(...))`, differentiated by autograd, gives. The fused cuda backend is
compared with these formulas in tests/test_cuda_build.py (emulated) and tests/gpu/.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fierce_ext
from fierce_ext import backends, ops
from oracle import ESTIMATORS, SIMILARITIES

REDUCTIONS = ("mean", "none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_entropy_equals_the_entropy_of_the_histogram(backend, estimator, similarity, reduction):
    torch.manual_seed(4)
    features = torch.randn(37, 6, dtype=torch.float64, requires_grad=True)
    dictionary = fierce_ext.uniform_dictionary(6, 11, 3, dtype=torch.float64)
    options = dict(similarity=similarity, estimator=estimator, tau=0.8, seed=21, backend=backend)

    value = fierce_ext.entropy(features, dictionary, reduction=reduction, **options)
    (grad,) = torch.autograd.grad(value.sum(), features)
    two_step = fierce_ext.histogram_entropy(fierce_ext.histogram(features, dictionary, **options),
                                            reduction)
    (two_step_grad,) = torch.autograd.grad(two_step.sum(), features)

    assert value.shape == two_step.shape == (() if reduction == "mean" else (3,))
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, two_step, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, two_step_grad, rtol=1e-9, atol=1e-15)
    assert grad.abs().sum() > 0


def test_entropy_op_returns_the_histogram_and_statistic(backend):
    torch.manual_seed(5)
    features = torch.randn(20, 4)
    dictionary = fierce_ext.uniform_dictionary(4, 9, 2)
    seed = torch.tensor(8, dtype=torch.int64)
    value, histogram, lse = ops.entropy(features, dictionary, seed, "cosine", "gumbel_soft", 1.0,
                                        0, backend, "none")
    expected_histogram, expected_lse = ops.histogram(features, dictionary, seed, "cosine",
                                                     "gumbel_soft", 1.0, 0, backend)
    torch.testing.assert_close(histogram, expected_histogram, rtol=0, atol=0)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=0)
    torch.testing.assert_close(value, backends.entropy_bits(histogram, "none"), rtol=0, atol=0)
    assert not histogram.requires_grad and not lse.requires_grad


@st.composite
def histograms(draw):
    heads = draw(st.integers(1, 5))
    bins = draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    counts = torch.rand(heads, bins, generator=gen, dtype=torch.float64)
    # Empty bins (the guard inside the log keeps their gradient finite) and tiny ones.
    counts[torch.rand(heads, bins, generator=gen) < 0.3] = 0.0
    counts[torch.rand(heads, bins, generator=gen) < 0.1] *= 1e-30
    counts[:, 0] += 1e-3  # no empty head
    return (counts / counts.sum(dim=1, keepdim=True)).to(dtype)


@settings(max_examples=60)
@given(histogram=histograms(), reduction=st.sampled_from(REDUCTIONS), data=st.data())
def test_entropy_bits_backward_is_the_derivative_of_entropy_bits(histogram, reduction, data):
    shape = () if reduction == "mean" else histogram.shape[:1]
    # No subnormals: hypothesis refuses to draw them where flush-to-zero is on, and on torch 2.4
    # a CPU kernel compiled by inductor earlier in the session turns it on for the process.
    slopes = st.floats(-3, 3, allow_subnormal=False)
    grad_entropy = torch.tensor(data.draw(st.lists(slopes, min_size=1, max_size=1)
                                          if reduction == "mean" else
                                          st.lists(slopes, min_size=shape[0],
                                                   max_size=shape[0])),
                                dtype=histogram.dtype).reshape(shape)
    leaf = histogram.clone().requires_grad_()
    (expected,) = torch.autograd.grad(backends.entropy_bits(leaf, reduction), leaf, grad_entropy)
    got = backends.entropy_bits_backward(grad_entropy, histogram, reduction)
    assert got.shape == histogram.shape and got.dtype == histogram.dtype
    eps = torch.finfo(histogram.dtype).eps
    # |dH/dp| <= log2(1/eps_guard) + 1/ln 2 ~ 71: relative error of a few ulps of that.
    torch.testing.assert_close(got, expected, rtol=8 * eps, atol=8 * eps * 72 * 3)


def test_entropy_of_a_uniform_and_a_one_hot_histogram():
    # Known values: log2 K bits for uniform, 0 for a single full bin (the guard adds nothing).
    uniform = torch.full((2, 8), 1 / 8, dtype=torch.float64)
    one_hot = torch.zeros(2, 8, dtype=torch.float64)
    one_hot[:, 3] = 1.0
    torch.testing.assert_close(backends.entropy_bits(uniform, "mean"),
                               torch.tensor(3.0, dtype=torch.float64))
    assert backends.entropy_bits(one_hot, "none").abs().max() < 1e-15
    # Slope of -p log2 p is -(log2 p + 1/ln 2): at p = 1/8, 3 - 1/ln 2 per bin, halved by "mean".
    slope = backends.entropy_bits_backward(torch.tensor(1.0, dtype=torch.float64), uniform, "mean")
    torch.testing.assert_close(slope, torch.full_like(uniform, (3 - 1 / math.log(2)) / 2))


def test_nan_features_give_nan_entropy_and_gradient(backend):
    features = torch.randn(12, 3)
    features[4, 1] = float("nan")
    features.requires_grad_()
    value = fierce_ext.entropy(features, bins=7, seed=2, backend=backend)
    assert value.isnan()
    (grad,) = torch.autograd.grad(value, features)
    assert grad.isnan().all()  # the histogram is NaN in every bin, so every row's G is NaN


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_half_histogram_entropy_computes_in_float32(dtype, reduction):
    # In float16, p + 1e-21 rounds to p, so an empty bin was 0 * log2(0) = NaN (value and
    # gradient). Half histograms compute in float32: a float32 entropy, the float32 one's value,
    # and a gradient in the histogram's own dtype.
    histogram = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.0, 0.25, 0.5]], dtype=dtype)
    leaf = histogram.clone().requires_grad_()
    value = fierce_ext.histogram_entropy(leaf, reduction)
    reference = histogram.float().requires_grad_()
    expected = fierce_ext.histogram_entropy(reference, reduction)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=0, atol=0)
    grad_entropy = torch.ones_like(value)
    (grad,) = torch.autograd.grad(value, leaf, grad_entropy)
    (expected_grad,) = torch.autograd.grad(expected, reference, grad_entropy)
    assert grad.dtype == dtype and grad.isfinite().all()
    torch.testing.assert_close(grad, expected_grad.to(dtype), rtol=0, atol=0)
    # The formula ops.py composes the entropy op from agrees, in the histogram's dtype.
    got = backends.entropy_bits_backward(grad_entropy, histogram, reduction)
    assert got.dtype == dtype
    torch.testing.assert_close(got, grad, rtol=0, atol=0)
