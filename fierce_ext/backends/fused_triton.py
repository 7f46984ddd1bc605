"""The `triton` backend: fused Triton kernels for the feature histogram and its gradient.

Forward (two launches): `_forward_kernel` runs one program per (share of the row blocks, head).
For each block of rows it computes the logits tile by tile over the bins,

    s = a_b (r_b . v_hk) + c_hk        (tl.dot over D; a, v, c from fierce_ext/dictionary.py)
    z = (s + g) / tau                  (g: the shared noise rule, backends/triton_noise.py)

keeps a running max, argmax and sum of exponentials over the bin tiles (online log-sum-exp), then
adds the block's column sums of the one-hot argmax (`gumbel_hard`) or of y = exp(z - lse) (a
second pass over the bins, after the final lse is known) to the program's partial histogram.
`_reduce_kernel` sums the partials in a fixed order and divides by B. For `entropy_forward` it
also writes the entropy where it runs as one program (P x C x K <= REDUCE_ONE_PROGRAM_ENTRIES
partial entries, as at the paper's sizes); above that `_entropy_kernel` follows, a third launch.
Only lse (B, C), the partials (min(ceil(B / BLOCK_B), MAX_ROW_PROGRAMS), C, K) and the
histogram are written: never a B x C x K tensor. NaN poisoning: a row whose lse is not finite
(its logits hold a NaN or +inf, or are all -inf) makes the whole histogram NaN, for every
estimator; such rows get a non-finite gradient row, the other rows' gradients are unaffected.

Backward (two launches per chunk of rows): the gradient is a GEMM whose reduction runs over all
C * K bins while its output has all D columns, and delta needs a reduction over the bins first:

    delta[b,h,k] = y[b,h,k] (G[h,k] - e[b,h]) / (B tau),   e[b,h] = sum_k y[b,h,k] G[h,k]
    dr_b = a_b sum_hk delta v_hk  -  [cosine] a_b^2 (sum_hk delta s) r_b

D is up to thousands, too wide to keep a row block's gradient in registers (flash attention's
trick needs D <= ~256), so for each chunk of rows `_softmax_kernel` recomputes the logits once,
writes y to a scratch (chunk x C x K in the dot dtype, at most SCRATCH_FRACTION of the
gradient's bytes or SCRATCH_MIN_BYTES) while summing e, then rewrites its own, still L2-resident
tiles as y (G - e); `_grad_kernel` is a tiled GEMM of that scratch with the projected dictionary
whose epilogue applies a_b, 1 / (B tau) and the cosine correction, writing each gradient element
exactly once, in the features' dtype. For `entropy_backward` the softmax kernel forms
G = dL/dp from dL/dH and the histogram itself, tile by tile (`_bins_grad`): no launch for it.

Precision: float32 features multiply in TF32 on the tensor cores by default (`distance`: exact
float32, see backends.fp32_precision). At each call, `fused_triton.FP32_PRECISION` chooses if
set, else the environment variable FIERCE_EXT_FP32_PRECISION (shared with the cuda backend):
"tf32", "tf32x3" (three TF32 passes, near fp32) or "ieee" (exact fp32, no tensor cores).
float16/bfloat16 features multiply in their own dtype with float32 accumulation; float64
features compute in float64 throughout.

Determinism: no atomics; every sum runs in an order fixed by the shapes, so the same inputs and
seed give bitwise-identical outputs run to run on the same device.

On a CPU, the kernels run in Triton's interpreter when TRITON_INTERPRET=1 is set before this
module is first imported (the `@triton.jit` decorators read it); the interpreter multiplies
bfloat16 dots wrongly (triton issue 11584), so bf16 tiles are upcast to fp32 there.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

from ..dictionary import NORM_EPS, derived, project_dictionary
from ..noise import SEED_LIMIT
from . import ENTROPY_EPS, FP32_PRECISIONS, compute_dtype, fp32_precision

# Triton itself comes through triton_noise, which stays importable without it.
from .triton_noise import IMPORT_ERROR as _IMPORT_ERROR
from .triton_noise import INTERPRETER_ERROR as _INTERPRETER_ERROR
from .triton_noise import gumbel_tile, noise_words_kernel, tl, triton
from .triton_noise import jit as _jit

NAME = "triton"

ESTIMATORS = ("gumbel_hard", "gumbel_soft", "softmax")

# How float32 features are multiplied (ignored by the interpreter): one of FP32_PRECISIONS, or
# None to read FIERCE_EXT_FP32_PRECISION at each call.
FP32_PRECISION: str | None = None


# The backward's y scratch for one chunk of rows: at most this fraction of the gradient's bytes,
# but at least SCRATCH_MIN_BYTES (so small gradients still run in one chunk).
SCRATCH_FRACTION = 0.125
SCRATCH_MIN_BYTES = 16 * 2**20

# Partial-histogram entries (programs x C x K) up to which the reduce kernel runs as one program,
# which then also writes the entropy (one launch fewer: at the paper's sizes, launches are most
# of a step); it reads at most 32 KiB of float32 partials.
REDUCE_ONE_PROGRAM_ENTRIES = 8192

# Programs along the rows in the forward: each sums its share of row blocks into one partial
# histogram, so the partials take at most MAX_ROW_PROGRAMS x C x K, whatever B. A constant, not
# the device's SM count. (The row tile does follow the SM count (_forward_config), so soft
# histograms may differ in their last bits between GPU models; on one GPU the bits repeat.)
MAX_ROW_PROGRAMS = 1024

# Largest tiles in the interpreter, whose cost grows with the number of programs and ops, not
# with tile size. Tests lower them to exercise the multi-tile and multi-block paths cheaply.
INTERPRETER_MAX_BLOCK = {"rows": 128, "bins": 256, "dim": 256}

# CUDA's limit on a grid's second axis, which runs over heads (forward, backward softmax, noise),
# the reduce's bin tiles and the gradient's feature-column tiles, each at most _GRID_Y_TILE wide.
MAX_GRID_Y = 65535
_GRID_Y_TILE = 128

_MASK32 = 0xFFFFFFFF
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NEG_INF = tl.constexpr(float("-inf"))
_INF = tl.constexpr(float("inf"))
_NO_BIN = tl.constexpr(2**30)  # larger than any bin index
_NORM_EPS = tl.constexpr(NORM_EPS)
_ENTROPY_EPS = tl.constexpr(ENTROPY_EPS)
_INV_LN2 = tl.constexpr(1 / math.log(2))


# ---------------------------------------------------------------------------- shared pieces

@_jit()
def _feature_tile(r_ptr, stride_rb, stride_rd, rows, row_mask, d0, D, ACC: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """Features r[rows, d0:d0 + BLOCK_D] in ACC, 0 outside the rows and D."""
    ds = d0 + tl.arange(0, BLOCK_D)
    return tl.load(r_ptr + rows[:, None] * stride_rb + ds[None, :] * stride_rd,
                   mask=row_mask[:, None] & (ds < D)[None, :], other=0.0).to(ACC)


@_jit()
def _row_scale(r_ptr, stride_rb, stride_rd, rows, row_mask, D, ACC: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """a_b = 1 / max(|r_b|, NORM_EPS), accumulated in the compute dtype. A norm past its range
    (|r_b| > ~1.8e19 in float32) is taken from r_b / max|r_b|, as dictionary.vector_norm does
    (an Inf entry gives NaN there, as in torch); the rare case costs two more passes."""
    sumsq = tl.zeros((BLOCK_B,), ACC)
    for d0 in range(0, D, BLOCK_D):
        r = _feature_tile(r_ptr, stride_rb, stride_rd, rows, row_mask, d0, D, ACC, BLOCK_D)
        sumsq += tl.sum(r * r, axis=1)
    norm = tl.sqrt(sumsq)
    overflow = norm == _INF
    if tl.max(overflow.to(tl.int32), axis=0) > 0:
        peak = tl.zeros((BLOCK_B,), ACC)
        for d0 in range(0, D, BLOCK_D):
            r = _feature_tile(r_ptr, stride_rb, stride_rd, rows, row_mask, d0, D, ACC, BLOCK_D)
            peak = tl.maximum(peak, tl.max(tl.abs(r), axis=1))
        peak = tl.where(overflow, peak, 1.0)  # no 0 / 0 in the rows that keep their norm
        sumsq = tl.zeros((BLOCK_B,), ACC)
        for d0 in range(0, D, BLOCK_D):
            r = _feature_tile(r_ptr, stride_rb, stride_rd, rows, row_mask, d0, D, ACC, BLOCK_D)
            r = r / peak[:, None]
            sumsq += tl.sum(r * r, axis=1)
        norm = tl.where(overflow, tl.sqrt(sumsq) * peak, norm)
    return 1.0 / tl.maximum(norm, tl.full((BLOCK_B,), _NORM_EPS, ACC))


@_jit()
def _round_to_tf32(x):
    """fp32 -> the nearest TF32 value (10-bit mantissa; ties away from zero), still as fp32.
    Tensor cores otherwise drop the low 13 bits: a truncation error twice as large, biased."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)  # NaN stays NaN


