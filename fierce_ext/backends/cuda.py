"""The `cuda` backend: the compiled extension `fierce_ext._C` (csrc/), fused CUDA kernels.

The extension registers four ops (CUDA kernels only):

    torch.ops.fierce_ext.cuda_histogram_forward(features, vt, bias, similarity, estimator, tau,
                                                seed, row_offset, allow_tf32) -> (histogram, lse)
    torch.ops.fierce_ext.cuda_histogram_backward(grad_histogram, features, vt, bias, lse,
                                                 similarity, estimator, tau, seed, row_offset,
                                                 allow_tf32) -> grad_features
    torch.ops.fierce_ext.cuda_entropy_forward(..., allow_tf32, mean) -> (entropy, histogram, lse)
    torch.ops.fierce_ext.cuda_entropy_backward(grad_entropy, histogram, features, ..., allow_tf32,
                                               mean) -> grad_features

The entropy pair fuses the histogram's entropy into the forward's last kernel (for tiny problems
the whole forward is then one launch) and its derivative into the backward kernels (each block
forms dL/dp from dL/dH and the histogram, tile by tile), so `fierce_ext.entropy` adds no torch
ops of its own: at the paper's sizes one launch forward and one backward.

This module adapts them to the backend interface: it projects the dictionary once per
(dictionary, version, similarity, dtype) (vt = v laid out bins-major (C, K, D) in the features'
dtype, bias c (C, K) in the compute dtype; dictionary.project_dictionary and .derived), and it
registers the ops' fake implementations so torch.compile and torch.library.opcheck can trace
them. Importing it never imports the extension; a missing or broken extension only makes
`unavailable_reason` say why.

Precision of float32 features: the logit and gradient GEMMs use tf32 tensor cores unless the
environment variable FIERCE_EXT_FP32_PRECISION (backends.fp32_precision) is "ieee" or
"tf32x3" (both: exact float32 FMAs; this backend has no three-pass TF32). The default is "tf32"
(`distance`: exact float32, see backends.fp32_precision), not
torch.backends.cuda.matmul.allow_tf32 (which defaults to False), because this backend
exists for speed and its statistics accumulate in float32 either way. float16/bfloat16
features use their own tensor cores with float32 accumulation; float64 features use float64 FMAs.
The cached projection assumes the dictionary is only changed in place through autograd-visible
operations (which bump its version counter), not through `.data.copy_()`.
"""

from __future__ import annotations

import threading

import torch

from .. import _extension
from ..dictionary import derived, project_dictionary
from . import compute_dtype, fp32_precision

NAME = "cuda"

MIN_CAPABILITY = (8, 0)  # bfloat16 / tf32 WMMA
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_fakes_lock = threading.Lock()
_fakes_registered = False
_OPS = ("cuda_histogram_forward", "cuda_histogram_backward", "cuda_entropy_forward",
        "cuda_entropy_backward")


def _load() -> str | None:
    """None when the extension's CUDA ops can run, else why not."""
    reason = _extension.load()
    if reason is not None:
        return reason
    if not _extension.has_ops(*_OPS):
        return ("fierce_ext._C was built without its CUDA kernels (a CPU build of torch, no nvcc, "
                f"FIERCE_EXT_BUILD_CUDA=0, or a stale build): {_extension.BUILD_HINT}")
    _register_fakes()
    return None


def _register_fakes() -> None:
    """Fake implementations of the compiled ops. Called once they exist: after _load imports
    the extension, or when this module is imported with the extension already loaded (the ops
    name this module with set_python_module, so torch imports it when it needs their fakes)."""
    global _fakes_registered
    with _fakes_lock:
        if not _fakes_registered:
            _register_fakes_once()
            _fakes_registered = True


def _register_fakes_once() -> None:
    @torch.library.register_fake("fierce_ext::cuda_histogram_forward")
    def _forward_fake(features, vt, bias, similarity, estimator, tau, seed, row_offset,
                      allow_tf32):
        dtype = compute_dtype(features.dtype)
        heads, bins = vt.shape[0], vt.shape[1]
        return (features.new_empty((heads, bins), dtype=dtype),
                features.new_empty((features.shape[0], heads), dtype=dtype))

    @torch.library.register_fake("fierce_ext::cuda_histogram_backward")
    def _backward_fake(grad_histogram, features, vt, bias, lse, similarity, estimator, tau, seed,
                       row_offset, allow_tf32):
        return features.new_empty(features.shape)  # contiguous, like the kernel's output

    @torch.library.register_fake("fierce_ext::cuda_entropy_forward")
    def _entropy_forward_fake(features, vt, bias, similarity, estimator, tau, seed, row_offset,
                              allow_tf32, mean):
        histogram, lse = _forward_fake(features, vt, bias, similarity, estimator, tau, seed,
                                       row_offset, allow_tf32)
        return histogram.new_empty(() if mean else (vt.shape[0],)), histogram, lse

    @torch.library.register_fake("fierce_ext::cuda_entropy_backward")
    def _entropy_backward_fake(grad_entropy, histogram, features, vt, bias, lse, similarity,
                               estimator, tau, seed, row_offset, allow_tf32, mean):
        return features.new_empty(features.shape)


