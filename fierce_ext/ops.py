"""The autograd ops that drive every backend: `Histogram` and `Entropy`, and their custom ops.

`histogram(...)` returns the batch histogram p (C, K) and the per-row statistic the backward
needs; its backward maps dL/dp to dL/dr. `entropy(...)` returns the entropy of that histogram
(bits, averaged over heads for reduction "mean") along with p and the statistic; its backward
maps dL/dH to dL/dr. A backend may fuse the entropy into its kernels (backends/__init__.py);
for the others `_entropy_forward` / `_entropy_backward` compose it from the histogram functions,
so at the paper's sizes, where every small op costs about as much as the kernels, the `cuda`
backend runs one launch per direction where the composed form adds about fifteen. Each direction
exists as a custom op (`fierce_ext::histogram`, `fierce_ext::histogram_backward`,
`fierce_ext::entropy`, `fierce_ext::entropy_backward`) with a fake (meta) implementation, so
torch.compile traces through them without graph breaks and torch.library.opcheck can check
them. The seed travels as a 0-d int64 CPU tensor so that drawing it inside a compiled region
needs no `.item()` in the graph, and tau as a 0-d float64 CPU tensor so that a new value (an
annealed temperature) is a new input of the graph, not a recompile (a float argument of a custom
op is guarded on its value); the plain eager path keeps Python numbers.

While anything traces (torch.compile, torch.export, fake tensors, any TorchDispatchMode) the
calls go to the custom ops and their registered autograd; in plain eager calls to the
autograd.Functions `Histogram` / `Entropy`, which call the backend directly, because a Python
custom op costs ~0.2 ms of dispatch per direction, which on the CPU is as much as the whole
computation at the paper's batch sizes. Both paths run the same functions below. (Traced calls
must not go through an autograd.Function: strict torch.export runs one with grad mode off, and
its output, though right in value, had no gradient.)

torch.func transforms (grad, vjp, jacrev, vmap, functional_call-based training) accept only
autograd.Functions with a separate setup_context, which neither `Histogram`/`Entropy` (old style,
for speed) nor the custom ops' generated autograd have. Under a transform the calls therefore go
through `HistogramUnderTransforms` / `EntropyUnderTransforms`: the same forward, setup and
backward, with the backend run directly and a vmap rule that loops over the mapped dimension.
The backward itself runs inside `_FirstOrderOnly`, so that asking for a second derivative
(hessian, grad of grad) raises instead of differentiating the backend's code; forward-mode AD
(jvp, jacfwd) raises NotImplementedError. Outside transforms, create_graph=True runs the
backward custom ops, whose registered autograd raises the same NotImplementedError
(`NO_SECOND_DERIVATIVE`) when their result is differentiated (a torch.compile'd call raises
torch's own "torch.compile with aot_autograd does not currently support double backward").

Mixed precision (torch.autocast): the ops have no autocast registration that casts inputs. They
take float16/bfloat16 features as they are (a fused backend reads them directly, half the bytes of
an fp32 copy), compute and accumulate in float32, return the histogram in float32 and the feature
gradient in the features' dtype. Autocast is switched off inside the implementations: a custom
op's body otherwise still runs under the caller's autocast state, and the backends' fp32 GEMMs
would silently drop to bf16/fp16.
"""

# No `from __future__ import annotations` here: torch.library.custom_op reads the signatures'
# annotations, and torch < 2.5 cannot read them as strings.
import contextlib

import torch
from torch import Tensor

from . import backends, noise

# -------------------------------------------------------- what both paths run (eager and traced)