@_jit()
def _logits_tile(r_ptr, stride_rb, stride_rd, vt_ptr, ld_v, bias_ptr, rows, noise_rows, row_mask,
                 scale, h, k0, D, K, C, Q, tau, seed_lo, seed_hi,
                 ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                 ROUND_TF32: tl.constexpr, HAS_SCALE: tl.constexpr, NOISE: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(s, z) for rows x bins [k0, k0 + BLOCK_K) of head h; vt is the projected dictionary as a
    (C * K, D) matrix with row stride ld_v; noise_rows = row_offset + rows. Padded rows and
    bins hold finite values: callers mask them."""
    ks = k0 + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    acc = tl.zeros((BLOCK_B, BLOCK_K), ACC)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        r = tl.load(r_ptr + rows[:, None] * stride_rb + ds[None, :] * stride_rd,
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        v = tl.load(vt_ptr + (h * K + ks)[None, :] * ld_v + ds[:, None],
                    mask=d_mask[:, None] & k_mask[None, :], other=0.0)
        r = r.to(DOT)
        if ROUND_TF32:  # (vt is rounded once, by the launcher)
            r = _round_to_tf32(r)
        acc = tl.dot(r, v.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    s = acc
    if HAS_SCALE:
        s = s * scale[:, None]
    # The bias is 0 except for `distance`: one (K,) load, cheaper than another specialisation.
    s = s + tl.load(bias_ptr + h * K + ks, mask=k_mask, other=0.0)[None, :]
    z = s
    if NOISE:
        z = z + gumbel_tile(seed_lo, seed_hi, noise_rows, h, C, Q, k0 // 4, ACC, BLOCK_B, BLOCK_K)
    return s, z / tau


# ---------------------------------------------------------------------------------- forward

@_jit(do_not_specialize=["B", "num_blocks", "seed_lo", "seed_hi", "row_offset"])
def _forward_kernel(r_ptr, stride_rb, stride_rd, vt_ptr, ld_v, bias_ptr, lse_ptr, part_ptr,
                    bad_ptr, B, num_blocks, D, K, C, tau_hi, tau_lo, seed_lo, seed_hi,
                    row_offset, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                    ROUND_TF32: tl.constexpr, HAS_SCALE: tl.constexpr, NOISE: tl.constexpr,
                    HARD: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (p, h) handles the row blocks p, p + P, p + 2P, ... (P programs along rows) of
    head h and accumulates their column sums into its own partial histogram row."""
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    tau = tl.cast(tau_hi, ACC) + tl.cast(tau_lo, ACC)
    Q = (K + 3) // 4
    bad = tl.zeros((BLOCK_B,), tl.int32)
    for block in range(pid_b, num_blocks, tl.num_programs(0)):
        local = block * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = local < B
        rows = local.to(tl.int64)
        noise_rows = row_offset + rows
        if HAS_SCALE:
            scale = _row_scale(r_ptr, stride_rb, stride_rd, rows, row_mask, D, ACC, BLOCK_B,
                               BLOCK_D)
        else:
            scale = tl.full((BLOCK_B,), 1.0, ACC)

        # Pass 1: online max / sum of exponentials (and argmax, ties to the lowest bin).
        m = tl.full((BLOCK_B,), _NEG_INF, ACC)
        total = tl.zeros((BLOCK_B,), ACC)
        best = tl.full((BLOCK_B,), _NEG_INF, ACC)
        best_k = tl.zeros((BLOCK_B,), tl.int32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            s, z = _logits_tile(r_ptr, stride_rb, stride_rd, vt_ptr, ld_v, bias_ptr, rows,
                                noise_rows, row_mask, scale, h, k0, D, K, C, Q, tau, seed_lo,
                                seed_hi, ACC, DOT, PRECISION, ROUND_TF32, HAS_SCALE, NOISE, BLOCK_B,
                                BLOCK_K, BLOCK_D)
            z = tl.where((ks < K)[None, :], z, _NEG_INF)
            tile_max = tl.max(z, axis=1)
            m_new = tl.maximum(m, tile_max)
            # A row whose logits so far are all -inf keeps total = 0 (exp(-inf - 0)), as torch.
            m_ref = tl.where(m_new == _NEG_INF, 0.0, m_new)
            total = total * tl.exp(m - m_ref) + tl.sum(tl.exp(z - m_ref[:, None]), axis=1)
            m = m_new
            if HARD:
                tile_k = tl.min(tl.where(z == tile_max[:, None], ks[None, :], _NO_BIN), axis=1)
                better = tile_max > best  # strict: an equal later maximum loses the tie
                best_k = tl.where(better, tile_k, best_k)
                best = tl.where(better, tile_max, best)
        lse = m + tl.log(total)
        tl.store(lse_ptr + rows * C + h, lse, mask=row_mask)
        # y = exp(z - m) / total in pass 2, not exp(z - lse): lse is rounded to ulp(lse), large
        # beside total's own rounding when the logits are (distance: ~1e4).
        inv_total = 1.0 / total
        # Rows with a non-finite lse poison the histogram (the reduce kernel makes it NaN).
        finite = (lse - lse) == 0
        bad += (row_mask & (finite == 0)).to(tl.int32)

        # Pass 2: this block's column sums of e (one-hot or y), added to the program's partial
        # row (read back from the second block on, after a barrier: another thread may have
        # stored what this one loads).
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            if HARD:
                hits = (best_k[:, None] == ks[None, :]) & row_mask[:, None]
                column = tl.sum(hits.to(ACC), axis=0)
            else:
                s, z = _logits_tile(r_ptr, stride_rb, stride_rd, vt_ptr, ld_v, bias_ptr, rows,
                                    noise_rows, row_mask, scale, h, k0, D, K, C, Q, tau, seed_lo,
                                    seed_hi, ACC, DOT, PRECISION, ROUND_TF32, HAS_SCALE, NOISE,
                                    BLOCK_B, BLOCK_K, BLOCK_D)
                y = tl.where(row_mask[:, None], tl.exp(z - m[:, None]) * inv_total[:, None], 0.0)
                column = tl.sum(y, axis=0)
            pointers = part_ptr + (pid_b.to(tl.int64) * C + h) * K + ks
            # A scalar condition stays out of masks: Triton 3.9's interpreter refuses a mask that
            # combines a tensor with a scalar comparison (its data is then int32, not bool).
            if block != pid_b:
                tl.debug_barrier()
                column += tl.load(pointers, mask=ks < K, other=0.0)
            tl.store(pointers, column, mask=ks < K)
    tl.store(bad_ptr + pid_b * C + h, tl.sum(bad, axis=0))


@_jit()
def _poisoned(bad_ptr, count, BLOCK_N: tl.constexpr):
    """Whether any of the forward kernel's `count` per-(program, head) flags is set: some row of
    some head has a non-finite lse."""
    bad = tl.zeros((BLOCK_N,), tl.int32)
    for i0 in range(0, count, BLOCK_N):
        flat = i0 + tl.arange(0, BLOCK_N)
        bad += tl.load(bad_ptr + flat, mask=flat < count, other=0)
    return tl.sum(bad, axis=0) > 0


@_jit()
def _entropy_terms(p):
    """p log2(p + eps): the summands of -H (backends.entropy_bits); 0 for p = 0."""
    return p * tl.log2(p + _ENTROPY_EPS)


@_jit(do_not_specialize=["B", "num_partials"])
def _reduce_kernel(part_ptr, bad_ptr, hist_ptr, entropy_ptr, B, num_partials, C, K,
                   ACC: tl.constexpr, ENTROPY: tl.constexpr, MEAN: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """histogram[h, k] = sum of the partial histograms (in order) / B; all NaN if any row of
    any head has a non-finite lse (the package's rule: such a row makes the histogram NaN).

    Grid-stride over heads and bin tiles: a (C, ceil(K / BLOCK_K)) grid gives each program one
    tile; one program does them all (small problems, one launch fewer), and only then may
    ENTROPY also write the entropy, as _entropy_kernel would. The tiles are the same either
    way, so the histogram's bits are too."""
    poisoned = _poisoned(bad_ptr, num_partials * C, BLOCK_N)
    total = tl.zeros((), ACC)
    for h in range(tl.program_id(0), C, tl.num_programs(0)):
        terms = tl.zeros((BLOCK_K,), ACC)
        for k0 in range(tl.program_id(1) * BLOCK_K, K, tl.num_programs(1) * BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_mask = ks < K
            acc = tl.zeros((BLOCK_N, BLOCK_K), ACC)
            for i0 in range(0, num_partials, BLOCK_N):
                blocks = i0 + tl.arange(0, BLOCK_N)
                acc += tl.load(part_ptr + (blocks.to(tl.int64)[:, None] * C + h) * K
                               + ks[None, :],
                               mask=(blocks < num_partials)[:, None] & k_mask[None, :],
                               other=0.0)
            column = tl.sum(acc, axis=0) / B
            # NaN written in the kernel: a NaN global constexpr never equals itself, which
            # Triton's launcher takes for a global changed since compilation (an error at every
            # launch).
            column = tl.where(poisoned, float("nan"), column)
            tl.store(hist_ptr + h * K + ks, column, mask=k_mask)
            if ENTROPY:
                terms += tl.where(k_mask, _entropy_terms(column), 0.0)
        if ENTROPY:
            value = -tl.sum(terms, axis=0)
            total += value
            if not MEAN:
                tl.store(entropy_ptr + h, value)
    if ENTROPY and MEAN:
        tl.store(entropy_ptr, total / C)


@_jit()
def _entropy_kernel(hist_ptr, out_ptr, C, K, ACC: tl.constexpr, MEAN: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """H[h] = -sum_k p log2(p + eps) of each head (backends.entropy_bits) into out[h], or their
    mean into out[0]; one program, fixed order."""
    total = tl.zeros((), ACC)
    for h in range(0, C):
        terms = tl.zeros((BLOCK_K,), ACC)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            terms += _entropy_terms(tl.load(hist_ptr + h * K + ks, mask=ks < K, other=0.0))
        value = -tl.sum(terms, axis=0)
        total += value
        if not MEAN:
            tl.store(out_ptr + h, value)
    if MEAN:
        tl.store(out_ptr, total / C)


# --------------------------------------------------------------------------------- backward

@_jit()
def _entropy_slope(hist_ptr, ks, K, weight):
    """dL/dp[k] = -w (log2(p + eps) + p / ((p + eps) ln 2)) for the bins ks (0 beyond K)."""
    p = tl.load(hist_ptr + ks, mask=ks < K, other=0.0)
    shifted = p + _ENTROPY_EPS
    g = (tl.log2(shifted) + _INV_LN2 * (p / shifted)) * -weight
    return tl.where(ks < K, g, 0.0)


@_jit()
def _bins_grad_setup(grad_ptr, grad_entropy_ptr, weight_stride, weight_divisor, h, K,
                     ACC: tl.constexpr, FROM_ENTROPY: tl.constexpr, BLOCK_K: tl.constexpr):
    """(w, mean) for _bins_grad: with FROM_ENTROPY, head h's weight, dL/dH[h * weight_stride] /
    weight_divisor (reduction "mean": stride 0, divisor C; "none": 1, 1), and the mean over the
    bins of its slope, recomputed by every program in one fixed order (the same bits in each);
    otherwise unused zeros."""
    if FROM_ENTROPY:
        weight = tl.load(grad_entropy_ptr + h * weight_stride).to(ACC) / weight_divisor
        part = tl.zeros((BLOCK_K,), ACC)
        for k0 in range(0, K, BLOCK_K):
            part += _entropy_slope(grad_ptr + h * K, k0 + tl.arange(0, BLOCK_K), K, weight)
        return weight, tl.sum(part, axis=0) / K
    return tl.zeros((), ACC), tl.zeros((), ACC)


@_jit()
def _bins_grad(grad_ptr, h, ks, K, weight, mean, FROM_ENTROPY: tl.constexpr):
    """G[h, ks] = dL/dp, centred per head (0 beyond K). grad_ptr is G itself (centred by the
    launcher) or, with FROM_ENTROPY, the histogram: G is then the entropy's slope
    (backends.entropy_bits_backward) minus its mean, formed here instead of in a launch of its
    own."""
    if FROM_ENTROPY:
        return tl.where(ks < K, _entropy_slope(grad_ptr + h * K, ks, K, weight) - mean, 0.0)
    return tl.load(grad_ptr + h * K + ks, mask=ks < K, other=0.0)


@_jit(do_not_specialize=["weight_stride", "weight_divisor", "row_start", "row_stop", "seed_lo",
                         "seed_hi", "row_offset"])
def _softmax_kernel(r_ptr, stride_rb, stride_rd, vt_ptr, ld_v, bias_ptr, lse_ptr, grad_ptr,
                    grad_entropy_ptr, weight_stride, weight_divisor, delta_ptr, ld_delta, t_ptr,
                    scale_ptr, row_start, row_stop, D, K, C, tau_hi, tau_lo, seed_lo, seed_hi,
                    row_offset, ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                    ROUND_TF32: tl.constexpr, HAS_SCALE: tl.constexpr, NOISE: tl.constexpr,
                    FROM_ENTROPY: tl.constexpr, SCRATCH: tl.constexpr, ROUND_SCRATCH: tl.constexpr,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """For rows [row_start, row_stop) and head h, into the chunk's scratch: y (G - e) with
    y = exp(z - lse) / sum_k exp(z - lse) and e = sum_k y G; for cosine also
    t = sum_k y (G - e) s and a_b. G comes from grad_ptr, or with FROM_ENTROPY from the histogram
    and dL/dH (see _bins_grad). The scratch is SCRATCH (float32 for float16 features), rounded to
    TF32 with ROUND_SCRATCH."""
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    rows = row_start + pid_b * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < row_stop
    local = rows - row_start
    tau = tl.cast(tau_hi, ACC) + tl.cast(tau_lo, ACC)
    Q = (K + 3) // 4
    if HAS_SCALE:
        scale = _row_scale(r_ptr, stride_rb, stride_rd, rows, row_mask, D, ACC, BLOCK_B, BLOCK_D)
        if h == 0:  # one head writes the scale (a branch, not a mask: see _forward_kernel)
            tl.store(scale_ptr + rows, scale, mask=row_mask)
    else:
        scale = tl.full((BLOCK_B,), 1.0, ACC)
    lse = tl.load(lse_ptr + rows * C + h, mask=row_mask, other=0.0)
    weight, mean = _bins_grad_setup(grad_ptr, grad_entropy_ptr, weight_stride, weight_divisor, h,
                                    K, ACC, FROM_ENTROPY, BLOCK_K)
    e = tl.zeros((BLOCK_B,), ACC)
    n = tl.zeros((BLOCK_B,), ACC)
    gs = tl.zeros((BLOCK_B,), ACC)
    ys = tl.zeros((BLOCK_B,), ACC)
    # Pass 1: recompute the logits, store y, accumulate e, n = sum_k y (and the cosine sums).
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        s, z = _logits_tile(r_ptr, stride_rb, stride_rd, vt_ptr, ld_v, bias_ptr, rows,
                            rows + row_offset, row_mask, scale, h, k0, D, K, C, Q, tau, seed_lo,
                            seed_hi, ACC, DOT, PRECISION, ROUND_TF32, HAS_SCALE, NOISE, BLOCK_B,
                            BLOCK_K, BLOCK_D)
        mask = row_mask[:, None] & k_mask[None, :]
        y = tl.where(mask, tl.exp(z - lse[:, None]), 0.0)
        g = _bins_grad(grad_ptr, h, ks, K, weight, mean, FROM_ENTROPY)
        yg = y * g[None, :]
        e += tl.sum(yg, axis=1)
        n += tl.sum(y, axis=1)
        if HAS_SCALE:
            gs += tl.sum(yg * s, axis=1)
            ys += tl.sum(y * s, axis=1)
        tl.store(delta_ptr + local[:, None] * ld_delta + (h * K + ks)[None, :], y.to(SCRATCH),
                 mask=mask)
    # y / n: the stored lse is rounded to ulp(lse), which scales y by up to 1 +- ulp(lse)/2;
    # with sum_k y != 1, sum_k delta is not the 0 the gradient formula needs (chunked.py).
    inv_n = 1.0 / tl.where(row_mask, n, 1.0)  # (padded rows: y = 0 anyway)
    e = e * inv_n
    if HAS_SCALE:
        # G is centred per head (_bins_grad), which keeps this difference well conditioned.
        tl.store(t_ptr + rows * C + h, (gs - e * ys) * inv_n, mask=row_mask)
    # Pass 2: y -> y (G - e) in place. The tiles were just written by this program (still in
    # L2); the barrier makes other threads' stores visible before they are read back.
    tl.debug_barrier()
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        mask = row_mask[:, None] & k_mask[None, :]
        pointers = delta_ptr + local[:, None] * ld_delta + (h * K + ks)[None, :]
        y = tl.load(pointers, mask=mask, other=0.0).to(ACC) * inv_n[:, None]
        g = _bins_grad(grad_ptr, h, ks, K, weight, mean, FROM_ENTROPY)
        delta = (y * (g[None, :] - e[:, None])).to(SCRATCH)
        if ROUND_SCRATCH:  # the GEMM's operand, exactly representable in TF32
            delta = _round_to_tf32(delta)
        tl.store(pointers, delta, mask=mask)


@_jit(do_not_specialize=["row_start", "row_stop"])
def _grad_kernel(delta_ptr, ld_delta, vt_ptr, ld_v, t_ptr, scale_ptr, r_ptr, stride_rb, stride_rd,
                 out_ptr, stride_ob, stride_od, row_start, row_stop, D, CK, C, inv_hi, inv_lo,
                 ACC: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                 HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """A GEMM over the C * K bins with an epilogue: for the chunk's rows,
    dr = (a / (B tau)) [y (G - e)] . vt  -  [cosine] (a^2 / (B tau)) (sum_h t) r, the cosine
    form computed as (a / (B tau)) ([y (G - e)] . vt - a (sum_h t) r): a^2 underflows float32
    for |r| past ~1e19."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = row_start + pid_m * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_mask = rows < row_stop
    local = rows - row_start
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    ks = tl.arange(0, BLOCK_K)
    # The scratch and vt hold < 2^31 elements (the launcher caps the scratch): 32-bit offsets.
    delta_ptrs = delta_ptr + local.to(tl.int32)[:, None] * ld_delta + ks[None, :]
    v_ptrs = vt_ptr + ks[:, None] * ld_v + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), ACC)
    for k0 in range(0, CK, BLOCK_K):
        k_mask = (k0 + ks) < CK
        delta = tl.load(delta_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        # float16 features: v widened to the float32 scratch (exactly: TF32 holds float16's
        # 10-bit mantissa); otherwise the same dtype, and this is a no-op.
        acc = tl.dot(delta, v.to(delta.dtype), acc, input_precision=PRECISION, out_dtype=ACC)
        delta_ptrs += BLOCK_K
        v_ptrs += BLOCK_K * ld_v
    inv = tl.cast(inv_hi, ACC) + tl.cast(inv_lo, ACC)  # 1 / (B tau)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
        t = tl.zeros((BLOCK_M,), ACC)
        for h in range(0, C):
            t += tl.load(t_ptr + rows * C + h, mask=row_mask, other=0.0)
        r = tl.load(r_ptr + rows[:, None] * stride_rb + cols[None, :] * stride_rd,
                    mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(ACC)
        dr = (acc - (scale * t)[:, None] * r) * (scale * inv)[:, None]
    else:
        dr = acc * inv
    tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :] * stride_od,
             dr.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# -------------------------------------------------------------------------------- launchers

def _interpreting() -> bool:
    """True when the kernels were decorated in interpreter mode (TRITON_INTERPRET=1)."""
    return triton is not None and type(_forward_kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device: torch.device) -> str | None:
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device = torch.device(device)
    if device.type == "cuda":
        if _interpreting():
            return ("TRITON_INTERPRET=1 was set when fierce_ext.backends.fused_triton was "
                    "imported: the kernels run in the CPU interpreter; unset it to compile them "
                    "for the GPU")
        if not torch.cuda.is_available():
            return "torch sees no CUDA device"
        return None
    if device.type == "cpu":
        if _interpreting():
            return _INTERPRETER_ERROR
        return ("Triton kernels need a GPU; on a CPU they run only in Triton's interpreter "
                "(set TRITON_INTERPRET=1 before fierce_ext.backends.fused_triton is imported)")
    return f"the Triton backend supports CUDA (and the CPU interpreter), not {device.type!r}"


def _check_runnable(tensor: torch.Tensor) -> None:
    reason = unavailable_reason(tensor.device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' cannot run on {tensor.device}: {reason}")


_TL_DTYPES = {}
if triton is not None:
    _TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                  torch.float32: tl.float32, torch.float64: tl.float64}


def _dot_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype the GEMM operands are multiplied in: the features' own, except that the
    interpreter's bf16 dot is broken (upcast to fp32 there)."""
    if features.dtype == torch.bfloat16 and _interpreting():
        return torch.float32
    if features.dtype in (torch.float16, torch.bfloat16, torch.float64):
        return features.dtype
    return torch.float32


def _precision(dot_dtype: torch.dtype, similarity: str) -> str:
    if dot_dtype == torch.float64:
        return "ieee"
    if dot_dtype != torch.float32:
        return "tf32"  # Triton's default; only fp32 operands read it
    if FP32_PRECISION is None:
        return fp32_precision(similarity)
    if FP32_PRECISION not in FP32_PRECISIONS:
        raise ValueError(f"fused_triton.FP32_PRECISION must be one of {FP32_PRECISIONS} or "
                         f"None, got {FP32_PRECISION!r}")
    return FP32_PRECISION


def _split_float(value: float) -> tuple[float, float]:
    """value as hi + lo, two float32s (Triton passes Python floats as fp32; the float64 kernels
    add both halves back and keep about 48 bits)."""
    if abs(value) > _FLOAT32_MAX:  # inf + 0, not inf + (-inf) = NaN in the float64 kernels
        return math.copysign(math.inf, value), 0.0
    hi = float(np.float32(value))  # round to nearest, like torch's cast; 10x cheaper per call
    return hi, float(np.float32(value - hi))


def _seed_words(seed: int) -> tuple[int, int]:
    """The Philox key as two int32 (bit patterns of seed mod 2^32 and seed div 2^32), so the
    kernel argument types never change with the seed's value."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2^63), got {seed!r}")
    low, high = (w - 2**32 if w >= 2**31 else w
                 for w in (seed & _MASK32, (seed >> 32) & _MASK32))
    return low, high


# triton.cdiv and triton.next_power_of_2 are constexpr functions: called from host code they
# cost ~10 us each (argument unwrapping), half of this module's host time per backward before
# any kernel launch. The launchers use plain integer arithmetic instead.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int, low: int, high: int) -> int:
    """The next power of two >= n, clamped to [low, high]."""
    return max(low, min(high, 1 << (max(1, n) - 1).bit_length()))


def _device_guard(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _round_up16(n: int) -> int:
    return (n + 15) // 16 * 16


def _round_to_tf32_torch(x: torch.Tensor) -> torch.Tensor:
    """_round_to_tf32 for a float32 torch tensor."""
    rounded = ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32)
    return torch.where(torch.isnan(x), x, rounded)


class _Projected:
    """The dictionary in kernel form: vt (C*K, D) in the dot dtype, its rows padded with zeros
    to a multiple of 16 elements (aligned rows let Triton use vector and async copies), rounded
    to TF32 for the tf32 precision, and the bias (C, K)."""

    def __init__(self, dictionary, similarity, compute, dot_dtype, round_tf32):
        heads, dim, bins = dictionary.shape
        _check_grid(heads, bins, dim)
        v, bias = project_dictionary(dictionary, similarity, compute)
        if heads * bins * _round_up16(dim) >= 2**31:
            raise ValueError(f"dictionary of shape {tuple(dictionary.shape)} is too large for "
                             "the Triton backend (C * K * D must stay below 2^31)")
        self.vt = torch.zeros(heads * bins, _round_up16(dim), dtype=dot_dtype,
                              device=dictionary.device)
        self.vt[:, :dim] = v.permute(0, 2, 1).reshape(heads * bins, dim)
        if round_tf32:
            self.vt = _round_to_tf32_torch(self.vt)
        # Zeros for dot and cosine: the kernels always add it (one specialisation fewer).
        self.bias = (torch.zeros(heads, bins, dtype=compute, device=dictionary.device)
                     if bias is None else bias.contiguous())
        self.heads, self.dim, self.bins = heads, dim, bins


def _check_grid(heads: int, bins: int, dim: int) -> None:
    """ValueError for sizes whose launch would exceed CUDA's grid limit (the cuda backend's
    grids are one-dimensional: it has no such limit)."""
    for name, size, per_program in (("heads (dictionary.shape[0])", heads, 1),
                                    ("bins (dictionary.shape[2])", bins, _GRID_Y_TILE),
                                    ("feature dimensions (dictionary.shape[1])", dim, _GRID_Y_TILE)):
        if size > MAX_GRID_Y * per_program:
            raise ValueError(
                f"the Triton backend handles at most {MAX_GRID_Y * per_program} {name} (its "
                f"kernels' grids have {MAX_GRID_Y} programs at most on their second axis), got "
                f"{size}; use backend='cuda' or backend='torch'")


def _projected(dictionary, similarity, compute, dot_dtype, round_tf32) -> _Projected:
    return derived(dictionary, (NAME, similarity, compute, dot_dtype, round_tf32),
                   lambda: _Projected(dictionary, similarity, compute, dot_dtype,
                                      round_tf32))


def _check_estimator(estimator: str) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _forward_config(dot_dtype, rows, dim, heads, bins, device):
    if _interpreting():  # few large programs: the interpreter's cost is per program and op
        cap = INTERPRETER_MAX_BLOCK
        return dict(BLOCK_B=_pow2(rows, 16, cap["rows"]), BLOCK_K=_pow2(bins, 16, cap["bins"]),
                    BLOCK_D=_pow2(dim, 16, cap["dim"])), {}
    if dot_dtype == torch.float64:
        return dict(BLOCK_B=32, BLOCK_K=32, BLOCK_D=16), dict(num_warps=4, num_stages=2)
    block_d = 64 if dot_dtype in (torch.float16, torch.bfloat16) else 32
    # Small batches (the few-shot shape: 256 rows, one head) would leave most SMs idle.
    block_b = 64 if _cdiv(rows, 64) * heads >= _multiprocessors(device) else 32
    # Eight warps for every tile size: with four, the 32-row tiles spill (ptxas stack frames of
    # 40-560 bytes, tests/triton_codegen.py); with eight, none does and registers drop ~20%.
    return (dict(BLOCK_B=block_b, BLOCK_K=_pow2(bins, 16, 128), BLOCK_D=_pow2(dim, 16, block_d)),
            dict(num_warps=8, num_stages=3))


def _grad_config(dot_dtype, rows, dim, heads, bins, device):
    if _interpreting():
        cap = INTERPRETER_MAX_BLOCK
        return dict(BLOCK_M=_pow2(rows, 16, cap["rows"]), BLOCK_N=_pow2(dim, 16, cap["dim"]),
                    BLOCK_K=_pow2(heads * bins, 16, cap["bins"])), {}
    if dot_dtype == torch.float64:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16), dict(num_warps=4, num_stages=2)
    block_k = 64 if dot_dtype in (torch.float16, torch.bfloat16) else 32
    block_n = _pow2(dim, 16, _GRID_Y_TILE)
    tiles = _cdiv(rows, 128) * _cdiv(dim, block_n)
    block_m = 128 if tiles >= _multiprocessors(device) else 64
    return (dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_pow2(heads * bins, 16, block_k)),
            dict(num_warps=8, num_stages=3))  # four spill at 64 rows (see _forward_config)


def _prepare(features, dictionary, similarity, estimator):
    """Checks, then (compute dtype, dot dtype, fp32 precision, round to tf32?, projection)."""
    _check_estimator(estimator)
    _check_runnable(features)
    compute = compute_dtype(features.dtype)
    dot_dtype = _dot_dtype(features)
    precision = _precision(dot_dtype, similarity)
    round_tf32 = dot_dtype == torch.float32 and precision == "tf32"
    proj = _projected(dictionary, similarity, compute, dot_dtype, round_tf32)
    return compute, dot_dtype, precision, round_tf32, proj


def histogram_forward(features, dictionary, similarity, estimator, tau, seed, row_offset):
    histogram, lse, _ = _forward(features, dictionary, similarity, estimator, tau, seed,
                                 row_offset, reduction=None)
    return histogram, lse


def _forward(features, dictionary, similarity, estimator, tau, seed, row_offset, reduction):
    """(histogram, lse, entropy): the forward and reduce kernels; with a `reduction`, the reduce
    kernel also writes the entropy where it runs as one program (small problems), otherwise
    `_entropy_kernel` does, after it. Without one, entropy is None."""
    compute, dot_dtype, precision, round_tf32, proj = _prepare(
        features, dictionary, similarity, estimator)
    rows, dim = features.shape
    heads, bins = proj.heads, proj.bins
    device = features.device
    blocks, launch = _forward_config(dot_dtype, rows, dim, heads, bins, device)
    num_blocks = _cdiv(rows, blocks["BLOCK_B"])
    programs = min(num_blocks, MAX_ROW_PROGRAMS)  # partial histograms: programs x C x K
    lse = torch.empty(rows, heads, dtype=compute, device=device)
    partial = torch.empty(programs, heads, bins, dtype=compute, device=device)
    bad = torch.empty(programs, heads, dtype=torch.int32, device=device)
    histogram = torch.empty(heads, bins, dtype=compute, device=device)
    mean = reduction == "mean"
    entropy = None if reduction is None else histogram.new_empty(() if mean else (heads,))
    tau_hi, tau_lo = _split_float(tau)
    seed_lo, seed_hi = _seed_words(seed)
    acc, hard = _TL_DTYPES[compute], estimator == "gumbel_hard"
    if _interpreting():
        cap = INTERPRETER_MAX_BLOCK
        reduce_blocks = dict(BLOCK_N=_pow2(programs, 16, cap["rows"]),
                             BLOCK_K=_pow2(bins, 16, cap["bins"]))
    else:
        reduce_blocks = dict(BLOCK_N=32, BLOCK_K=_pow2(bins, 16, _GRID_Y_TILE))
    one_program = programs * heads * bins <= REDUCE_ONE_PROGRAM_ENTRIES
    reduce_grid = (1, 1) if one_program else (heads, _cdiv(bins, reduce_blocks["BLOCK_K"]))
    with _device_guard(device):
        _forward_kernel[(programs, heads)](
            features, features.stride(0), features.stride(1), proj.vt, proj.vt.stride(0),
            proj.bias, lse, partial, bad, rows, num_blocks, dim, bins, heads, tau_hi, tau_lo,
            seed_lo, seed_hi, row_offset, ACC=acc, DOT=_TL_DTYPES[dot_dtype],
            PRECISION=precision, ROUND_TF32=round_tf32, HAS_SCALE=similarity == "cosine",
            NOISE=estimator != "softmax", HARD=hard, **blocks, **launch)
        _reduce_kernel[reduce_grid](
            partial, bad, histogram, histogram if entropy is None else entropy, rows, programs,
            heads, bins, ACC=acc, ENTROPY=entropy is not None and one_program, MEAN=mean,
            **reduce_blocks)
        if entropy is not None and not one_program:
            _entropy_kernel[(1,)](histogram, entropy, heads, bins, ACC=acc, MEAN=mean,
                                  BLOCK_K=_entropy_block(bins))
    return histogram, lse, entropy


def _chunk_rows(rows, heads, bins, dim, dot_dtype, out_dtype, align):
    """Rows per backward chunk: the y scratch within its budget, a multiple of `align`."""
    scratch_row = _round_up16(heads * bins) * torch.finfo(dot_dtype).bits // 8
    grad_bytes = rows * dim * torch.finfo(out_dtype).bits // 8
    budget = max(SCRATCH_MIN_BYTES, int(SCRATCH_FRACTION * grad_bytes))
    step = max(align, budget // scratch_row // align * align)
    # 32-bit offsets in the kernels: the scratch stays below 2^31 elements.
    step = min(step, max(align, (2**31 - 1) // _round_up16(heads * bins) // align * align))
    return min(step, _cdiv(rows, align) * align)


def histogram_backward(grad_histogram, features, dictionary, lse, similarity, estimator, tau,
                       seed, row_offset):
    prepared = _prepare(features, dictionary, similarity, estimator)
    # delta is invariant to a per-head shift of G; centring keeps e and t well conditioned.
    grad = grad_histogram.to(prepared[0])
    grad = (grad - grad.mean(dim=1, keepdim=True)).contiguous()
    return _backward(prepared, grad, features, lse, similarity, estimator, tau, seed, row_offset)


def _backward(prepared, grad, features, lse, similarity, estimator, tau, seed, row_offset,
              grad_entropy=None, reduction=None):
    """The gradient for the centred dL/dp `grad` (C, K) in the compute dtype, or, given
    `grad_entropy` (dL/dH) and its `reduction`, for the entropy of the histogram `grad`: the
    softmax kernel then forms dL/dp itself (_bins_grad)."""
    compute, dot_dtype, precision, round_tf32, proj = prepared
    rows, dim = features.shape
    heads, bins = proj.heads, proj.bins
    device = features.device
    lse = lse.to(compute).contiguous()
    # The scratch holds y (G - e) before the 1 / (B tau): for float16 features it is float32
    # (TF32-rounded, the gradient GEMM on TF32 tensor cores, as the cuda backend does), since
    # G reaches float16's 65504 as soon as a GradScaler scales dL/dH by 2^10 or so.
    scratch_dtype = torch.float32 if dot_dtype == torch.float16 else dot_dtype
    round_scratch = round_tf32 or dot_dtype == torch.float16
    fwd_blocks, fwd_launch = _forward_config(dot_dtype, rows, dim, heads, bins, device)
    grad_blocks, grad_launch = _grad_config(scratch_dtype, rows, dim, heads, bins, device)
    align = max(fwd_blocks["BLOCK_B"], grad_blocks["BLOCK_M"])
    step = _chunk_rows(rows, heads, bins, dim, scratch_dtype, features.dtype, align)
    # Scratch rows padded to 16 elements, like vt's, for aligned loads in the GEMM.
    delta = torch.empty(min(step, rows), _round_up16(heads * bins), dtype=scratch_dtype,
                        device=device)
    cosine = similarity == "cosine"
    t = torch.empty(rows, heads, dtype=compute, device=device) if cosine else lse
    scale = torch.empty(rows, dtype=compute, device=device) if cosine else lse
    grad_features = torch.empty(rows, dim, dtype=features.dtype, device=device)
    tau_hi, tau_lo = _split_float(tau)
    inv_hi, inv_lo = _split_float(1.0 / (rows * tau))
    seed_lo, seed_hi = _seed_words(seed)
    acc, dot = _TL_DTYPES[compute], _TL_DTYPES[dot_dtype]
    # dL/dH[h * stride] / divisor is head h's weight (runtime ints: one compiled kernel for both).
    weight_rule = (0, heads) if reduction == "mean" else (1, 1)
    with _device_guard(device):
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            _softmax_kernel[(_cdiv(stop - start, fwd_blocks["BLOCK_B"]), heads)](
                features, features.stride(0), features.stride(1), proj.vt, proj.vt.stride(0),
                proj.bias, lse, grad, grad if grad_entropy is None else grad_entropy,
                *weight_rule, delta, delta.stride(0), t, scale, start, stop, dim, bins, heads,
                tau_hi, tau_lo, seed_lo, seed_hi, row_offset, ACC=acc, DOT=dot,
                PRECISION=precision, ROUND_TF32=round_tf32, HAS_SCALE=cosine,
                NOISE=estimator != "softmax", FROM_ENTROPY=grad_entropy is not None,
                SCRATCH=_TL_DTYPES[scratch_dtype], ROUND_SCRATCH=round_scratch,
                **fwd_blocks, **fwd_launch)
            grid = (_cdiv(stop - start, grad_blocks["BLOCK_M"]),
                    _cdiv(dim, grad_blocks["BLOCK_N"]))
            _grad_kernel[grid](
                delta, delta.stride(0), proj.vt, proj.vt.stride(0), t, scale, features,
                features.stride(0), features.stride(1),
                grad_features, grad_features.stride(0), grad_features.stride(1), start, stop,
                dim, heads * bins, heads, inv_hi, inv_lo, ACC=acc, DOT=dot, PRECISION=precision,
                HAS_SCALE=cosine, **grad_blocks, **grad_launch)
    return grad_features


def _entropy_block(bins: int) -> int:
    cap = INTERPRETER_MAX_BLOCK["bins"] if _interpreting() else 1024
    return _pow2(bins, 16, cap)


def entropy_forward(features, dictionary, similarity, estimator, tau, seed, row_offset,
                    reduction):
    histogram, lse, entropy = _forward(features, dictionary, similarity, estimator, tau, seed,
                                       row_offset, reduction)
    return entropy, histogram, lse


def entropy_backward(grad_entropy, histogram, features, dictionary, lse, similarity, estimator,
                     tau, seed, row_offset, reduction):
    prepared = _prepare(features, dictionary, similarity, estimator)
    compute = prepared[0]
    return _backward(prepared, histogram.to(compute).contiguous(), features, lse, similarity,
                     estimator, tau, seed, row_offset,
                     grad_entropy=grad_entropy.to(compute).contiguous(), reduction=reduction)


def noise_words(seed: int, rows: int, heads: int, bins: int, row_offset: int = 0,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The noise words x[b, h, k] as the kernels draw them, (rows, heads, bins) int64: a debug
    launcher to compare with fierce_ext.noise.random_words."""
    device = torch.device(device)
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"backend 'triton' cannot run on {device}: {reason}")
    _check_grid(heads, 1, 1)  # its grid's second axis is the heads
    out = torch.empty(rows, heads, bins, dtype=torch.int64, device=device)
    if _interpreting():
        block_b = _pow2(rows, 16, INTERPRETER_MAX_BLOCK["rows"])
        block_k = _pow2(bins, 16, INTERPRETER_MAX_BLOCK["bins"])
    else:
        block_b, block_k = 32, 128
    seed_lo, seed_hi = _seed_words(seed)
    with _device_guard(device):
        noise_words_kernel[(_cdiv(rows, block_b), heads)](
            out, rows, heads, bins, (bins + 3) // 4, seed_lo, seed_hi, row_offset,
            BLOCK_B=block_b, BLOCK_K=block_k)
    return out
