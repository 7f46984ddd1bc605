"""Independent oracles the backends are tested against.

* `oracle`: the FIERCE histogram and its gradient in float64 with plain torch autograd, written
  from the definitions (README.md, The math) and sharing no code with fierce_ext except the documented
  noise rule (`fierce_ext.noise.gumbel_noise`, itself checked bit for bit against the numpy
  implementation below).
* `numpy_random_words` / `numpy_gumbel`: the noise rule of fierce_ext/noise.py, re-implemented
  with numpy uint32/uint64 arithmetic, for bit-exact comparison.
* `top2_margin`, `projected_logits64`, `near_tie_count`, `gradient_magnitude`: the pieces of the
  error models the fast backends' tests (CPU, emulated and GPU) state their tolerances with.
* `large_logit_problem`, `check_large_logits`: the age experiment's float32 term, whose
  large logits test how a backward recovers the softmax from the saved log-sum-exp.
* `huge_row_problem`, `check_huge_rows`: float32 cosine rows whose norm overflows when squared.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

import fierce_ext
from fierce_ext.noise import gumbel_noise

SIMILARITIES = ("dot", "cosine", "distance")
ESTIMATORS = ("gumbel_hard", "gumbel_soft", "softmax")

# Backends this suite compares with the oracle: whatever runs on the CPU, except Triton, whose
# interpreted runs are slow and which its own test files cover.
CPU_BACKENDS = tuple(
    name for name, status in fierce_ext.available_backends("cpu").items()
    if status.available and name != "triton")
# The package promises these two on every CPU: a load failure must fail loudly here, never
# quietly shorten the parametrisation.
if not {"reference", "torch"} <= set(CPU_BACKENDS):
    raise RuntimeError(f"reference/torch backends unavailable on CPU: "
                       f"{fierce_ext.available_backends('cpu')}")


class OracleResult(NamedTuple):
    histogram: torch.Tensor        # (C, K) float64
    grad: torch.Tensor | None      # (B, D) float64: d sum(histogram * G) / d features
    logits: torch.Tensor           # (B, C, K) float64: z = (s + g) / tau
    similarity: torch.Tensor       # (B, C, K) float64: s


def similarity_f64(r: torch.Tensor, w: torch.Tensor, similarity: str) -> torch.Tensor:
    """s[b, h, k] in float64, from the definitions (differentiable w.r.t. r)."""
    if similarity == "dot":
        return torch.einsum("bd,hdk->bhk", r, w)
    if similarity == "cosine":  # the paper's form: the einsum over the outer product of norms
        norms = r.norm(dim=1)[:, None, None] * w.norm(dim=1)[None, :, :]
        return torch.einsum("bd,hdk->bhk", r, w) / norms
    if similarity == "distance":  # -|r_b - w_hk|^2, by explicit differences (no GEMM expansion)
        heads = w.shape[0]
        d = torch.cdist(r.unsqueeze(0).expand(heads, -1, -1), w.transpose(1, 2),
                        compute_mode="donot_use_mm_for_euclid_dist")  # (C, B, K)
        return -(d * d).permute(1, 0, 2)
    raise ValueError(similarity)


def oracle(features: torch.Tensor, dictionary: torch.Tensor, *, similarity: str,
           estimator: str, tau: float, seed: int, row_offset: int = 0,
           grad_histogram: torch.Tensor | None = None) -> OracleResult:
    """Histogram p (C, K) and, given G = dL/dp, dL/dfeatures, all in float64 via autograd."""
    r = features.detach().to(torch.float64).requires_grad_(grad_histogram is not None)
    w = dictionary.detach().to(torch.float64)
    s = similarity_f64(r, w, similarity)
    rows, heads, bins = s.shape
    z = s
    if estimator != "softmax":
        z = s + gumbel_noise(seed, rows, heads, bins, row_offset, dtype=torch.float64)
    z = z / tau
    y = torch.softmax(z, dim=-1)
    if estimator == "gumbel_hard":
        # Straight-through: the value is the hard one-hot (ties: torch.argmax takes the first),
        # the gradient is softmax's. hard + (y - y.detach()) is exactly `hard` in value.
        hard = torch.nn.functional.one_hot(z.argmax(dim=-1), bins).to(torch.float64)
        e = hard + (y - y.detach())
    else:
        e = y
    p = e.mean(dim=0)
    grad = None
    if grad_histogram is not None:
        (grad,) = torch.autograd.grad((p * grad_histogram.to(torch.float64)).sum(), r)
    return OracleResult(p.detach(), grad, z.detach(), s.detach())


def entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Per-head entropy in bits of a (C, K) float64 histogram, 0 log 0 = 0."""
    logs = torch.where(p > 0, torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p))
    return -(p * logs).sum(dim=1)


