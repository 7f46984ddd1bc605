"""For tests/gpu/dry_run.py only: the `cuda` backend's compiled ops on the CPU.

Defines the four `fierce_ext::cuda_*` ops with csrc/fierce_ops.cpp's schemas (a CPU build of
fierce_ext._C has none of them) and registers CPU kernels that run the CUDA kernels' own source
in the emulator (tests/cuda_emulator.py), with the host logic of fierce_ops.cpp restated: row-tile
groups per head for a 132-SM card (an H100/H200), the one-launch rule of fierce.h, the
workspaces. Then it makes fierce_ext.backends.cuda use them (its fakes as for the real ops).
Importing it is enough; it refuses to run next to a real build of the ops.
"""

from __future__ import annotations

import ctypes

import torch

import cuda_emulator
from fierce_ext.backends import cuda as cuda_backend

SMS = 132              # the H100/H200 SXM: fixes the row-tile groups, hence the summation order
TILE_ROWS, TILE_DIM, TILE_BINS = 32, 128, 128  # kTileRows / kTileDim / kTileBins of fierce.h
ONE_LAUNCH_ENTRIES = 8192                      # kOneLaunchEntries
ESTIMATORS = {"gumbel_hard": 0, "gumbel_soft": 1, "softmax": 2}
SCHEMAS = {
    "cuda_histogram_forward": "(Tensor features, Tensor vt, Tensor? bias, str similarity, "
    "str estimator, float tau, int seed, int row_offset, bool allow_tf32) -> (Tensor, Tensor)",
    "cuda_histogram_backward": "(Tensor grad_histogram, Tensor features, Tensor vt, "
    "Tensor? bias, Tensor lse, str similarity, str estimator, float tau, int seed, "
    "int row_offset, bool allow_tf32) -> Tensor",
    "cuda_entropy_forward": "(Tensor features, Tensor vt, Tensor? bias, str similarity, "
    "str estimator, float tau, int seed, int row_offset, bool allow_tf32, bool mean) -> "
    "(Tensor, Tensor, Tensor)",
    "cuda_entropy_backward": "(Tensor grad_entropy, Tensor histogram, Tensor features, "
    "Tensor vt, Tensor? bias, Tensor lse, str similarity, str estimator, float tau, int seed, "
    "int row_offset, bool allow_tf32, bool mean) -> Tensor",
}

if hasattr(torch.ops.fierce_ext, "cuda_histogram_forward"):
    raise RuntimeError("the compiled cuda ops are loaded: the dry run needs a CPU-only build")

_LIB = cuda_emulator.build()
_LIBRARY = torch.library.Library("fierce_ext", "FRAGMENT")


def _ptr(tensor):
    return None if tensor is None else ctypes.c_void_p(tensor.data_ptr())


def _mode(dtype, allow_tf32):  # GemmMode of fierce.h
    return {torch.float16: 0, torch.bfloat16: 1, torch.float64: 4}.get(dtype,
                                                                       2 if allow_tf32 else 3)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(features, vt, bias, similarity, estimator, tau, seed, row_offset, allow_tf32,
             entropy=None, mean=False):
    r = features.contiguous()
    rows, dim = r.shape
    heads, bins, _ = vt.shape
    acc = _acc(r.dtype)
    groups = max(1, min(-(-rows // TILE_ROWS), -(-4 * SMS // heads)))
    histogram = torch.empty(heads, bins, dtype=acc)
    lse = torch.empty(rows, heads, dtype=acc)
    partials = torch.empty(groups, heads, bins,
                           dtype=torch.int32 if estimator == "gumbel_hard" else acc)
    flags = torch.empty(groups, heads, dtype=torch.int32)
    counter = (torch.zeros(1, dtype=torch.int32)
               if groups * heads * bins <= ONE_LAUNCH_ENTRIES else None)
    error = _LIB.fierce_emu_forward(
        _mode(r.dtype, allow_tf32), _ptr(r), _ptr(vt.contiguous()), _ptr(bias), _ptr(histogram),
        _ptr(lse), _ptr(partials), _ptr(flags), rows, dim, heads, bins, groups,
        int(similarity == "cosine"), ESTIMATORS[estimator], tau, seed, row_offset, _ptr(counter),
        _ptr(entropy), int(mean))
    assert error == 0, f"emulated forward failed ({error})"
    return histogram, lse


def _backward(grad_histogram, grad_entropy, histogram, features, vt, bias, lse, similarity,
              estimator, tau, seed, row_offset, allow_tf32, mean):
    r = features.contiguous()
    rows, dim = r.shape
    heads, bins, _ = vt.shape
    acc = _acc(r.dtype)
    inputs = [None if t is None else t.to(acc).contiguous()
              for t in (grad_histogram, grad_entropy, histogram, lse)]
    expected = torch.empty(rows, heads, 2, dtype=acc) if bins > TILE_BINS else None
    padded = (-(-rows // TILE_ROWS) * TILE_ROWS, -(-dim // TILE_DIM) * TILE_DIM)
    grad = torch.empty(rows, dim, dtype=r.dtype)
    # Whole tiles in the compute dtype: the gradient is its own accumulator.
    in_place = r.dtype == acc and padded == (rows, dim)
    accumulator = grad if in_place else torch.empty(padded, dtype=acc)
    error = _LIB.fierce_emu_backward(
        _mode(r.dtype, allow_tf32), _ptr(inputs[0]), _ptr(r), _ptr(vt.contiguous()), _ptr(bias),
        _ptr(inputs[3]), _ptr(expected), _ptr(accumulator), _ptr(grad), rows, dim, heads, bins,
        int(similarity == "cosine"), ESTIMATORS[estimator], tau, seed, row_offset,
        _ptr(inputs[1]), _ptr(inputs[2]), int(mean))
    assert error == 0, f"emulated backward failed ({error})"
    return grad


def _histogram_forward(*args):
    return _forward(*args)


def _histogram_backward(grad_histogram, features, vt, bias, lse, *options):
    return _backward(grad_histogram, None, None, features, vt, bias, lse, *options, False)


def _entropy_forward(features, vt, bias, similarity, estimator, tau, seed, row_offset,
                     allow_tf32, mean):
    entropy = torch.empty(() if mean else (vt.shape[0],), dtype=_acc(features.dtype))
    histogram, lse = _forward(features, vt, bias, similarity, estimator, tau, seed, row_offset,
                              allow_tf32, entropy, mean)
    return entropy, histogram, lse


def _entropy_backward(grad_entropy, histogram, features, vt, bias, lse, *options):
    return _backward(None, grad_entropy, histogram, features, vt, bias, lse, *options)


for _name, _kernel in [("cuda_histogram_forward", _histogram_forward),
                       ("cuda_histogram_backward", _histogram_backward),
                       ("cuda_entropy_forward", _entropy_forward),
                       ("cuda_entropy_backward", _entropy_backward)]:
    _LIBRARY.define(_name + SCHEMAS[_name])
    _LIBRARY.impl(_name, _kernel, "CPU")

# The backend as on a GPU: its fakes registered, "available" on the CPU that stands in for it.
cuda_backend._load = lambda: None
cuda_backend._register_fakes()
cuda_backend.unavailable_reason = lambda device: None
