"""The public functions: `histogram`, `entropy` and `histogram_entropy`.

    s[b,h,k] = similarity(r_b, w_hk)                    dot, cosine or distance
    z[b,h,k] = (s[b,h,k] + g[b,h,k]) / tau              g: Gumbel noise (0 for "softmax")
    p[h,k]   = mean_b e[b,h,k]                          e: one-hot argmax_k z ("gumbel_hard")
                                                           or softmax_k z (otherwise)
    H        = -(1/C) sum_hk p[h,k] log2(p[h,k] + eps)  bits, 0 <= H <= log2 K

"gumbel_hard" is the paper's estimator: a hard histogram in the forward and the gradient of the
soft one (straight-through). NaN or Inf in the features make the histogram and the entropy NaN.

In training loops: the functions trace under `torch.compile(..., fullgraph=True)` (the backends
run inside torch.library custom ops, see ops.py); float16/bfloat16 features (torch.autocast)
compute in float32 and give a float32 result; `sync=True` / `process_group=` compute the
histogram of the global batch across torch.distributed processes (see distributed.py).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_scalar
from torch.utils._python_dispatch import _disable_current_modes

from . import backends, distributed
from ._arguments import as_int, as_real, check_floating_tensor
from .dictionary import SIMILARITIES, uniform_dictionary
from .noise import COUNTER_LIMIT, SEED_LIMIT, draw_seed
from . import ops

ESTIMATORS = ("gumbel_hard", "gumbel_soft", "softmax")
DEFAULT_BINS, DEFAULT_HEADS = 100, 1  # the default dictionary's size (the paper's K = 100)
REDUCTIONS = ("mean", "none")

ENTROPY_EPS = backends.ENTROPY_EPS  # the paper's guard inside the logarithm



def _dynamo_traces_guard_scalar() -> bool:
    """Whether torch.compile can trace `guard_scalar` (dynamo has had a rule for it since torch
    2.8; before, it refuses the call even on a plain int, so every compiled call with the default
    dictionary failed). Read from dynamo's own table rather than guessed from the version."""
    try:
        from torch._dynamo import trace_rules
    except ImportError:  # a torch without dynamo: nothing is compiled
        return False
    rules = getattr(trace_rules, "manual_torch_name_rule_map", {})
    return "torch.fx.experimental.symbolic_shapes.guard_scalar" in rules


_GUARD_SCALAR_TRACES = _dynamo_traces_guard_scalar()


def histogram(features: Tensor, dictionary: Tensor, *, similarity: str = "cosine",
              estimator: str = "gumbel_hard", tau: float = 1.0, seed: int | None = None,
              backend: str = "auto", row_offset: int = 0, sync: bool = False,
              process_group=None) -> Tensor:
    """The batch histogram p (C, K) of `features` (B, D) softly binned against `dictionary`
    (C, D, K); each row sums to 1. Differentiable w.r.t. `features`.

    `row_offset` is the global index of the first row (for noise that does not depend on how a
    batch is split across processes); the noise counters of rows row_offset .. row_offset + B - 1
    must stay below 2^63, so row_offset + B is at most 2^63 / (C ceil(K / 4)) (ValueError beyond;
    fierce_ext/noise.py). Float64 features compute in float64, others in float32:
    float16/bfloat16 features (e.g. under torch.autocast) give a float32 histogram and a
    gradient in their own dtype.

    `sync=True` (or a `process_group`) makes p the histogram of the global batch across the
    processes of the torch.distributed group (default: the world), with noise and gradients those
    of one process holding the concatenated batch (`row_offset` is then added to this rank's
    global offset); see `fierce_ext.distributed`. Without an initialised process group it is
    the single-process histogram.
    """
    _check_features(features, empty_ok=distributed.may_sync(sync, process_group))
    _check_dictionary(dictionary, features)
    return _checked_histogram(features, dictionary, similarity, estimator, tau, seed, backend,
                              row_offset, sync, process_group)


def _checked_histogram(features, dictionary, similarity, estimator, tau, seed, backend,
                       row_offset, sync, process_group) -> Tensor:
    """`histogram` once features and dictionary are known to be valid."""
    tau, row_offset, name, seed_tensor, group = _checked_options(
        features, similarity, estimator, tau, seed, backend, row_offset, sync, process_group)
    if group is not None:
        return distributed.global_histogram(features, dictionary, seed_tensor, similarity,
                                            estimator, tau, row_offset, name, group)
    hist, _ = ops.histogram(features, dictionary, seed_tensor, similarity, estimator, tau,
                            row_offset, name)
    return hist


