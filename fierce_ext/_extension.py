"""The compiled extension fierce_ext._C (csrc/), imported once, on first use.

It registers its ops in torch.ops.fierce_ext: the CPU noise op `philox_uniform_` (noise.py) in
every build, the `cuda` backend's ops when it was built with CUDA. A missing or broken
extension never breaks `import fierce_ext`: `load()` says why, and the callers fall back (the
noise to numpy) or report the reason (the cuda backend).
"""

from __future__ import annotations

import importlib
import importlib.util
import threading

import torch

BUILD_HINT = ("build it with `pip install --no-build-isolation .` against the torch you run "
              "(in a checkout whose scripts import it: `pip install --no-build-isolation -e .`; "
              "for the CUDA kernels: a CUDA build of torch, nvcc (CUDA_HOME) available, and "
              "FIERCE_EXT_BUILD_CUDA=1 to make a failed build an error)")

_lock = threading.Lock()
_loaded = False
_error: str | None = None


def load() -> str | None:
    """Import fierce_ext._C once; None when it is imported, else why not."""
    global _loaded, _error
    with _lock:
        if _loaded or _error is not None:
            return _error
        try:
            spec = importlib.util.find_spec("fierce_ext._C")
        except (ImportError, ValueError) as error:
            _error = f"cannot look for fierce_ext._C: {error}"
            return _error
        if spec is None:
            _error = f"fierce_ext was installed without its compiled extension: {BUILD_HINT}"
            return _error
        try:
            importlib.import_module("fierce_ext._C")
        except Exception as error:  # ImportError, OSError: ABI mismatch, missing libraries
            _error = (f"the compiled extension fierce_ext._C failed to import "
                      f"({type(error).__name__}: {error}); it was probably built against "
                      f"another torch or CUDA: rebuild it ({BUILD_HINT})")
            return _error
        _loaded = True
        return None


def has_ops(*names: str) -> bool:
    """Whether torch.ops.fierce_ext holds every op in `names` (after `load()`)."""
    return all(hasattr(torch.ops.fierce_ext, name) for name in names)