def top2_margin(z: torch.Tensor) -> torch.Tensor:
    """z[top1] - z[top2] over the last axis (+inf when there is a single bin)."""
    if z.shape[-1] == 1:
        return torch.full(z.shape[:-1], math.inf, dtype=z.dtype, device=z.device)
    top = z.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def near_tie_count(r, v, bias, operand, eps, similarity, tau, seed, row_offset) -> int:
    """How many (row, head) pairs have a float64 top-2 logit margin below twice a bound on a
    kernel's logit error: u a_b max_k sum_d |r_d| |v_kd| / tau, u = operand + (D + 2) eps for the
    operands' rounding and the accumulation, plus a few ulps of the logit. r (B, D) and v
    (H, K, D): float64, as the kernel multiplies them; bias (H, K) or None, added after the GEMM
    in the compute dtype (no operand rounding: the ulps cover it)."""
    u = operand + (r.shape[1] + 2) * eps
    scale = torch.ones(r.shape[0], dtype=torch.float64, device=r.device)
    if similarity == "cosine":
        scale = 1 / r.norm(dim=1).clamp_min(1e-12)
    s = torch.einsum("bd,hkd->bhk", r, v) * scale[:, None, None]
    magnitude = torch.einsum("bd,hkd->bhk", r.abs(), v.abs()) * scale[:, None, None]
    if bias is not None:
        s = s + bias.double()
    rows, heads, bins = s.shape
    if bins == 1:
        return 0
    z = (s + gumbel_noise(seed, rows, heads, bins, row_offset, device=r.device,
                          dtype=torch.float64)) / tau
    top = z.topk(2, dim=-1).values
    error = u * magnitude.amax(dim=-1) / tau + 8 * eps * (1 + top[..., 0].abs())
    return int(((top[..., 0] - top[..., 1]) < 2 * error).sum())


def gradient_magnitude(z, s, v, a, grad, features, similarity, tau):
    """Per element of d sum(histogram * G) / d features, the size of the terms a backward sums,
    in float64: a_b sum_hk w_bhk |v_hdk| with w = y (|G - e| + sum_j y_j |G_j - mean G|) / (B tau),
    i.e. |delta| plus what an error in e = sum_k y G moves it by, and for cosine the row-scale
    term a_b^2 (sum_hk w |s|) |r_d|. Error bounds scale it by the relative error of the inputs.
    (z, s, v, a) as projected_logits64 returns them; grad (C, K)."""
    rows = features.shape[0]
    y = torch.softmax(z, dim=-1)
    g = grad.double()
    g_centred = g - g.mean(dim=1, keepdim=True)
    weight = y * ((g - (y * g).sum(dim=-1, keepdim=True)).abs()
                  + (y * g_centred.abs()).sum(dim=-1, keepdim=True)) / (rows * tau)
    magnitude = a[:, None] * torch.einsum("bhk,hdk->bd", weight, v.abs())
    if similarity == "cosine":
        magnitude += (a * a * (weight * s.abs()).sum(dim=(1, 2)))[:, None] \
            * features.double().abs()
    return magnitude


