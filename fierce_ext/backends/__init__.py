"""Backends: interchangeable implementations of the two functions the autograd op drives.

Each backend is a module with

    NAME: str
    unavailable_reason(device) -> str | None        # None when it can run on `device`
    histogram_forward(features, dictionary, similarity, estimator, tau, seed, row_offset)
        -> (histogram (C, K), lse (B, C))           # both in the compute dtype
    histogram_backward(grad_histogram, features, dictionary, lse, similarity, estimator, tau,
                       seed, row_offset) -> grad_features (B, D) in features.dtype

The compute dtype is float64 for float64 features and float32 otherwise. `lse` is whatever
per-row statistic the backend's own backward needs (the fast backends: the log-sum-exp over bins
of the logits). A row whose logits are not all finite makes the histogram NaN. Nothing above
this package knows which backend runs.

A backend may also fuse the entropy of the histogram into its kernels (the `cuda` and `triton`
backends do: at the paper's sizes each separate small op costs about as much as the histogram):

    entropy_forward(features, dictionary, similarity, estimator, tau, seed, row_offset, reduction)
        -> (entropy () for "mean" or (C,) for "none", histogram, lse)
    entropy_backward(grad_entropy, histogram, features, dictionary, lse, similarity, estimator,
                     tau, seed, row_offset, reduction) -> grad_features

Where it does not, fierce_ext/ops.py composes the pair from the two functions above and
`entropy_bits` / `entropy_bits_backward` below, the formulas every backend follows.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from typing import NamedTuple

import torch

# Preference order for `backend="auto"`, per device type.
_MODULES = {
    "reference": "fierce_ext.backends.reference",
    "torch": "fierce_ext.backends.chunked",
    "triton": "fierce_ext.backends.fused_triton",
    "cuda": "fierce_ext.backends.cuda",
}
_AUTO_ORDER = {"cpu": ("torch",), "cuda": ("cuda", "triton", "torch")}

BACKENDS = tuple(_MODULES)


# How the GPU backends multiply float32 features: "tf32" (tensor cores, the default), "tf32x3"
# (three TF32 passes, near float32: Triton; the cuda backend computes it exactly) or "ieee"
# (exact float32 FMAs). Read at each call, so it can change between steps.
FP32_PRECISION_ENV = "FIERCE_EXT_FP32_PRECISION"
FP32_PRECISIONS = ("tf32", "tf32x3", "ieee")


def fp32_precision(similarity: str | None = None) -> str:
    """The float32 precision FIERCE_EXT_FP32_PRECISION asks for. Unset: "tf32", except "ieee"
    for `distance`, whose GEMM form 2 r.w - |w|^2 drops the row's |r|^2 and so cancels: TF32's
    rounding of r (2^-11 |r|) moves a logit by 2^-11 |r| 2|w|, +-5 in the age experiment
    (features ~50, bins to 100), which moved 0.5% of its hard assignments and 3% of the
    gradient. A setting applies to every similarity."""
    value = os.environ.get(FP32_PRECISION_ENV, "").strip().lower()
    if not value:
        return "ieee" if similarity == "distance" else "tf32"
    if value not in FP32_PRECISIONS:
        raise ValueError(f"{FP32_PRECISION_ENV} must be one of {FP32_PRECISIONS}, got {value!r}")
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the backends compute and accumulate in for features of `dtype`: float64 stays
    float64, every other floating dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The paper's guard inside the logarithm: empty bins contribute 0 and get a finite gradient.
ENTROPY_EPS = 1e-21


def entropy_bits(histogram: torch.Tensor, reduction: str) -> torch.Tensor:
    """H[h] = -sum_k p[h,k] log2(p[h,k] + eps) for each row of a (C, K) histogram, averaged over
    the rows for reduction "mean" (a 0-d tensor), kept per row for "none". Differentiable.

    Computed in `compute_dtype(histogram.dtype)`: a float16/bfloat16 histogram gives a float32
    entropy (in float16 `p + eps` rounds to p, so an empty bin would be 0 * log2(0) = NaN), and
    autograd gives the histogram a gradient in its own dtype."""
    p = histogram.to(compute_dtype(histogram.dtype))  # no copy for float32 and float64
    per_head = -(p * torch.log2(p + ENTROPY_EPS)).sum(dim=1)
    return per_head.mean() if reduction == "mean" else per_head


def entropy_bits_backward(grad_entropy: torch.Tensor, histogram: torch.Tensor,
                          reduction: str) -> torch.Tensor:
    """dL/dp (C, K) from dL/dH (a 0-d tensor for "mean", (C,) for "none"):

        dH[h]/dp[h,k] = -(log2(p + eps) + p / ((p + eps) ln 2)),  times 1/C for "mean".

    Computed like `entropy_bits` (float32 for a float16/bfloat16 histogram) and returned in the
    histogram's dtype, as autograd differentiates `entropy_bits`."""
    heads = histogram.shape[0]
    weight = (grad_entropy / heads).expand(heads) if reduction == "mean" else grad_entropy
    p = histogram.to(compute_dtype(histogram.dtype))
    shifted = p + ENTROPY_EPS
    slope = torch.log2(shifted).add_(p / shifted, alpha=1 / math.log(2))
    return slope.mul_(weight.to(slope.dtype).neg()[:, None]).to(histogram.dtype)


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why not, or "available"


def load(name: str):
    """The backend module `name`; raises ValueError for an unknown name."""
    if name not in _MODULES:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {name!r}")
    return importlib.import_module(_MODULES[name])


def status(name: str, device: torch.device | str) -> BackendStatus:
    try:
        reason = load(name).unavailable_reason(torch.device(device))
    except Exception as error:  # a broken install must not break the others
        reason = f"failed to load: {type(error).__name__}: {error}"
    return BackendStatus(reason is None, reason or "available")


def available_backends(device: torch.device | str | None = None) -> dict[str, BackendStatus]:
    """For each backend, whether it can run on `device` (default: CUDA if present, else CPU),
    and why not when it cannot."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must name a torch device, got {device!r} ({error})") from None
    return {name: status(name, device) for name in BACKENDS}


@functools.lru_cache(maxsize=None)
def resolve(name: str, device: torch.device) -> str:
    """The concrete backend to run on `device`: `name` itself, or the best one for "auto"."""
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            if status(candidate, device).available:
                return candidate
        return "torch"
    backend_status = status(name, device)  # raises for unknown names
    if not backend_status.available:
        usable = [n for n, s in available_backends(device).items() if s.available]
        raise RuntimeError(f"backend {name!r} cannot run on {device}: {backend_status.reason}; "
                           f"available there: {usable}")
    return name
