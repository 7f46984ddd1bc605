"""The autograd op that drives every backend, registered with torch.library.

`fierce_ext::histogram` returns the batch histogram p (C, K) and the per-row statistic the
backward needs; its backward is `fierce_ext::histogram_backward`, which maps dL/dp to dL/dr. Both
are custom ops with fake (meta) implementations, so torch.compile traces through them without
graph breaks and torch.library.opcheck can check them. The seed travels as a 0-d int64 CPU tensor
so that drawing it inside a compiled region needs no `.item()` in the graph.

Mixed precision (torch.autocast): the ops have no autocast registration that casts inputs. They
take float16/bfloat16 features as they are (a fused backend reads them directly, half the bytes of
an fp32 copy), compute and accumulate in float32, return the histogram in float32 and the feature
gradient in the features' dtype. Autocast is switched off inside the implementations: a custom
op's body otherwise still runs under the caller's autocast state, and the backends' fp32 GEMMs
would silently drop to bf16/fp16.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import backends


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype computes and accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _autocast_off(device: torch.device):
    """A context that disables autocast on `device` (the ops promise fp32 compute)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("fierce_ext::histogram", mutates_args=())
def histogram_op(features: Tensor, dictionary: Tensor, seed: Tensor, similarity: str,
                 estimator: str, tau: float, row_offset: int, backend: str
                 ) -> tuple[Tensor, Tensor]:
    with _autocast_off(features.device):
        return backends.load(backend).histogram_forward(
            features, dictionary, similarity, estimator, tau, int(seed), row_offset)


@histogram_op.register_fake
def _histogram_fake(features, dictionary, seed, similarity, estimator, tau, row_offset, backend):
    dtype = compute_dtype(features.dtype)
    heads, _, bins = dictionary.shape
    return (features.new_empty((heads, bins), dtype=dtype),
            features.new_empty((features.shape[0], heads), dtype=dtype))


@torch.library.custom_op("fierce_ext::histogram_backward", mutates_args=())
def histogram_backward_op(grad_histogram: Tensor, features: Tensor, dictionary: Tensor,
                          lse: Tensor, seed: Tensor, similarity: str, estimator: str, tau: float,
                          row_offset: int, backend: str) -> Tensor:
    with _autocast_off(features.device):
        return backends.load(backend).histogram_backward(
            grad_histogram.contiguous(), features, dictionary, lse, similarity, estimator, tau,
            int(seed), row_offset)


@histogram_backward_op.register_fake
def _histogram_backward_fake(grad_histogram, features, *args):
    return torch.empty_like(features)


def _setup_context(ctx, inputs, output):
    features, dictionary, seed, similarity, estimator, tau, row_offset, backend = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(features, dictionary, lse, seed)
    ctx.options = (similarity, estimator, tau, row_offset, backend)


def _backward(ctx, grad_histogram, _grad_lse):
    features, dictionary, lse, seed = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        grad_features = histogram_backward_op(grad_histogram, features, dictionary, lse, seed,
                                              *ctx.options)
    return grad_features, None, None, None, None, None, None, None


histogram_op.register_autograd(_backward, setup_context=_setup_context)