def unavailable_reason(device: torch.device) -> str | None:
    device = torch.device(device)
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices only, got {device}"
    reason = _load()
    if reason is not None:
        return reason
    if not torch.cuda.is_available():
        return "torch reports no usable CUDA device (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        return f"no CUDA device {index}: torch sees {torch.cuda.device_count()}"
    capability = torch.cuda.get_device_capability(index)
    if capability < MIN_CAPABILITY:
        return (f"the cuda backend needs compute capability >= "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (bfloat16/tf32 tensor cores); "
                f"device {index} has {capability[0]}.{capability[1]}")
    return None


def allow_tf32(similarity: str) -> bool:
    """Whether float32 features multiply on tf32 tensor cores (FIERCE_EXT_FP32_PRECISION)."""
    return fp32_precision(similarity) == "tf32"


def _kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    # Other floating dtypes (float8 ...) compute as float32, like the torch backend.
    return dtype if dtype in SUPPORTED_DTYPES else torch.float32


def project(dictionary: torch.Tensor, similarity: str, dtype: torch.dtype):
    """(vt, bias) for the kernels: v of project_dictionary as (C, K, D) in `dtype` (the features'
    dtype) and the bias (C, K) in the compute dtype or None; built once per dictionary version
    (dictionary.derived)."""
    def build():
        v, bias = project_dictionary(dictionary, similarity, compute_dtype(dtype))
        vt = v.transpose(1, 2).to(dtype).contiguous()
        return vt, bias.contiguous() if bias is not None else None
    return derived(dictionary, (NAME, similarity, dtype), build)


def _require() -> None:
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"the cuda backend is unavailable: {reason}")


def _kernel_inputs(features, dictionary, similarity):
    """(features as the kernels read them, compute dtype, vt, bias); checks the extension."""
    _require()
    features = features.to(_kernel_dtype(features.dtype)).contiguous()
    vt, bias = project(dictionary, similarity, features.dtype)
    return features, compute_dtype(features.dtype), vt, bias


def histogram_forward(features, dictionary, similarity, estimator, tau, seed, row_offset):
    features, _, vt, bias = _kernel_inputs(features, dictionary, similarity)
    return torch.ops.fierce_ext.cuda_histogram_forward(
        features, vt, bias, similarity, estimator, float(tau), int(seed), int(row_offset),
        allow_tf32(similarity))


def histogram_backward(grad_histogram, features, dictionary, lse, similarity, estimator, tau,
                       seed, row_offset):
    kernel_features, compute, vt, bias = _kernel_inputs(features, dictionary, similarity)
    grad_features = torch.ops.fierce_ext.cuda_histogram_backward(
        grad_histogram.to(compute).contiguous(), kernel_features, vt, bias,
        lse.to(compute).contiguous(), similarity, estimator, float(tau), int(seed),
        int(row_offset), allow_tf32(similarity))
    return grad_features.to(features.dtype)


def entropy_forward(features, dictionary, similarity, estimator, tau, seed, row_offset,
                    reduction):
    features, _, vt, bias = _kernel_inputs(features, dictionary, similarity)
    return torch.ops.fierce_ext.cuda_entropy_forward(
        features, vt, bias, similarity, estimator, float(tau), int(seed), int(row_offset),
        allow_tf32(similarity), reduction == "mean")


def entropy_backward(grad_entropy, histogram, features, dictionary, lse, similarity, estimator,
                     tau, seed, row_offset, reduction):
    kernel_features, compute, vt, bias = _kernel_inputs(features, dictionary, similarity)
    grad_features = torch.ops.fierce_ext.cuda_entropy_backward(
        grad_entropy.to(compute).contiguous(), histogram.to(compute).contiguous(),
        kernel_features, vt, bias, lse.to(compute).contiguous(), similarity, estimator,
        float(tau), int(seed), int(row_offset), allow_tf32(similarity), reduction == "mean")
    return grad_features.to(features.dtype)


if _extension.has_ops(*_OPS):  # the extension was loaded before this module (see _register_fakes)
    _register_fakes()