def projected_logits64(features, dictionary, similarity, estimator, tau, seed, row_offset):
    """float64 (z, s, v, a, bias) in the projected form s = a (r . v) + c that the fast backends
    compute (fierce_ext.dictionary's projection: not independent, but what the Triton tests'
    error bounds are stated in), on the features' device; a is all ones when there is no row
    scale."""
    from fierce_ext.dictionary import project_dictionary, row_scale

    r = features.double()
    v, bias = project_dictionary(dictionary, similarity, torch.float64)
    s = torch.einsum("bd,hdk->bhk", r, v)
    a = row_scale(r, similarity)
    if a is not None:
        s = s * a[:, :, None]
    if bias is not None:
        s = s + bias
    z = s
    if estimator != "softmax":
        rows, heads, bins = s.shape
        z = s + gumbel_noise(seed, rows, heads, bins, row_offset, device=s.device,
                             dtype=torch.float64)
    a = torch.ones(r.shape[0], dtype=torch.float64, device=r.device) if a is None else a[:, 0]
    return z / tau, s, v, a, bias


def large_logit_problem(rows: int = 64, bins: int = 100, seed: int = 0):
    """The age experiment's FIERCE term in float32, where the logits are large: D = 1, bins
    spread over 1..100, features ~ N(50, 20^2), `distance` (logits up to ~1e4, ulp ~1e-3).
    (features, dictionary, grad_histogram)."""
    gen = torch.Generator().manual_seed(seed)
    features = 50 + 20 * torch.randn(rows, 1, generator=gen)
    dictionary = fierce_ext.bin_dictionary(bins, 1.0, 100.0)
    return features, dictionary, torch.randn(1, bins, generator=gen)


def check_large_logits(histogram, grad, features, dictionary, grad_histogram, estimator, seed):
    """A float32 histogram and gradient of sum(histogram * grad_histogram) for
    large_logit_problem against the float64 oracle: the logits' own rounding (a few eps |z|)
    moves each softmax weight by that much relatively, and the soft histogram and the gradient
    with it. (A backward that took sum_k exp(z - lse) to be 1 was off by 3-28% here: lse's
    rounding breaks sum_k delta = 0, and `distance`'s dropped -|r|^2 term turns that into an
    error of size |r|; a forward that summed exp(z - lse) had rows off by up to 5e-4.)"""
    ref = oracle(features, dictionary, similarity="distance", estimator=estimator, tau=1.0,
                 seed=seed, grad_histogram=grad_histogram)
    bound = 4 * torch.finfo(torch.float32).eps * ref.logits.abs().max().item()
    if estimator != "gumbel_hard":  # (hard counts may move at near ties: tested elsewhere)
        excess = (histogram.double().cpu() - ref.histogram).abs() - bound * ref.histogram
        assert excess.max().item() <= 1e-7, excess.max().item()
    error = ((grad.double().cpu() - ref.grad).abs().max() / ref.grad.abs().max()).item()
    assert error <= bound, (error, bound)


# Row magnitudes of huge_row_problem: |r|^2 fits float32, overflows it (~1.8e19 is the limit),
# and a^2 = 1/|r|^2 is subnormal (1e20) or 0 (1e25, 1e30) in float32.
HUGE_ROW_MAGNITUDES = (1.0, 1e20, 1e25, 1e30)


def huge_row_problem(rows: int = 12, dim: int = 5, bins: int = 7, heads: int = 2):
    """float64 (features, dictionary, magnitudes): rows of ~unit norm and, per row, one of
    HUGE_ROW_MAGNITUDES to scale it by in float32."""
    gen = torch.Generator().manual_seed(11)
    features = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    dictionary = fierce_ext.uniform_dictionary(dim, bins, heads, dtype=torch.float64)
    magnitudes = torch.tensor(HUGE_ROW_MAGNITUDES, dtype=torch.float64).repeat(rows)[:rows]
    return features, dictionary, magnitudes[:, None]


