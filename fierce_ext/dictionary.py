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

from ._arguments import as_int, as_real

SIMILARITIES = ("dot", "cosine", "distance")

# Norms below this are treated as this (a zero feature row or atom has no direction; its
# cosine similarities become 0 instead of NaN, like torch.nn.functional.cosine_similarity).
NORM_EPS = 1e-12


def uniform_dictionary(dim: int, bins: int = 100, heads: int = 1, low: float = -1.0,
                       high: float = 1.0, seed: int | None = 0, device=None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """A (heads, dim, bins) dictionary drawn uniformly on [low, high), reproducibly from `seed`.

    The paper draws it on [-1, 1] (few-shot) or [0, 1) (hyperspectral) and never trains it.
    The draw happens on the CPU in float32, so the same seed gives the same atoms on every device
    (also under torch.set_default_device); `device=None` means torch's default device.
    """
    dim, bins, heads = (_positive_int("dim", dim), _positive_int("bins", bins),
                        _positive_int("heads", heads))
    low, high = _bounds(low, high)
    if seed is not None:
        seed = as_int("seed", seed, "an int or None")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch._C._DisableFuncTorch():  # a function of `seed`: never mapped by torch.func.vmap
        atoms = torch.rand(heads, dim, bins, generator=generator, dtype=torch.float32,
                           device="cpu")
    atoms = low + (high - low) * atoms
    return _placed(atoms, device, dtype)


def bin_dictionary(bins: int, low: float, high: float, heads: int = 1, device=None,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """(heads, 1, bins) evenly spaced bin centres from `low` to `high` inclusive.

    For one-dimensional features with similarity="distance": the age experiment uses
    bin_dictionary(100, 1, 100), i.e. centres at 1, 2, ..., 100.
    """
    bins, heads = _positive_int("bins", bins), _positive_int("heads", heads)
    low, high = _bounds(low, high, ordered=bins > 1)  # one bin sits at `low`
    centres = torch.linspace(low, high, bins, dtype=torch.float64, device="cpu")
    centres = centres.view(1, 1, bins).expand(heads, 1, bins).contiguous()
    return _placed(centres, device, dtype)


def _placed(values: torch.Tensor, device, dtype) -> torch.Tensor:
    """CPU `values` copied into a new tensor allocated as a torch factory would (device=None and
    dtype=None: torch's defaults, torch.set_default_device included)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    out = torch.empty(values.shape, dtype=dtype or torch.get_default_dtype(), device=device)
    return out.copy_(values)


def project_dictionary(dictionary: torch.Tensor, similarity: str,
                       dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(v, c): v of shape (C, D, K) in `dtype` and the bias c (C, K) in `dtype`, or None if 0."""
    w = dictionary.to(dtype)
    if similarity == "dot":
        return w, None
    if similarity == "cosine":
        return w / w.norm(dim=1, keepdim=True).clamp_min(NORM_EPS), None
    if similarity == "distance":
        return 2 * w, -(w * w).sum(dim=1)
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")


def row_scale(features: torch.Tensor, similarity: str) -> torch.Tensor | None:
    """a_b of shape (B, 1) for cosine (1 / |r_b|), None (all ones) otherwise."""
    if similarity != "cosine":
        return None
    return 1.0 / features.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)


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