def _checked_options(features, similarity, estimator, tau, seed, backend, row_offset, sync,
                     process_group):
    """The checked options of a call: (tau, row_offset, backend name, seed tensor, process group
    or None)."""
    _check_choice("similarity", similarity, SIMILARITIES)
    _check_choice("estimator", estimator, ESTIMATORS)
    tau = _check_tau(tau)
    row_offset = as_int("row_offset", row_offset, "a non-negative int")
    if not 0 <= row_offset < COUNTER_LIMIT:  # (row_offset + B) * C * ceil(K / 4): see ops.py
        raise ValueError(f"row_offset must be a non-negative int below 2**63, got {row_offset!r}")
    _check_backend(backend)
    group = _sync_group(sync, process_group)
    return (tau, row_offset, _resolve_backend(backend, features.device),
            _seed_tensor(seed, estimator), group)


def histogram_entropy(histogram: Tensor, reduction: str = "mean") -> Tensor:
    """Entropy in bits of each row of a (C, K) histogram, averaged over rows for "mean".

    Like `entropy`: float32 for a float16/bfloat16/float32 histogram (half histograms compute in
    float32), float64 for a float64 one; the histogram's gradient keeps its dtype."""
    _check_choice("reduction", reduction, REDUCTIONS)
    check_floating_tensor("histogram", histogram, ("heads", "bins"))
    return backends.entropy_bits(histogram, reduction)


def entropy(features: Tensor, dictionary: Tensor | None = None, *, bins: int | None = None,
            heads: int | None = None, similarity: str = "cosine", estimator: str = "gumbel_hard",
            tau: float = 1.0, seed: int | None = None, reduction: str = "mean",
            backend: str = "auto", sync: bool = False, process_group=None) -> Tensor:
    """The FIERCE feature entropy of a batch, in bits; training subtracts lambda times it.

    With `dictionary=None`, a cached `uniform_dictionary(D, bins, heads, seed=0)` on the
    features' device is used (bins 100 and heads 1 unless given). A given dictionary fixes them:
    leave them out, or they must match it.
    Returns a 0-d tensor (reduction="mean") or one value per head (reduction="none"), in
    float32 (float64 for float64 features), also for float16/bfloat16 features and under
    torch.autocast (the op computes in float32; the feature gradient keeps the features' dtype).

    `sync=True` / `process_group=`: the entropy of the histogram of the global batch across a
    torch.distributed group (SyncBatchNorm-style gradients; see `fierce_ext.distributed`).
    Without an initialised process group this is the single-process entropy.

    Works inside `torch.compile(..., fullgraph=True)` (seed=None draws the seed in the graph);
    the distributed path runs eagerly (a graph break).
    """
    _check_features(features, empty_ok=distributed.may_sync(sync, process_group))
    _check_choice("reduction", reduction, REDUCTIONS)
    if dictionary is None:
        # Valid by construction (and a traced constant under torch.compile, whose attributes
        # such as requires_grad dynamo cannot read): skip the dictionary checks.
        # (Plain ints before the cache, whose keys would take 100.0 for 100.)
        dictionary = default_dictionary(
            features.shape[1], DEFAULT_BINS if bins is None else as_int("bins", bins),
            DEFAULT_HEADS if heads is None else as_int("heads", heads), features.device,
            features.dtype == torch.float64)
    else:
        _check_dictionary(dictionary, features)
        _check_dictionary_size(dictionary, bins, heads)
    tau, _, name, seed_tensor, group = _checked_options(
        features, similarity, estimator, tau, seed, backend, 0, sync, process_group)
    if group is not None:
        hist = distributed.global_histogram(features, dictionary, seed_tensor, similarity,
                                            estimator, tau, 0, name, group)
        return backends.entropy_bits(hist, reduction)
    # One op for histogram and entropy: a backend may fuse them (see fierce_ext.ops).
    value, _, _ = ops.entropy(features, dictionary, seed_tensor, similarity, estimator, tau, 0,
                              name, reduction)
    return value


def default_dictionary(dim: int, bins: int, heads: int, device: torch.device,
                       float64: bool = False) -> Tensor:
    """The dictionary `entropy` uses when none is given: uniform on [-1, 1), seed 0, cached."""
    # Under torch.compile `dim` may be symbolic (dynamic=True, or automatically once a second
    # feature dimension was seen); the dictionary is a constant of the graph, so specialise on
    # it (a guard, a recompile for a new D). Dynamo takes a symbolic dim for an int, so no
    # isinstance test can tell them apart; dynamo before torch 2.8 cannot trace guard_scalar,
    # and there a dynamic D stays unsupported. (Outside dynamo it always runs: make_fx's
    # symbolic tracing passes a SymInt.)
    if _GUARD_SCALAR_TRACES or not torch.compiler.is_compiling():
        dim = int(guard_scalar(dim))
    dictionary = _constant_dictionary(dim, bins, heads, torch.device(device), float64)
    if torch.compiler.is_compiling():
        # torch 2.8's dynamo gives the constant a size symbol of its own under dynamic=True or
        # once D has changed, a symbol the autograd.Function's subgraph then cannot lift
        # ("Source of 's7' is None"); a view with the guarded sizes pins them. (Eager calls keep
        # the cached tensor itself: backends memoise its projected forms by identity.)
        dictionary = dictionary.view(heads, dim, bins)
    elif torch._C._len_torch_dispatch_stack():
        # Under a dispatch mode (FakeTensorMode, make_fx) the cached tensor is a real tensor the
        # mode has not seen, which fake tensors refuse; lift_fresh_copy is how a constant made
        # by torch.tensor(...) enters such a mode (a fake copy, a traced constant).
        dictionary = torch.ops.aten.lift_fresh_copy.default(dictionary)
    return dictionary