def check_huge_rows(run, estimator: str = "softmax", seed: int = 5):
    """run(features32, dictionary32, grad_histogram32) -> (histogram, grad_features) of a backend
    in float32, on the rows of huge_row_problem scaled by their magnitudes. Cosine is scale
    invariant: the histogram must be the float64 oracle's of the unscaled rows, and each row's
    gradient that row's oracle gradient / its magnitude. (Float32 kernels that squared |r| had
    uniform histograms past |r| ~ 1.8e19; a backward that formed a^2 lost the cosine correction
    past ~1e23.)"""
    features, dictionary, magnitudes = huge_row_problem()
    grad_histogram = torch.randn(dictionary.shape[0], dictionary.shape[2], dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(12))
    ref = oracle(features, dictionary, similarity="cosine", estimator=estimator, tau=1.0,
                 seed=seed, grad_histogram=grad_histogram)
    histogram, grad = run((features * magnitudes).float(), dictionary.float(),
                          grad_histogram.float())
    torch.testing.assert_close(histogram.double().cpu(), ref.histogram, rtol=1e-5, atol=1e-6)
    unscaled = grad.double().cpu() * magnitudes
    error = ((unscaled - ref.grad).abs().max() / ref.grad.abs().max()).item()
    assert error <= 1e-4, error


def backend_pass(backend, features, dictionary, grad, similarity, estimator, tau, seed,
                 row_offset):
    """(histogram, lse, grad_features) of a backend module's forward, then its backward of the
    histogram gradient `grad` (cast to the histogram's dtype)."""
    hist, lse = backend.histogram_forward(features, dictionary, similarity, estimator, tau, seed,
                                          row_offset)
    grad_features = backend.histogram_backward(grad.to(hist.dtype), features, dictionary, lse,
                                               similarity, estimator, tau, seed, row_offset)
    return hist, lse, grad_features


# ----------------------------------------------------------------- numpy Philox noise rule

_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_LO = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)


def numpy_philox4x32_10(counter: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 (Salmon et al., SC'11). counter: (..., 4) uint32; returns (..., 4) uint32."""
    c = [counter[..., i].astype(np.uint64) for i in range(4)]
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    for round_index in range(10):
        if round_index:
            k0, k1 = (k0 + _W0) & 0xFFFFFFFF, (k1 + _W1) & 0xFFFFFFFF
        p0, p1 = _M0 * c[0], _M1 * c[2]  # 32 x 32 -> 64 bits, exact in uint64
        c = [(p1 >> _32) ^ c[1] ^ np.uint64(k0), p1 & _LO,
             (p0 >> _32) ^ c[3] ^ np.uint64(k1), p0 & _LO]
    return np.stack(c, axis=-1).astype(np.uint32)


def numpy_random_words(seed: int, rows: int, heads: int, bins: int,
                       row_offset: int = 0) -> np.ndarray:
    """The 32-bit words x[b, h, k] of the rule in fierce_ext/noise.py: (rows, heads, bins)
    uint32."""
    quads = -(-bins // 4)
    b = np.arange(rows, dtype=np.uint64)[:, None, None] + np.uint64(row_offset)
    h = np.arange(heads, dtype=np.uint64)[None, :, None]
    k = np.arange(bins, dtype=np.uint64)[None, None, :]
    n = (b * np.uint64(heads) + h) * np.uint64(quads) + k // np.uint64(4)
    counter = np.stack([n & _LO, n >> _32, np.zeros_like(n), np.zeros_like(n)], axis=-1)
    out = numpy_philox4x32_10(counter.astype(np.uint32), (seed & 0xFFFFFFFF, seed >> 32))
    lane = (k % np.uint64(4)).astype(np.intp)
    return np.take_along_axis(out, np.broadcast_to(lane, n.shape)[..., None], axis=-1)[..., 0]


def numpy_uniform(words: np.ndarray) -> np.ndarray:
    """u = (2 (x >> 9) + 1) / 2^24, float64 (exact)."""
    return ((words >> np.uint32(9)).astype(np.float64) * 2 + 1) / 2.0**24


def numpy_gumbel(seed: int, rows: int, heads: int, bins: int, row_offset: int = 0) -> np.ndarray:
    return -np.log(-np.log(numpy_uniform(numpy_random_words(seed, rows, heads, bins,
                                                            row_offset))))
