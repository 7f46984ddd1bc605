"""The `torch` backend: memory-efficient pure PyTorch, the default on CPU.

The batch is processed in chunks of rows. The forward keeps only the histogram and the per-row
log-sum-exp of the logits; the backward recomputes each chunk's logits (same noise, from the
seed) and turns dL/dp into dL/dr with the closed form of README.md (The math):

    delta[b,h,k] = y[b,h,k] * (G[h,k] - sum_k' y[b,h,k'] G[h,k']) / (B * tau)
    dr_b         = a_b * sum_hk delta[b,h,k] v[h,:,k]  -  [cosine] a_b^2 (sum_hk delta s) r_b

Peak extra memory is O(chunk * C * K + B * C), never O(B * C * K). On the CPU, a batch that fits
in one chunk keeps that chunk's row scale, similarities and logits from the forward until its
backward, which then skips the recompute (a GEMM and a noise draw); see `_Kept`.
"""

from __future__ import annotations

import collections
import math
import threading

import numpy as np
import torch

from ..dictionary import derived, project_dictionary, row_scale, storage_state
from ..noise import gumbel_noise
from . import compute_dtype

NAME = "torch"

# Logits per chunk (rows * C * K). A few temporaries of this size live at once (logits, noise
# words, soft assignments), so 2^21 elements keep a chunk near 100 MB while the GEMMs stay large.
CHUNK_ELEMENTS = 2**21


def unavailable_reason(device: torch.device) -> str | None:
    return None