@torch.compiler.assume_constant_result
def _constant_dictionary(dim, bins, heads, device, float64):
    # torch.compile runs this at trace time and bakes the result into the graph: the dictionary
    # is drawn with a torch.Generator, which dynamo cannot trace, and an lru_cache is not traced
    # as a cache. Eager calls just hit the cache.
    return _cached_dictionary(dim, bins, heads, device, float64)


@functools.lru_cache(maxsize=32)
def _cached_dictionary(dim, bins, heads, device, float64):
    # Made as a plain tensor whatever is active, since it is cached for every later call: under
    # a torch.func transform it would belong to the transform's level (and escape it), under a
    # dispatch mode (the fake tensors of torch.export) it would be fake, and under
    # torch.inference_mode an inference tensor, which autograd refuses to save for a backward.
    with (torch._C._DisableFuncTorch(), _disable_current_modes(),
          torch.inference_mode(False)):
        return uniform_dictionary(dim, bins, heads, seed=0, device=device,
                                  dtype=torch.float64 if float64 else torch.float32)


@torch.compiler.assume_constant_result
def _resolve_backend(name: str, device: torch.device) -> str:
    # Resolved once at trace time under torch.compile (it imports modules and probes devices).
    return backends.resolve(name, device)


def _sync_group(sync, process_group):
    """The process group to synchronise over, or None for a single process."""
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
    if not sync and process_group is None:
        return None
    return distributed.active_group(process_group)


# ---------------------------------------------------------------------------- argument checks

def _check_features(features, empty_ok: bool = False) -> None:
    """`empty_ok`: a synchronised call, where a rank's empty batch is a share of the global one
    (fierce_ext.distributed refuses an empty global batch on every rank)."""
    check_floating_tensor("features", features, ("batch", "dim"))
    if features.shape[0] == 0 and not empty_ok:
        raise ValueError("features must hold at least one row (batch size 0)")
    if features.shape[1] == 0:
        raise ValueError("features must have at least one column (dim 0)")


def _check_dictionary(dictionary, features: Tensor) -> None:
    _check_dictionary_shape(dictionary, features.shape[1], "features dim")
    if dictionary.device != features.device:
        raise ValueError(f"dictionary is on {dictionary.device} but features are on "
                         f"{features.device}; move them to the same device")
    if dictionary.requires_grad:
        raise ValueError("dictionary requires grad, but FIERCE keeps it fixed; pass "
                         "dictionary.detach() (or register it as a buffer)")


def _check_dictionary_shape(dictionary, dim: int, what: str) -> None:
    """A dense floating (heads, dim, bins) tensor with heads, bins >= 1 and the given dim (`what`
    names where that dim comes from); shared by the functions and FeatureEntropy's constructor."""
    check_floating_tensor("dictionary", dictionary, ("heads", "dim", "bins"))
    if dictionary.shape[1] != dim:
        raise ValueError(f"dictionary dim {dictionary.shape[1]} (shape {tuple(dictionary.shape)}) "
                         f"does not match {what} {dim}")
    if dictionary.shape[0] < 1 or dictionary.shape[2] < 1:
        raise ValueError(f"dictionary needs heads >= 1 and bins >= 1, got shape "
                         f"{tuple(dictionary.shape)}")


def _check_dictionary_size(dictionary: Tensor, bins: int | None, heads: int | None) -> None:
    """A given dictionary (heads, dim, bins) fixes bins and heads: an explicit value must agree."""
    for name, value, size in (("heads", heads, dictionary.shape[0]),
                              ("bins", bins, dictionary.shape[2])):
        if value is not None and as_int(name, value) != size:
            raise ValueError(f"{name}={value!r} does not match the dictionary's {size} {name} "
                             f"(shape {tuple(dictionary.shape)}); leave {name} out when passing "
                             f"a dictionary")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_backend(backend) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in backends.BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {backends.BACKENDS}, got {backend!r}")


def _check_tau(tau) -> float:
    tau = as_real("tau", tau)
    if not 0 < tau < math.inf:  # also false for NaN; comparisons (not math.isfinite) trace
        raise ValueError(f"tau must be finite and > 0, got {tau}")
    return tau


def _seed_tensor(seed, estimator: str) -> Tensor:
    if seed is None:
        if estimator == "softmax":  # no noise: torch's generator is left as it was
            return torch.tensor(0, dtype=torch.int64)
        return draw_seed()  # a tensor: no .item() in a compiled graph
    seed = as_int("seed", seed, "an int or None")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64)