def _autocast_off(device: torch.device):
    """A context that disables autocast on `device` (the ops promise fp32 compute)."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# The legacy vmap behind torch.autograd.grad(is_grads_batched=True) and
# torch.autograd.functional.jacobian(vectorize=True) wraps gradients in tensors of plain type that
# carry this dispatch key; the custom ops' batching fallback runs the backend once per entry.
_LEGACY_BATCHED = torch._C._dispatch_key_parse("Batched")


def _plain_eager(*tensors: Tensor) -> bool:
    """True when nothing traces or intercepts this call: no compiler, no TorchDispatchMode (fake
    tensors, make_fx, export, FlopCounterMode...), no torch.func transform, no tensor subclass,
    no legacy vmap. Then the backend may run without the custom op's dispatch; otherwise the
    custom ops keep the call visible."""
    return (not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._are_functorch_transforms_active()
            and all(type(t) is Tensor and not torch._C._dispatch_keys(t).has(_LEGACY_BATCHED)
                    for t in tensors))


# Dynamo before torch 2.5 cannot trace the query below; there a compiled region takes the
# Functions for plain autograd (torch.compile of a torch.func transform is then unsupported).
_DYNAMO_TRACES_TRANSFORM_QUERY = torch.__version__ >= "2.5"


def _under_transforms() -> bool:
    """Whether a torch.func transform is active."""
    if not _DYNAMO_TRACES_TRANSFORM_QUERY and torch.compiler.is_compiling():
        return False
    return torch._C._are_functorch_transforms_active()


def _tau_tensor(tau) -> Tensor:
    """tau as the ops take it: a 0-d float64 CPU tensor (see the module doc). The product, not
    torch.tensor(tau): dynamo keeps it symbolic where torch.tensor would specialise on the
    value."""
    if isinstance(tau, Tensor):
        return tau
    return torch.ones((), dtype=torch.float64, device="cpu") * tau


def _op_args(args):
    """`args` with the Python float among them (tau, the only one) as the ops take it."""
    return tuple(_tau_tensor(arg) if isinstance(arg, float) else arg for arg in args)


def _run_backward(direct, op, args, grad, features):
    """A backward direction on the path that fits the caller: `direct` (the backend, no
    dispatch) in plain eager calls, the custom op `op` while anything traces or when
    create_graph=True asks for a differentiable result (the op then says it has no derivative),
    and `direct` inside `_FirstOrderOnly` under torch.func transforms."""
    if _under_transforms():
        return _FirstOrderOnly.apply(direct, *args)
    if _plain_eager(grad, features) and not torch.is_grad_enabled():
        return direct(*args)
    return op(*_op_args(args))


def _check_rows(features, dictionary, row_offset) -> None:
    # Here, where the sizes are concrete (also under torch.compile, where the caller's batch
    # size may be symbolic): every backend's noise counters must stay below 2^63.
    noise.check_rows(row_offset, features.shape[0], dictionary.shape[0], dictionary.shape[2])


def _histogram_forward(features, dictionary, seed, similarity, estimator, tau, row_offset,
                       backend):
    _check_rows(features, dictionary, row_offset)
    with _autocast_off(features.device):
        return backends.load(backend).histogram_forward(
            features, dictionary, similarity, estimator, float(tau), int(seed), row_offset)


def _histogram_backward(grad_histogram, features, dictionary, lse, seed, similarity, estimator,
                        tau, row_offset, backend):
    with _autocast_off(features.device):
        return backends.load(backend).histogram_backward(
            grad_histogram.contiguous(), features, dictionary, lse, similarity, estimator,
            float(tau), int(seed), row_offset)


def _entropy_forward(features, dictionary, seed, similarity, estimator, tau, row_offset, backend,
                     reduction):
    _check_rows(features, dictionary, row_offset)
    module = backends.load(backend)
    with _autocast_off(features.device):
        if hasattr(module, "entropy_forward"):
            return module.entropy_forward(features, dictionary, similarity, estimator,
                                          float(tau), int(seed), row_offset, reduction)
        histogram, lse = module.histogram_forward(features, dictionary, similarity, estimator,
                                                  float(tau), int(seed), row_offset)
        return backends.entropy_bits(histogram, reduction), histogram, lse


def _entropy_backward(grad_entropy, histogram, features, dictionary, lse, seed, similarity,
                      estimator, tau, row_offset, backend, reduction):
    module = backends.load(backend)
    with _autocast_off(features.device):
        if hasattr(module, "entropy_backward"):
            return module.entropy_backward(grad_entropy, histogram, features, dictionary, lse,
                                           similarity, estimator, float(tau), int(seed),
                                           row_offset, reduction)
        grad_histogram = backends.entropy_bits_backward(grad_entropy, histogram, reduction)
        return module.histogram_backward(grad_histogram, features, dictionary, lse, similarity,
                                         estimator, float(tau), int(seed), row_offset)


# ------------------------------------------------------------------------------- the histogram

@torch.library.custom_op("fierce_ext::histogram", mutates_args=())
def histogram_op(features: Tensor, dictionary: Tensor, seed: Tensor, similarity: str,
                 estimator: str, tau: Tensor, row_offset: int, backend: str
                 ) -> tuple[Tensor, Tensor]:
    return _histogram_forward(features, dictionary, seed, similarity, estimator, tau, row_offset,
                              backend)


@histogram_op.register_fake
def _histogram_fake(features, dictionary, seed, similarity, estimator, tau, row_offset, backend):
    dtype = backends.compute_dtype(features.dtype)
    heads, _, bins = dictionary.shape
    return (features.new_empty((heads, bins), dtype=dtype),
            features.new_empty((features.shape[0], heads), dtype=dtype))


@torch.library.custom_op("fierce_ext::histogram_backward", mutates_args=())
def histogram_backward_op(grad_histogram: Tensor, features: Tensor, dictionary: Tensor,
                          lse: Tensor, seed: Tensor, similarity: str, estimator: str, tau: Tensor,
                          row_offset: int, backend: str) -> Tensor:
    return _histogram_backward(grad_histogram, features, dictionary, lse, seed, similarity,
                               estimator, tau, row_offset, backend)


@histogram_backward_op.register_fake
def _histogram_backward_fake(grad_histogram, features, *args):
    return torch.empty_like(features)


def _histogram_setup_context(ctx, inputs, output):
    features, dictionary, seed, similarity, estimator, tau, row_offset, backend = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zeros for lse's gradient (a fill launch per step)
    ctx.save_for_backward(features, dictionary, lse, seed)
    ctx.options = (similarity, estimator, tau, row_offset, backend)


def _histogram_autograd_backward(ctx, grad_histogram, _grad_lse):
    features, dictionary, lse, seed = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0] and grad_histogram is not None:
        # create_graph=True (grad mode on here) goes through the op too: it has no second
        # derivative, and the op's registered autograd (_no_second_derivative) says so when one
        # is asked for, where a direct call would differentiate the backend's code with its
        # saved statistics treated as constants.
        grad_features = _run_backward(
            _histogram_backward, histogram_backward_op,
            (grad_histogram, features, dictionary, lse, seed, *ctx.options), grad_histogram,
            features)
    return grad_features, None, None, None, None, None, None, None


histogram_op.register_autograd(_histogram_autograd_backward,
                               setup_context=_histogram_setup_context)


NO_SECOND_DERIVATIVE = ("fierce_ext's histogram and entropy have no second derivative "
                        "(hessian, grad of grad, a backward through a create_graph=True "
                        "gradient); only their first derivative is implemented")


def _no_second_derivative_setup(ctx, inputs, output):
    pass


def _no_second_derivative(ctx, *grads):
    """The backward ops' own backward: differentiating a gradient of the ops is refused in
    these words, rather than with torch's generic "no autograd formula was registered"."""
    raise NotImplementedError(NO_SECOND_DERIVATIVE)


