"""The Gumbel noise rule shared by every backend.

The noise of element (b, h, k) is a pure function of (seed, b, h, k), so the backward pass can
recompute it instead of storing B x C x K values, and every backend (reference, torch, Triton,
CUDA) draws the very same numbers for the same seed.

The rule, for features of B rows, a dictionary of C heads and K bins:

    Q       = ceil(K / 4)                                  # counters per (row, head)
    n       = ((row_offset + b) * C + h) * Q + k // 4       # counter, 0 <= n < 2^63
    x0..x3  = Philox4x32-10(counter = (n mod 2^32, n div 2^32, 0, 0),
                            key     = (seed mod 2^32, seed div 2^32))
    x       = x_{k mod 4}                                    # one 32-bit word per bin
    u       = (2 * (x >> 9) + 1) / 2^24                      # in [2^-24, 1 - 2^-24], exact in fp32
    g       = -log(-log(u))                                  # standard Gumbel

Philox4x32-10 is the counter-based generator of Salmon et al. (Random123, SC'11), the one
`triton.language.rand` and cuRAND's Philox use: ten rounds of two 32x32->64 multiplies
(multipliers 0xD2511F53 and 0xCD9E8D57) with the key bumped by (0x9E3779B9, 0xBB67AE85).
`u` is never 0 or 1, so `g` is always finite. The words `x` are bit-identical across backends;
`g` is computed in the backend's compute precision and may differ in the last bit between
math libraries. `row_offset` is the global index of the first row, so that a batch split across
processes draws the noise of the unsplit batch.

Every counter must be below 2^63 (COUNTER_LIMIT), i.e. (row_offset + B) * C * Q <= 2^63: the
torch form below and the custom ops' `int row_offset` are int64, so past it the implementations
would disagree (or fail) instead of drawing one rule; `check_rows` refuses such rows.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from . import _extension

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
SEED_LIMIT = 2**63  # seeds live in [0, 2^63): a torch int64 (custom-op schemas have no uint64)
COUNTER_LIMIT = 2**63  # counters live in [0, 2^63): int64 in the torch form and the op schemas


def check_rows(row_offset: int, rows: int, heads: int, bins: int) -> None:
    """ValueError naming `row_offset` unless every counter of rows row_offset .. row_offset +
    rows - 1 (C = heads, K = bins) is below COUNTER_LIMIT, the range every implementation
    draws the same words for."""
    quads = (bins + 3) // 4
    if row_offset < 0 or (row_offset + rows) * heads * quads > COUNTER_LIMIT:
        limit = COUNTER_LIMIT // (heads * quads)
        raise ValueError(
            f"row_offset + batch rows must be at most {limit} (2**63 / (heads * ceil(bins / 4))) "
            f"with {heads} heads and {bins} bins, got row_offset={row_offset} and {rows} rows: "
            f"the noise counter ((row_offset + b) * heads + h) * ceil(bins / 4) + k // 4 must "
            f"stay below 2**63 (see fierce_ext/noise.py)")


def _mulhilo(multiplier: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # x holds 32-bit values in int64; the 64-bit product wraps in two's complement, whose
    # bits are exactly those of the unsigned product, so masking recovers both halves.
    product = x * multiplier
    return (product >> 32) & MASK32, product & MASK32


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding 32-bit words; returns the four output words."""
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


# Without the compiled op (compiled_uniform), the CPU computes the words in numpy (per-operation
# overhead ~1 us against torch's ~4 us: at the paper's batch sizes the noise is a few thousand
# counters and overhead is much of its cost), CPU_BLOCK counters at a time so that the operands of
# the rounds stay in cache.
CPU_BLOCK = 8192
_NP_MASK32 = np.uint64(MASK32)
_NP_SHIFT32 = np.uint64(32)
_NP_MULTIPLIERS = np.array([[PHILOX_M0], [PHILOX_M1]], dtype=np.uint64)
_NP_KEY_BUMPS = (np.arange(PHILOX_ROUNDS, dtype=np.uint64)[:, None, None]
                 * np.array([[PHILOX_W0], [PHILOX_W1]], dtype=np.uint64))


