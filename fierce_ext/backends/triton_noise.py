"""The shared Gumbel noise rule (fierce_ext/noise.py) in Triton, for backends/fused_triton.py.

Bit-identical words to fierce_ext.noise.random_words: one Philox4x32-10 call per counter
n = ((row_offset + b) * C + h) * ceil(K / 4) + k // 4 (64-bit, split into (lo, hi, 0, 0)), keyed
by the seed's two 32-bit halves, whose four output words go to bins 4 (k // 4) .. 4 (k // 4) + 3.
u = (2 (x >> 9) + 1) / 2^24 is exact in fp32 and never 0 or 1; g = -log(-log(u)) is computed in
the kernel's accumulation dtype.

This module also holds the one place that imports Triton for the backend: without a usable
Triton it still imports (the kernels are then plain functions that are never launched) and
IMPORT_ERROR says why; INTERPRETER_ERROR says why the CPU interpreter cannot run them.
"""

from __future__ import annotations

import re

# The oldest Triton the kernels are tested with (CI: 3.6.0 and 3.8.0). Triton 3.0.0, which torch
# 2.4 pins, fails on them: its interpreter rejects tl.zeros of a constexpr block and its sm_90
# compiler aborts on an MMA-layout assertion.
MIN_TRITON = (3, 6)


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:2])


def _unsupported_version(module) -> str | None:
    """Why this Triton cannot serve the backend (too old), or None."""
    if _version_tuple(module.__version__) < MIN_TRITON:
        minimum = ".".join(map(str, MIN_TRITON))
        return (f"triton {module.__version__} is older than {minimum}, the oldest version the "
                f"Triton backend supports (pip install 'triton>={minimum}')")
    return None


def _interpreter_breaks(module) -> str | None:
    """Why this Triton's CPU interpreter cannot run the kernels beside the installed numpy, or
    None. Triton before 3.7 turns a 1-element array into an int the way numpy 2.4 refuses
    (triton-lang/triton#9171): every launch fails with "only 0-dimensional arrays can be
    converted to Python scalars". The GPU path does not go through numpy."""
    import numpy

    if _version_tuple(module.__version__) < (3, 7) and _version_tuple(numpy.__version__) >= (2, 4):
        return (f"the CPU interpreter of triton {module.__version__} fails with numpy "
                f"{numpy.__version__} (triton-lang/triton#9171, fixed in triton 3.7): "
                f"pip install 'numpy<2.4' or 'triton>=3.7' to run the kernels in it")
    return None


try:
    import triton
    import triton.language
    IMPORT_ERROR = _unsupported_version(triton)
    INTERPRETER_ERROR = IMPORT_ERROR or _interpreter_breaks(triton)
except Exception as error:  # ImportError, or a broken install: report it, keep the package usable
    triton = None
    IMPORT_ERROR = INTERPRETER_ERROR = f"triton is not importable ({type(error).__name__}: {error})"

if IMPORT_ERROR is None:
    tl = triton.language
else:  # the kernels stay plain functions: an old or broken Triton never compiles them
    triton = None

    class _NoTritonLanguage:  # lets the kernel definitions below parse; they are never launched
        @staticmethod
        def constexpr(value=None):
            return value

    tl = _NoTritonLanguage()


def jit(**options):
    if triton is None:
        return lambda fn: fn
    return triton.jit(**options)


_LOW32 = tl.constexpr(0xFFFFFFFF)
_PHILOX_M0 = tl.constexpr(0xD2511F53)
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)
_PHILOX_W1 = tl.constexpr(0xBB67AE85)
_INV_2_24 = tl.constexpr(2.0**-24)


@jit()
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (the rule in fierce_ext/noise.py)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _PHILOX_M0)
        lo0 = c0 * _PHILOX_M0
        hi1 = tl.umulhi(c2, _PHILOX_M1)
        lo1 = c2 * _PHILOX_M1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    return c0, c1, c2, c3


@jit()
def noise_words_tile(seed_lo, seed_hi, rows, h, C, Q, q0,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """The 32-bit words of bins [4 q0, 4 q0 + BLOCK_K) for the global rows `rows` (int64) and
    head h: one Philox call per 4 bins, its 4 words interleaved into the bin axis."""
    quads = q0 + tl.arange(0, BLOCK_K // 4)
    n = ((rows[:, None] * C + h) * Q + quads[None, :].to(tl.int64))  # 64-bit counter
    c0 = (n & _LOW32).to(tl.uint32)
    c1 = (n >> 32).to(tl.uint32)
    zero = tl.zeros((BLOCK_B, BLOCK_K // 4), tl.uint32)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    x0, x1, x2, x3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    # join(join(x0, x2), join(x1, x3))[..., i, j] = x_{2i+j}: row-major reshape puts word w of
    # quad q at bin 4q + w.
    words = tl.join(tl.join(x0, x2), tl.join(x1, x3))
    return tl.reshape(words, (BLOCK_B, BLOCK_K))


@jit()
def gumbel_tile(seed_lo, seed_hi, rows, h, C, Q, q0, ACC: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    x = noise_words_tile(seed_lo, seed_hi, rows, h, C, Q, q0, BLOCK_B, BLOCK_K)
    # u = (2 (x >> 9) + 1) / 2^24 lies in [2^-24, 1 - 2^-24]: exact in fp32, never 0 or 1.
    u = ((x >> 9) * 2 + 1).to(ACC) * _INV_2_24
    return -tl.log(-tl.log(u))


@jit(do_not_specialize=["seed_lo", "seed_hi", "row_offset"])
def noise_words_kernel(out_ptr, R, C, K, Q, seed_lo, seed_hi, row_offset,
                        BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Debug kernel: the noise words of (R, C, K) as int64, for comparison with noise.py."""
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    local = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = local < R
    rows = row_offset + local.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = noise_words_tile(seed_lo, seed_hi, rows, h, C, Q, k0 // 4, BLOCK_B, BLOCK_K)
        offsets = (local.to(tl.int64)[:, None] * C + h) * K + ks[None, :]
        tl.store(out_ptr + offsets, x.to(tl.int64), mask=row_mask[:, None] & (ks < K)[None, :])