histogram_backward_op.register_autograd(_no_second_derivative,
                                        setup_context=_no_second_derivative_setup)


class Histogram(torch.autograd.Function):
    """(histogram (C, K), lse (B, C)) of features (B, D) against dictionary (C, D, K),
    differentiable w.r.t. the features; the arguments are those of `histogram_op`. For plain
    eager calls: it runs the backend directly.

    The forward takes `ctx` (no separate setup_context): `apply` then skips binding the
    arguments with inspect.signature, ~0.1 ms per call."""

    @staticmethod
    def forward(ctx, features, dictionary, seed, similarity, estimator, tau, row_offset,
                backend):
        args = (features, dictionary, seed, similarity, estimator, tau, row_offset, backend)
        output = _histogram_forward(*args)
        _histogram_setup_context(ctx, args, output)
        return output

    backward = staticmethod(_histogram_autograd_backward)


def histogram(features: Tensor, dictionary: Tensor, seed: Tensor, similarity: str,
              estimator: str, tau: float, row_offset: int, backend: str
              ) -> tuple[Tensor, Tensor]:
    """`Histogram.apply` in plain eager calls, `HistogramUnderTransforms.apply` under torch.func
    transforms, the custom op while anything traces (arguments checked by the caller, see
    fierce_ext.functional)."""
    args = (features, dictionary, seed, similarity, estimator, tau, row_offset, backend)
    if _under_transforms():
        return HistogramUnderTransforms.apply(*args)
    if _plain_eager(features, dictionary):
        return Histogram.apply(*args)
    return histogram_op(*_op_args(args))