def _philox_numpy(n: np.ndarray, k0: int, k1: int, out: np.ndarray) -> None:
    """philox4x32_10 of the counters (n mod 2^32, n div 2^32, 0, 0) into out, (len(n), 4) uint64.

    The same rounds with the words paired, (c0, c2) and (c1, c3), so that each step is one numpy
    operation on a (2, n) array: half the operations of the four-word form. Swapping the pair
    is a reversed view, free in numpy."""
    keys = (np.array([[k0], [k1]], dtype=np.uint64) + _NP_KEY_BUMPS) & _NP_MASK32  # per round
    even = np.stack([n & _NP_MASK32, np.zeros_like(n)])  # (c0, c2)
    odd = np.stack([n >> _NP_SHIFT32, np.zeros_like(n)])  # (c1, c3)
    for key in keys:
        product = even * _NP_MULTIPLIERS  # (M0 c0, M1 c2), exact: < 2^64
        even = (product >> _NP_SHIFT32)[::-1] ^ odd ^ key  # (hi1 ^ c1 ^ k0, hi0 ^ c3 ^ k1)
        odd = (product & _NP_MASK32)[::-1]  # (lo1, lo0)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = even[0], odd[0], even[1], odd[1]


def _words_numpy(first: int, total: int, key: tuple[int, int]) -> torch.Tensor:
    words = np.empty((total, 4), dtype=np.uint64)
    for start in range(0, total, CPU_BLOCK):
        n = np.arange(first + start, first + min(total, start + CPU_BLOCK), dtype=np.uint64)
        _philox_numpy(n, *key, out=words[start:start + len(n)])
    return torch.from_numpy(words.view(np.int64))  # all < 2^32: the same values


def _words_torch(first: int, total: int, key: tuple[int, int], device) -> torch.Tensor:
    # (first + arange, not arange(first, first + total): the end may be 2^63, past int64)
    n = torch.arange(total, dtype=torch.int64, device=device).add_(first)
    zero = torch.zeros_like(n)
    return torch.stack(philox4x32_10(n & MASK32, n >> 32, zero, zero, *key), -1)


def random_words(seed: int, rows: int, heads: int, bins: int, row_offset: int = 0,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The 32-bit words x[b, h, k] of the noise rule, as an int64 tensor (rows, heads, bins)."""
    check_rows(row_offset, rows, heads, bins)
    quads = (bins + 3) // 4
    total = rows * heads * quads
    first = (row_offset * heads) * quads
    device = torch.device(device) if device is not None else torch.get_default_device()
    key = (seed & MASK32, (seed >> 32) & MASK32)
    if device.type == "cpu":
        words = _words_numpy(first, total, key)
    else:
        words = _words_torch(first, total, key, device)
    return words.view(rows, heads, quads * 4)[:, :, :bins]


def uniform_from_words(words: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """u = (2 * (x >> 9) + 1) / 2^24: 23 random bits, centred, exactly representable in fp32."""
    return ((words >> 9) * 2 + 1).to(dtype) * (2.0**-24)


_UNSET = object()
_compiled_uniform = _UNSET
_warned_numpy_noise = False


def compiled_uniform():
    """The compiled CPU op that writes the rule's u (fierce_ext._C, csrc/noise_cpu.cpp), or None
    when the extension is missing: the words are then computed in numpy, the same bits ~5x
    slower."""
    global _compiled_uniform
    if _compiled_uniform is _UNSET:
        loaded = _extension.load() is None and _extension.has_ops("philox_uniform_")
        _compiled_uniform = torch.ops.fierce_ext.philox_uniform_ if loaded else None
    return _compiled_uniform


def uniform_noise(seed: int, rows: int, heads: int, bins: int, row_offset: int = 0,
                  device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rule's u[b, h, k], shape (rows, heads, bins)."""
    check_rows(row_offset, rows, heads, bins)
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        op = compiled_uniform()
        if op is not None:
            u = torch.empty(rows, heads, bins, dtype=dtype)
            op(u, seed, row_offset)
            return u
        _warn_numpy_noise_once()
    return uniform_from_words(random_words(seed, rows, heads, bins, row_offset, device), dtype)


def _warn_numpy_noise_once() -> None:
    """An install without the compiled op still works, but it should not be slow unnoticed."""
    global _warned_numpy_noise
    if not _warned_numpy_noise:
        _warned_numpy_noise = True
        why = _extension.load() or "fierce_ext._C does not register philox_uniform_"
        warnings.warn(f"fierce_ext draws the CPU noise in numpy, the same bits about 5x slower "
                      f"than the compiled op: {why}", RuntimeWarning, stacklevel=3)


def gumbel_noise(seed: int, rows: int, heads: int, bins: int, row_offset: int = 0,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel noise g[b, h, k] of the shared rule, shape (rows, heads, bins)."""
    u = uniform_noise(seed, rows, heads, bins, row_offset, device, dtype)
    return u.log_().neg_().log_().neg_()  # -log(-log(u)), in place on a fresh tensor


def draw_seed() -> torch.Tensor:
    """A seed (0-d int64 CPU tensor) from torch's default generator, so `torch.manual_seed`
    makes runs repeatable."""
    return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64)
