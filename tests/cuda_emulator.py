"""The CUDA kernels of csrc/fierce_kernels.cu built for the CPU emulation (csrc/emulation/), as a
ctypes library: `build()` compiles csrc/emulation/emulated_ops.cpp once per source version (into
the temporary folder, named by a hash of csrc/) and returns the loaded library with its C
signatures declared. Used by tests/test_cuda_build.py and tests/gpu/dry_run.py."""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

CSRC_ENV = "FIERCE_EXT_CSRC"


class BuildError(RuntimeError):
    """The emulation could not be built (no compiler, or a compile error)."""


def csrc() -> pathlib.Path:
    """FIERCE_EXT_CSRC if set (the CUDA build check runs the tests from a copy), else csrc/ of
    this checkout."""
    candidates = [os.environ.get(CSRC_ENV), pathlib.Path(__file__).resolve().parents[1] / "csrc"]
    for candidate in candidates:
        if candidate and (pathlib.Path(candidate) / "emulation" / "emulated_ops.cpp").is_file():
            return pathlib.Path(candidate)
    raise BuildError(f"csrc/ not found next to {__file__}; set {CSRC_ENV} to the sources")


def build() -> ctypes.CDLL:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise BuildError("no C++ compiler (g++) to build the CPU emulation of the CUDA kernels")
    root = csrc()
    sources = sorted([*root.glob("*.cu"), *root.glob("*.cuh"), *root.glob("*.h"),
                      *(root / "emulation").glob("*")])
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.name.encode() + path.read_bytes())
    library = pathlib.Path(tempfile.gettempdir()) / f"fierce_emu_{digest.hexdigest()[:16]}.so"
    if not library.exists():
        partial = library.with_suffix(f".{os.getpid()}.tmp")
        command = [compiler, "-std=c++20", "-O2", "-DFIERCE_EMULATE", "-shared", "-fPIC",
                   "-Wall", "-Wno-unknown-pragmas", str(root / "emulation" / "emulated_ops.cpp"),
                   "-o", str(partial)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise BuildError(f"building the emulation failed:\n{' '.join(command)}\n"
                             f"{result.stderr}")
        os.replace(partial, library)
    lib = ctypes.CDLL(str(library))
    p, i, i64, f64, u64 = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double,
                           ctypes.c_uint64)
    lib.fierce_emu_forward.argtypes = [i, p, p, p, p, p, p, p, i64, i, i, i, i, i, i, f64, u64, u64,
                                       p, p, i]
    lib.fierce_emu_backward.argtypes = [i, p, p, p, p, p, p, p, p, i64, i, i, i, i, i, f64, u64,
                                        u64, p, p, i]
    lib.fierce_emu_philox.argtypes = [u64, u64, p]
    lib.fierce_emu_one_launch_forward.argtypes = [i64, i64, i64]
    lib.fierce_emu_check_barrier_rounds.argtypes = [i, i, i, p]
    lib.fierce_emu_check_skipped_barrier.argtypes = [i, p]
    return lib
