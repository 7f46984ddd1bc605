"""Mixed precision on CPU: bf16 autocast and half-precision features.

The op takes bf16/fp16 features as they are, computes in fp32 with autocast switched off inside
(a custom op's body otherwise runs under the caller's autocast and its GEMMs drop to bf16),
returns an fp32 histogram/entropy and a gradient in the features' dtype.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fierce_ext
from fierce_ext.ops import histogram_op

BINS = 16


def test_autocast_model_features_bf16_entropy_fp32():
    torch.manual_seed(0)
    body, head = nn.Linear(12, 8), nn.Linear(8, 3)
    criterion = fierce_ext.FIERCELoss(8, lam=0.5, bins=BINS)
    x, target = torch.randn(64, 12), torch.randint(0, 3, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = body(x)
        features.retain_grad()
        logits = head(features)
        loss = criterion(logits, target, features, seed=5)
    assert features.dtype == torch.bfloat16  # the premise: autocast made bf16 features
    assert criterion.last_entropy.dtype == torch.float32
    assert 0 < criterion.last_entropy.item() <= math.log2(BINS)
    loss.backward()
    assert features.grad.dtype == torch.bfloat16
    assert torch.isfinite(features.grad).all()
    assert body.weight.grad.dtype == torch.float32
    assert torch.isfinite(body.weight.grad).all() and body.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("similarity", ["cosine", "dot", "distance"])
def test_autocast_op_computes_in_fp32(similarity):
    # Under autocast, bf16 features must give exactly what fp32 compute on the same values gives
    # (bf16 -> fp32 is exact). A bf16 GEMM inside the op differs by ~1e-4 (measured), far
    # above the tolerance here.
    torch.manual_seed(1)
    features = (torch.randn(96, 24) * 0.5).bfloat16().requires_grad_()
    dictionary = fierce_ext.uniform_dictionary(24, BINS, 2)
    exact = features.detach().float().requires_grad_()
    kwargs = dict(similarity=similarity, estimator="gumbel_soft", tau=0.1, seed=9)

    weights = torch.randn(2, BINS)  # a generic dL/dp
    expected = fierce_ext.histogram(exact, dictionary, **kwargs)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hist = fierce_ext.histogram(features, dictionary, **kwargs)
        weighted = (hist * weights).sum()
    (grad,) = torch.autograd.grad(weighted, features)

    assert hist.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(hist, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad.bfloat16(), rtol=0, atol=0)


def test_autocast_does_not_touch_op_internals_lse():
    # The per-row log-sum-exp the backward reuses must also be the fp32 one.
    torch.manual_seed(2)
    features = torch.randn(50, 32).bfloat16()
    dictionary = fierce_ext.uniform_dictionary(32, BINS, 1)
    seed, tau = torch.tensor(3), torch.tensor(0.05, dtype=torch.float64)
    _, lse = histogram_op(features, dictionary, seed, "dot", "gumbel_hard", tau, 0, "torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, lse_autocast = histogram_op(features, dictionary, seed, "dot", "gumbel_hard", tau, 0,
                                       "torch")
    assert lse_autocast.dtype == torch.float32
    torch.testing.assert_close(lse_autocast, lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_features_large_values_no_overflow(dtype):
    # dot similarities of these rows reach ~1e5, beyond fp16's 65504: computing them in the
    # features' dtype would give inf and a NaN entropy.
    torch.manual_seed(3)
    features = (torch.rand(32, 8) * 2e4 + 1e4).to(dtype).requires_grad_()
    dictionary = fierce_ext.uniform_dictionary(8, BINS, 1, low=0.0, high=1.0)
    h = fierce_ext.entropy(features, dictionary, similarity="dot", estimator="gumbel_soft",
                           tau=1e4, seed=1)
    assert h.dtype == torch.float32 and torch.isfinite(h)
    h.backward()
    assert features.grad.dtype == dtype
    assert torch.isfinite(features.grad).all()
    expected = fierce_ext.entropy(features.detach().float(), dictionary, similarity="dot",
                                  estimator="gumbel_soft", tau=1e4, seed=1)
    torch.testing.assert_close(h, expected)