# --------------------------------------------------------------------- the histogram's entropy

@torch.library.custom_op("fierce_ext::entropy", mutates_args=())
def entropy_op(features: Tensor, dictionary: Tensor, seed: Tensor, similarity: str,
               estimator: str, tau: Tensor, row_offset: int, backend: str, reduction: str
               ) -> tuple[Tensor, Tensor, Tensor]:
    return _entropy_forward(features, dictionary, seed, similarity, estimator, tau, row_offset,
                            backend, reduction)


@entropy_op.register_fake
def _entropy_fake(features, dictionary, seed, similarity, estimator, tau, row_offset, backend,
                  reduction):
    histogram, lse = _histogram_fake(features, dictionary, seed, similarity, estimator, tau,
                                     row_offset, backend)
    shape = () if reduction == "mean" else (histogram.shape[0],)
    return histogram.new_empty(shape), histogram, lse


@torch.library.custom_op("fierce_ext::entropy_backward", mutates_args=())
def entropy_backward_op(grad_entropy: Tensor, histogram: Tensor, features: Tensor,
                        dictionary: Tensor, lse: Tensor, seed: Tensor, similarity: str,
                        estimator: str, tau: Tensor, row_offset: int, backend: str,
                        reduction: str) -> Tensor:
    return _entropy_backward(grad_entropy, histogram, features, dictionary, lse, seed,
                             similarity, estimator, tau, row_offset, backend, reduction)


@entropy_backward_op.register_fake
def _entropy_backward_fake(grad_entropy, histogram, features, *args):
    return torch.empty_like(features)


def _entropy_setup_context(ctx, inputs, output):
    features, dictionary, seed, similarity, estimator, tau, row_offset, backend, reduction = inputs
    _, histogram, lse = output
    ctx.mark_non_differentiable(histogram, lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(features, dictionary, histogram, lse, seed)
    ctx.options = (similarity, estimator, tau, row_offset, backend, reduction)


def _entropy_autograd_backward(ctx, grad_entropy, _grad_histogram, _grad_lse):
    features, dictionary, histogram, lse, seed = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0] and grad_entropy is not None:
        grad_features = _run_backward(
            _entropy_backward, entropy_backward_op,
            (grad_entropy, histogram, features, dictionary, lse, seed, *ctx.options),
            grad_entropy, features)
    return grad_features, None, None, None, None, None, None, None, None


entropy_op.register_autograd(_entropy_autograd_backward, setup_context=_entropy_setup_context)
entropy_backward_op.register_autograd(_no_second_derivative,
                                      setup_context=_no_second_derivative_setup)


