"""The autograd op that drives every backend: `Histogram`, and its torch.library custom ops.

`histogram(...)` returns the batch histogram p (C, K) and the per-row statistic the backward
needs; its backward maps dL/dp to dL/dr. Both directions exist as custom ops
(`fierce_ext::histogram`, `fierce_ext::histogram_backward`) with fake (meta) implementations,
so torch.compile traces through them without graph breaks and torch.library.opcheck can check
them. The seed travels as a 0-d int64 CPU tensor so that drawing it inside a compiled region
needs no `.item()` in the graph.

One autograd.Function, `Histogram`, drives the backends. While tracing (torch.compile,
torch.export, fake tensors, any TorchDispatchMode) it calls the custom ops; in plain eager
calls it calls the backend directly, because a Python custom op costs ~0.2 ms of dispatch per
direction, which on the CPU is as much as the whole computation at the paper's batch sizes.
Both paths run the same two functions below, `_forward` and `_backward_features`.

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


def _autocast_off(device: torch.device):
    """A context that disables autocast on `device` (the ops promise fp32 compute)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _forward(features, dictionary, seed, similarity, estimator, tau, row_offset, backend):
    with _autocast_off(features.device):
        return backends.load(backend).histogram_forward(
            features, dictionary, similarity, estimator, tau, int(seed), row_offset)


def _backward_features(grad_histogram, features, dictionary, lse, seed, similarity, estimator,
                       tau, row_offset, backend):
    with _autocast_off(features.device):
        return backends.load(backend).histogram_backward(
            grad_histogram.contiguous(), features, dictionary, lse, similarity, estimator, tau,
            int(seed), row_offset)


@torch.library.custom_op("fierce_ext::histogram", mutates_args=())
def histogram_op(features: Tensor, dictionary: Tensor, seed: Tensor, similarity: str,
                 estimator: str, tau: float, row_offset: int, backend: str
                 ) -> tuple[Tensor, Tensor]:
    return _forward(features, dictionary, seed, similarity, estimator, tau, row_offset, backend)


@histogram_op.register_fake
def _histogram_fake(features, dictionary, seed, similarity, estimator, tau, row_offset, backend):
    dtype = backends.compute_dtype(features.dtype)
    heads, _, bins = dictionary.shape
    return (features.new_empty((heads, bins), dtype=dtype),
            features.new_empty((features.shape[0], heads), dtype=dtype))


@torch.library.custom_op("fierce_ext::histogram_backward", mutates_args=())
def histogram_backward_op(grad_histogram: Tensor, features: Tensor, dictionary: Tensor,
                          lse: Tensor, seed: Tensor, similarity: str, estimator: str, tau: float,
                          row_offset: int, backend: str) -> Tensor:
    return _backward_features(grad_histogram, features, dictionary, lse, seed, similarity,
                              estimator, tau, row_offset, backend)


@histogram_backward_op.register_fake
def _histogram_backward_fake(grad_histogram, features, *args):
    return torch.empty_like(features)


def _plain_eager(*tensors: Tensor) -> bool:
    """True when nothing traces or intercepts this call: no compiler, no TorchDispatchMode (fake
    tensors, make_fx, export, FlopCounterMode...), no torch.func transform, no tensor subclass.
    Then the backend may run without the custom op's dispatch; otherwise the custom ops keep the
    call visible."""
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active()
            and all(type(t) is Tensor for t in tensors))


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
        args = (grad_histogram, features, dictionary, lse, seed, *ctx.options)
        # create_graph=True (grad mode on here) goes through the op too: it has no second
        # derivative, and the op says so when one is asked for, where a direct call would
        # differentiate the backend's code with its saved statistics treated as constants.
        direct = _plain_eager(grad_histogram, features) and not torch.is_grad_enabled()
        grad_features = _backward_features(*args) if direct else histogram_backward_op(*args)
    return grad_features, None, None, None, None, None, None, None


histogram_op.register_autograd(_backward, setup_context=_setup_context)


class Histogram(torch.autograd.Function):
    """(histogram (C, K), lse (B, C)) of features (B, D) against dictionary (C, D, K),
    differentiable w.r.t. the features; the arguments are those of `histogram_op`.

    The forward takes `ctx` (no separate setup_context): `apply` then skips binding the
    arguments with inspect.signature, ~0.1 ms per call."""

    @staticmethod
    def forward(ctx, features, dictionary, seed, similarity, estimator, tau, row_offset,
                backend):
        args = (features, dictionary, seed, similarity, estimator, tau, row_offset, backend)
        output = _forward(*args) if _plain_eager(features, dictionary) else histogram_op(*args)
        _setup_context(ctx, args, output)
        return output

    backward = staticmethod(_backward)


def histogram(features: Tensor, dictionary: Tensor, seed: Tensor, similarity: str,
              estimator: str, tau: float, row_offset: int, backend: str
              ) -> tuple[Tensor, Tensor]:
    """`Histogram.apply` (arguments checked by the caller, see fierce_ext.functional)."""
    return Histogram.apply(features, dictionary, seed, similarity, estimator, tau, row_offset,
                           backend)
