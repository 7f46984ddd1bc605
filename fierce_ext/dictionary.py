"""Dictionaries (the fixed bins features are softly assigned to) and their per-similarity form.

A dictionary W has shape (C, D, K): C heads, each with K bins (dictionary atoms) in D dimensions.
Every similarity is `a_b * (r_b . v_hk) + c_hk` up to a per-row constant that the softmax over
bins ignores, which is what lets every fast backend run one GEMM with a row scale and a column bias:

    dot:       a_b = 1          v = w            c = 0
    cosine:    a_b = 1 / |r_b|  v = w / |w|      c = 0
    distance:  a_b = 1          v = 2 w          c = -|w|^2     (-|r_b - w|^2 + |r_b|^2)
"""

from __future__ import annotations

import collections
import math
import threading
import weakref

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ._arguments import as_int, as_real
from .noise import SEED_LIMIT

SIMILARITIES = ("dot", "cosine", "distance")

# Norms below this are treated as this (a zero feature row or atom has no direction; its
# cosine similarities become 0 instead of NaN). Values and gradients are exactly those of
# F.normalize(r, dim=1, eps=1e-12) @ (w / |w|): a zero feature row gets the finite but huge
# gradient (1 / 1e-12) sum_hk delta[b,h,k] v_hk, about 1e12 times an ordinary row's scale (not
# torch.nn.functional.cosine_similarity's, whose eps is 1e-8 and divides differently).
NORM_EPS = 1e-12


def uniform_dictionary(dim: int, bins: int = 100, heads: int = 1, low: float = -1.0,
                       high: float = 1.0, seed: int | None = 0, device=None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (heads, dim, bins) dictionary drawn uniformly on [low, high), reproducibly from `seed`.

    The paper draws it on [-1, 1] (few-shot) or [0, 1) (hyperspectral) and never trains it.
    The draw happens on the CPU (u uniform in float32, then low (1 - u) + high u in float64,
    which cannot overflow, rounded once to `dtype`), so the same seed gives the same atoms on
    every device (also under torch.set_default_device); `device=None` means torch's default
    device. `seed` is an int in [0, 2**63), as for `entropy`, or None (a seed from torch's
    default generator); `low` and `high` must be finite and distinct in `dtype`.
    """
    dim, bins, heads = (_positive_int("dim", dim), _positive_int("bins", bins),
                        _positive_int("heads", heads))
    low, high = _bounds(low, high)
    dtype = _target_dtype(dtype)
    _check_representable(low, high, dtype)
    if seed is not None:
        seed = as_int("seed", seed, "an int or None")
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63) or None, got {seed}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch._C._DisableFuncTorch():  # a function of `seed`: never mapped by torch.func.vmap
        u = torch.rand(heads, dim, bins, generator=generator, dtype=torch.float32,
                       device="cpu").double()  # exact
    # low (1 - u) + high u rather than low + (high - low) u, whose high - low can overflow.
    # (Both exact for the usual [-1, 1) and [0, 1).)
    atoms = u.mul(high).add_((1 - u).mul_(low))
    return _placed(atoms, device, dtype)


def bin_dictionary(bins: int, low: float, high: float, heads: int = 1, device=None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """(heads, 1, bins) evenly spaced bin centres from `low` to `high` inclusive.

    For one-dimensional features with similarity="distance": the age experiment uses
    bin_dictionary(100, 1, 100), i.e. centres at 1, 2, ..., 100.
    """
    bins, heads = _positive_int("bins", bins), _positive_int("heads", heads)
    low, high = _bounds(low, high, ordered=bins > 1)  # one bin sits at `low`
    dtype = _target_dtype(dtype)
    _check_representable(low, high, dtype, distinct=bins > 1)
    if math.isinf(high - low):  # linspace's step would overflow: halve (exact), then double
        centres = torch.linspace(low / 2, high / 2, bins, dtype=torch.float64, device="cpu") * 2
    else:
        centres = torch.linspace(low, high, bins, dtype=torch.float64, device="cpu")
    centres = centres.view(1, 1, bins).expand(heads, 1, bins).contiguous()
    return _placed(centres, device, dtype)


def _target_dtype(dtype) -> torch.dtype:
    """The dtype a dictionary is made in: `dtype`, or torch's default for None."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    return dtype or torch.get_default_dtype()


def _check_representable(low: float, high: float, dtype: torch.dtype,
                         distinct: bool = True) -> None:
    """ValueError naming `low` / `high` when one rounds to Inf in `dtype`, or (`distinct`) when
    both round to the same value, which would make every atom that one value."""
    with _disable_current_modes():  # real numbers even under FakeTensorMode
        rounded = torch.tensor([low, high], dtype=torch.float64, device="cpu").to(dtype).tolist()
    for name, value, kept in (("low", low, rounded[0]), ("high", high, rounded[1])):
        if not math.isfinite(kept):
            raise ValueError(f"{name}={value} is not representable in {dtype} (largest finite "
                             f"value {torch.finfo(dtype).max})")
    if distinct and rounded[0] == rounded[1]:
        raise ValueError(f"low={low} and high={high} round to the same {dtype} value "
                         f"{rounded[0]}: widen the range or use a wider dtype")


def _placed(values: torch.Tensor, device, dtype: torch.dtype) -> torch.Tensor:
    """CPU `values` copied into a new tensor allocated as a torch factory would (device=None:
    torch's default device, torch.set_default_device included)."""
    out = torch.empty(values.shape, dtype=dtype, device=device)
    return out.copy_(values)


def vector_norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The 2-norm over `dim` (kept as a size-1 dim) without overflow: torch's norm squares the
    entries in x's dtype, so a float32 row whose norm exceeds ~1.8e19 (sqrt of float32's max)
    would get an Inf norm and, for cosine, zero similarities (a uniform histogram). Where the
    plain norm overflows, the entries are divided by their largest magnitude first; elsewhere
    the plain norm is kept bit for bit. (Underflow needs no care: it only affects norms far
    below NORM_EPS, which the callers clamp.) On a CPU the rescaled norm is computed only when
    needed (a check that costs a few microseconds where the rescaling would cost 3-6x the norm);
    elsewhere always, since the check would synchronise with the device."""
    norm = x.norm(dim=dim, keepdim=True)
    if x.device.type == "cpu" and not bool(torch.isinf(norm).any()):
        return norm
    peak = x.abs().amax(dim=dim, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))  # no 0 / 0 in the unused branch
    scaled = (x / peak).norm(dim=dim, keepdim=True) * peak
    return torch.where(torch.isinf(norm), scaled, norm)  # an Inf entry: NaN, as its cosines


def project_dictionary(dictionary: torch.Tensor, similarity: str,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(v, c): v of shape (C, D, K) in `dtype` and the bias c (C, K) in `dtype`, or None if 0."""
    w = dictionary.to(dtype)
    if similarity == "dot":
        return w, None
    if similarity == "cosine":
        return w / vector_norm(w, 1).clamp_min(NORM_EPS), None
    if similarity == "distance":
        return 2 * w, -(w * w).sum(dim=1)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def row_scale(features: torch.Tensor, similarity: str) -> torch.Tensor | None:
    """a_b of shape (B, 1) for cosine (1 / |r_b|, |r_b| computed without overflow), None (all
    ones) otherwise."""
    if similarity != "cosine":
        return None
    return 1.0 / vector_norm(features, 1).clamp_min(NORM_EPS)