class Entropy(torch.autograd.Function):
    """(entropy, histogram, lse) of features (B, D) against dictionary (C, D, K): the entropy
    in bits (0-d for reduction "mean", (C,) for "none"), differentiable w.r.t. the features;
    the histogram (C, K) and lse (B, C) are not. Arguments are those of `entropy_op`. For plain
    eager calls: it runs the backend directly."""

    @staticmethod
    def forward(ctx, features, dictionary, seed, similarity, estimator, tau, row_offset,
                backend, reduction):
        args = (features, dictionary, seed, similarity, estimator, tau, row_offset, backend,
                reduction)
        output = _entropy_forward(*args)
        _entropy_setup_context(ctx, args, output)
        return output

    backward = staticmethod(_entropy_autograd_backward)


def entropy(features: Tensor, dictionary: Tensor, seed: Tensor, similarity: str, estimator: str,
            tau: float, row_offset: int, backend: str, reduction: str
            ) -> tuple[Tensor, Tensor, Tensor]:
    """`Entropy.apply` in plain eager calls, `EntropyUnderTransforms.apply` under torch.func
    transforms, the custom op while anything traces (arguments checked by the caller, see
    fierce_ext.functional)."""
    args = (features, dictionary, seed, similarity, estimator, tau, row_offset, backend,
            reduction)
    if _under_transforms():
        return EntropyUnderTransforms.apply(*args)
    if _plain_eager(features, dictionary):
        return Entropy.apply(*args)
    return entropy_op(*_op_args(args))


# ----------------------------------------------------------------- under torch.func transforms

def _vmap_by_loop(function, info, in_dims, args):
    """A vmap rule: `function.apply` once per index of the mapped dimension, outputs stacked
    along dim 0. The histogram is a statistic of a whole batch, so mapped calls are separate
    problems (an ensemble's features, several batches); each draws the noise of its own seed
    argument, which is the same for all unless the seed itself is mapped."""
    outputs = []
    for index in range(info.batch_size):
        sliced = [arg if dim is None else arg.select(dim, index) for arg, dim in zip(args, in_dims)]
        outputs.append(function.apply(*sliced))
    if isinstance(outputs[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*outputs)), (0,) * len(outputs[0])
    return torch.stack(outputs), 0


class _FirstOrderOnly(torch.autograd.Function):
    """`fn(*args)`: a backward direction run directly by a torch.func transform; differentiating
    its result raises, since the ops have no second derivative."""

    @staticmethod
    def forward(fn, *args):
        return fn(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(NO_SECOND_DERIVATIVE)  # a RuntimeError, as before

    @staticmethod
    def vmap(info, in_dims, fn, *args):
        return _vmap_by_loop(_FirstOrderOnly, info, in_dims, (fn, *args))


def _no_forward_mode(ctx, *tangents):
    raise NotImplementedError("fierce_ext's histogram and entropy have no forward-mode derivative "
                              "(torch.func.jvp, jacfwd, hessian); use reverse mode (grad, vjp, "
                              "jacrev)")


def _function_under_transforms(name, forward, setup_context, backward):
    """An autograd.Function of the three parts in the form torch.func transforms accept (new
    style, see the module doc): vmap by loop, forward mode raising."""
    def vmap(info, in_dims, *args):
        return _vmap_by_loop(function, info, in_dims, args)

    function = type(name, (torch.autograd.Function,), {
        "__doc__": f"{name.removesuffix('UnderTransforms')} under torch.func transforms.",
        "forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
        "backward": staticmethod(backward), "jvp": staticmethod(_no_forward_mode),
        "vmap": staticmethod(vmap)})
    return function


HistogramUnderTransforms = _function_under_transforms(
    "HistogramUnderTransforms", _histogram_forward, _histogram_setup_context,
    _histogram_autograd_backward)
EntropyUnderTransforms = _function_under_transforms(
    "EntropyUnderTransforms", _entropy_forward, _entropy_setup_context,
    _entropy_autograd_backward)
