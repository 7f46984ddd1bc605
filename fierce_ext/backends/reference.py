"""The `reference` backend: the estimator computed literally, every B x C x K tensor materialised.

Written for clarity, not speed: it is the oracle the other backends are tested against. It
computes each similarity from its definition (not the projected form the fast backends share),
and its backward applies the softmax Jacobian and each similarity's derivative as written, on
the materialised tensors. float64 inputs stay float64.
"""

from __future__ import annotations

import torch

from ..dictionary import NORM_EPS, vector_norm
from ..noise import gumbel_noise
from . import compute_dtype

NAME = "reference"


def unavailable_reason(device: torch.device) -> str | None:
    return None  # plain PyTorch: runs wherever torch does


def _similarity(r, w, similarity):
    """s[b, h, k] from the definitions, materialised: (B, C, K)."""
    if similarity == "dot":
        return torch.einsum("bd,hdk->bhk", r, w)
    if similarity == "cosine":
        # Norms without overflow (a float32 row above ~1.8e19 would square to Inf; where
        # |r| |w| overflows, so does r . w).
        r_norm = vector_norm(r, 1).squeeze(1).clamp_min(NORM_EPS)
        w_norm = vector_norm(w, 1).squeeze(1).clamp_min(NORM_EPS)
        return torch.einsum("bd,hdk->bhk", r, w) / (r_norm[:, None, None] * w_norm[None])
    if similarity == "distance":  # -|r - w|^2 expanded, so no (B, C, D, K) tensor is formed
        r_sq = (r * r).sum(dim=1)[:, None, None]
        w_sq = (w * w).sum(dim=1)[None]
        return -(r_sq - 2 * torch.einsum("bd,hdk->bhk", r, w) + w_sq)
    raise ValueError(f"unknown similarity {similarity!r}")


def _similarity_vjp(ds, r, w, s, similarity):
    """dL/dr from dL/ds, by differentiating each definition by hand."""
    if similarity == "dot":
        return torch.einsum("bhk,hdk->bd", ds, w)
    if similarity == "cosine":  # d cos / dr = w / (|r| |w|) - cos * r / |r|^2
        r_norm = vector_norm(r, 1).clamp_min(NORM_EPS)
        w_unit = w / vector_norm(w, 1).clamp_min(NORM_EPS)
        # (r / |r|) / |r|, not r / |r|^2: |r|^2 overflows float32 above ~1.8e19.
        return (torch.einsum("bhk,hdk->bd", ds, w_unit) / r_norm
                - (ds * s).sum(dim=(1, 2))[:, None] * (r / r_norm) / r_norm)
    if similarity == "distance":  # d(-|r - w|^2) / dr = -2 (r - w)
        return -2 * (ds.sum(dim=(1, 2))[:, None] * r - torch.einsum("bhk,hdk->bd", ds, w))
    raise ValueError(f"unknown similarity {similarity!r}")


def _forward(features, dictionary, similarity, estimator, tau, seed, row_offset):
    """(r, w, s, z) in the compute dtype, with z = (s + g) / tau."""
    dtype = compute_dtype(features.dtype)
    r, w = features.to(dtype), dictionary.to(dtype)
    s = _similarity(r, w, similarity)
    z = s
    if estimator != "softmax":
        B, C, K = s.shape
        z = s + gumbel_noise(seed, B, C, K, row_offset, device=s.device, dtype=dtype)
    return r, w, s, z / tau


def histogram_forward(features, dictionary, similarity, estimator, tau, seed, row_offset):
    _, _, _, z = _forward(features, dictionary, similarity, estimator, tau, seed, row_offset)
    y = torch.softmax(z, dim=-1)
    if estimator == "gumbel_hard":
        e = torch.nn.functional.one_hot(z.argmax(dim=-1), z.shape[-1]).to(y.dtype)
    else:
        e = y
    lse = torch.logsumexp(z, dim=-1)
    # A row with a non-finite logit has a non-finite lse: poison every bin, not just some.
    return e.mean(dim=0) + torch.where(torch.isfinite(lse).all(), 0.0, torch.nan), lse


def histogram_backward(grad_histogram, features, dictionary, lse, similarity, estimator, tau,
                       seed, row_offset):
    # Straight-through for gumbel_hard: the gradient is the soft histogram's in every estimator.
    r, w, s, z = _forward(features, dictionary, similarity, estimator, tau, seed, row_offset)
    y = torch.softmax(z, dim=-1)
    grad = grad_histogram.to(y.dtype)
    dz = y * (grad - (y * grad).sum(dim=-1, keepdim=True)) / y.shape[0]  # softmax Jacobian
    return _similarity_vjp(dz / tau, r, w, s, similarity).to(features.dtype)