def _chunks(rows: int, heads: int, bins: int):
    step = max(1, CHUNK_ELEMENTS // (heads * bins))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class _Projected:
    """The dictionary in GEMM form: v as a (D, C*K) matrix and the bias c as (C, K) or None."""

    def __init__(self, dictionary: torch.Tensor, similarity: str, dtype: torch.dtype):
        heads, dim, bins = dictionary.shape
        v, self.bias = project_dictionary(dictionary, similarity, dtype)
        self.matrix = v.permute(1, 0, 2).reshape(dim, heads * bins)
        self.heads, self.bins = heads, bins


def _chunk_similarity(r, scale, proj: _Projected):
    """s = a * (r . v) + c for a chunk of rows, shape (n, C, K)."""
    s = (r @ proj.matrix).view(r.shape[0], proj.heads, proj.bins)
    if scale is not None:
        s = s * scale[:, :, None]
    if proj.bias is not None:
        s = s + proj.bias
    return s


def _chunk_logits(s, estimator, tau, seed, row_start):
    if estimator == "softmax":
        return s / tau
    n, heads, bins = s.shape
    z = gumbel_noise(seed, n, heads, bins, row_start, device=s.device, dtype=s.dtype).add_(s)
    return z if tau == 1.0 else z.div_(tau)


# On the CPU, torch.exp leaves its vector path wherever a result falls below the normal range, and
# products of such subnormal results (the backward's delta) are as slow: about 50x per element. The
# far bins of "distance" logits (the age experiment's) are all there. So on the CPU a logit's weight
# is taken at no less than e^-64 = 1.6e-28 of its row's largest one: 2^68 times below float32's
# resolution of the row's sum, far enough above 2^-126 that the backward's products stay normal.
# A logit of -inf (a bin masked by its bias) still weighs exactly 0. GPUs have no such slow path.
_EXP_FLOOR = -64.0


def _exp_(shifted: torch.Tensor) -> torch.Tensor:
    """exp, in place, of logits minus their row's max or lse (so <= 0 up to rounding)."""
    if not shifted.is_cpu:
        return shifted.exp_()
    masked = torch.isneginf(shifted) if shifted.amin().item() == -math.inf else None  # rare
    weights = shifted.clamp_(min=_EXP_FLOOR).exp_()
    return weights if masked is None else weights.masked_fill_(masked, 0.0)


def _projected(dictionary, similarity, dtype) -> _Projected:
    return derived(dictionary, (NAME, similarity, dtype),
                   lambda: _Projected(dictionary, similarity, dtype))


class _Kept:
    """(features, row scale, s, z) of one-chunk batches from the forward, for the backward of
    the same call.

    The key holds what the logits depend on: the features' and the dictionary's storage, layout
    and version counters, and the op's arguments. Version counters miss changes made through
    `.data` (gradcheck perturbs its inputs that way), so an entry also holds a copy of the
    features and the backward uses it only if the bits are still equal (a copy of B x D,
    against the B x C x K x D GEMM it saves). The backward takes its entry out, so nothing
    outlives a training step; forwards without a backward (evaluation) leave at most ENTRIES
    entries behind.
    """

    ENTRIES = 2

    def __init__(self):
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(features, dictionary, *options):
        """The entry's key, or None where nothing is kept: off the CPU (the backward's check of
        the features' bits would be a host sync on a GPU) and for inference tensors (no
        version counters)."""
        if (features.device.type != "cpu" or features.is_inference()
                or dictionary.is_inference()):
            return None
        return (storage_state(features), storage_state(dictionary)) + options

    def put(self, key, value) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.ENTRIES:
                self._entries.popitem(last=False)

    def take(self, key):
        with self._lock:
            return self._entries.pop(key, None)


_kept = _Kept()

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two CPU tensors of one dtype and shape hold the same bits (the same bits give the
    same logits). numpy compares ~3x faster than torch.equal, which also says NaN != NaN."""
    as_int = _INT_OF_SIZE[a.element_size()]
    return np.array_equal(a.detach().view(as_int).numpy(), b.detach().view(as_int).numpy())


def histogram_forward(features, dictionary, similarity, estimator, tau, seed, row_offset):
    dtype = compute_dtype(features.dtype)
    proj = _projected(dictionary, similarity, dtype)
    rows = features.shape[0]
    one_chunk = rows * proj.heads * proj.bins <= CHUNK_ELEMENTS
    key = _Kept.key(features, dictionary, similarity, estimator, tau, seed, row_offset) \
        if one_chunk else None
    histogram = torch.zeros(proj.heads, proj.bins, dtype=dtype, device=features.device)
    lse = torch.empty(rows, proj.heads, dtype=dtype, device=features.device)
    for start, stop in _chunks(rows, proj.heads, proj.bins):
        r = features[start:stop].to(dtype)
        scale = row_scale(r, similarity)
        s = _chunk_similarity(r, scale, proj)
        z = _chunk_logits(s, estimator, tau, seed, row_offset + start)
        peak = z.amax(dim=-1, keepdim=True)
        weights = _exp_(z - peak)  # the softmax's numerators
        total = weights.sum(dim=-1)
        lse[start:stop] = chunk_lse = peak.squeeze(-1) + total.log()
        if key is not None:  # one chunk: this is the whole batch
            _kept.put(key, (features.clone(), scale, s, z))
        if estimator == "gumbel_hard":
            winners = z.argmax(dim=-1)  # ties go to the lowest bin, as torch.argmax documents
            histogram.scatter_add_(1, winners.T, torch.ones_like(winners.T, dtype=dtype))
        else:
            histogram += weights.div_(total[:, :, None]).sum(dim=0)
        # A row with a non-finite logit has a non-finite lse: poison every bin, not just some
        # (an argmax or a softmax would otherwise turn it into plausible numbers).
        histogram += torch.where(torch.isfinite(chunk_lse).all(), 0.0, torch.nan)
    return histogram / rows, lse


def histogram_backward(grad_histogram, features, dictionary, lse, similarity, estimator, tau,
                       seed, row_offset):
    dtype = compute_dtype(features.dtype)
    proj = _projected(dictionary, similarity, dtype)
    rows = features.shape[0]
    grad = grad_histogram.to(dtype)
    grad_features = torch.empty_like(features)
    key = _Kept.key(features, dictionary, similarity, estimator, tau, seed, row_offset)
    kept = _kept.take(key) if key is not None else None
    if kept is not None and not _same_bits(kept[0], features):
        kept = None
    # fp32/fp64 features: the GEMM writes the gradient rows in place.
    write_in_place = features.dtype == dtype and grad_features.is_contiguous()
    for start, stop in _chunks(rows, proj.heads, proj.bins):
        r = features[start:stop].to(dtype)
        if kept is not None:  # one chunk: the forward's own row scale, s and z
            _, scale, s, z = kept
        else:
            scale = row_scale(r, similarity)
            s = _chunk_similarity(r, scale, proj)
            z = _chunk_logits(s, estimator, tau, seed, row_offset + start)
        y = _exp_(z - lse[start:stop, :, None])
        # Renormalised: lse is rounded to ulp(lse), which scales a row of y by up to
        # 1 +- ulp(lse)/2 (5e-4 at the age experiment's logits, ~1e4). Then sum_k delta, which
        # the gradient formula takes to be 0, is not, and for `distance` (whose logits drop
        # the -|r|^2 term that would cancel it) the error grows with |r|.
        y.div_(y.sum(dim=-1, keepdim=True))
        expected = (y * grad).sum(dim=-1, keepdim=True)
        delta = y.mul_(grad - expected).div_(rows * tau)  # y is not needed again
        delta_rows = delta.view(stop - start, -1)
        out = grad_features[start:stop] if write_in_place else None
        if scale is None:
            dr = torch.mm(delta_rows, proj.matrix.T, out=out)
        else:  # cosine: a_b [(delta . v) - a_b (sum_hk delta s) r_b]; never a_b^2, which
            # underflows float32 for |r_b| past ~1e19 (and is 0 past ~1e23)
            correction = scale * (delta * s).sum(dim=(1, 2))[:, None]
            dr = torch.addmm(r * -correction, delta_rows, proj.matrix.T, out=out).mul_(scale)
        if not write_in_place:
            grad_features[start:stop] = dr
    return grad_features