def storage_state(tensor: torch.Tensor) -> tuple:
    """What a memo of values derived from `tensor` must match: storage pointer, version counter
    (bumped by every in-place change autograd sees), layout, dtype and device. Not for
    inference tensors, which have no version counter."""
    return (tensor.data_ptr(), tensor._version, tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype, tensor.device)


# Kernel-ready forms of dictionaries (projected, transposed, padded, cast), see `derived`.
DERIVED_CACHE_SIZE = 16
_derived: collections.OrderedDict = collections.OrderedDict()
_derived_lock = threading.Lock()


def derived(dictionary: torch.Tensor, key, build):
    """build(), memoised per (dictionary tensor, its version counter, key).

    Backends turn the fixed dictionary into the form their kernels read (project_dictionary,
    transposed, padded, cast); a training loop passes the same buffer at every step, so each
    form is built once. A weak reference (a cached form never keeps a dictionary alive), the
    version counter (bumped by every in-place change autograd sees) and the storage pointer make
    a freed, replaced or modified dictionary miss. In-place changes made through `.data` bypass
    the version counter and are not seen. Inference tensors have no version counter: their
    forms are rebuilt at every call.
    """
    if dictionary.is_inference():
        return build()
    slot = (id(dictionary), key)
    state = storage_state(dictionary)
    with _derived_lock:
        entry = _derived.get(slot)
        if entry is not None and entry[0]() is dictionary and entry[1] == state:
            _derived.move_to_end(slot)
            return entry[2]
    value = build()
    with _derived_lock:
        _derived[slot] = (weakref.ref(dictionary), state, value)
        _derived.move_to_end(slot)
        while len(_derived) > DERIVED_CACHE_SIZE:
            _derived.popitem(last=False)
    return value


def _bounds(low, high, ordered: bool = True) -> tuple[float, float]:
    low, high = as_real("low", low), as_real("high", high)
    for name, value in (("low", low), ("high", high)):
        if not -math.inf < value < math.inf:
            raise ValueError(f"{name} must be finite, got {value}")
    if ordered and not low < high:
        raise ValueError(f"low must be < high, got low={low}, high={high}")
    return low, high


def _positive_int(name: str, value) -> int:
    value = as_int(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value
