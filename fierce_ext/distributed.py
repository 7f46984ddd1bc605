"""The entropy of the global batch across torch.distributed processes (`sync=True`).

With data parallelism each process sees B_r rows; FIERCE's histogram is a batch statistic, so
like SyncBatchNorm the processes of a group can estimate it on the global batch of B = sum_r B_r
rows instead of their own:

    p_global = (sum_r B_r * p_r) / B            one all_reduce of (C, K) values
    row_offset_r = sum_{q < r} B_q             the global index of rank r's first row

`histogram`, `entropy`, `FeatureEntropy` and `FIERCELoss` take `sync=True` (the default group,
the world) or `process_group=` (that group). Then:

- Noise: every rank uses the seed of the group's first rank (given or drawn from its default
  generator), and row b of rank r draws the noise of global row row_offset_r + b. The histogram
  and the entropy are those of one process holding the concatenated batch (rank order), whatever
  the split, uneven batch sizes included (up to floating-point summation order). A rank may
  hold no rows at all (the last, short batch of an epoch, say): it adds nothing to the
  histogram, still takes part in both collectives, and its features get an empty gradient; an
  empty global batch raises a ValueError on every rank.
- Gradients (SyncBatchNorm's semantics): every rank's loss contains the same H(p_global); the
  backward all-reduces (sums) the incoming histogram gradient, so rank r's feature gradient is the
  gradient of the SUM over ranks of the ranks' losses w.r.t. its rows, i.e. world_size times the
  gradient a single process would give those rows for H of the global batch. DDP then averages
  parameter gradients over ranks, which divides by world_size again: a DDP step with
  `FIERCELoss(..., sync=True)` equals a single-process step on the concatenated batch (for the
  criterion part this needs equal per-rank batch sizes, as for any mean-reduced loss under DDP).
  Every rank of the group must run the forward and the backward (each is a collective).
- Cost per call: one all_gather of two int64 per rank (batch sizes and seed) and one all_reduce
  of C x K floats in the forward, one more all_reduce of C x K floats in the backward. The
  collectives use tensors on the features' device (CPU for gloo, CUDA for NCCL).
- Without an initialised process group (`torch.distributed` unavailable or
  `init_process_group` not called), `sync=True` is the single-process computation.
- torch.compile: the synchronised path runs eagerly (`torch.compiler.disable`, a graph break, so
  `fullgraph=True` with an initialised group fails); without a process group it traces as usual.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import backends, noise, ops


def may_sync(sync: bool, process_group) -> bool:
    """Whether a call with these arguments synchronises (if they are valid: the caller checks
    them afterwards), i.e. asks for it and torch.distributed has an initialised process group."""
    return ((sync is True or process_group is not None) and dist.is_available()
            and dist.is_initialized())


def active_group(process_group=None):
    """The group to synchronise over (`process_group`, or the world when None), or None when
    torch.distributed has no initialised process group (then everything is single-process)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    if process_group is None:
        return dist.group.WORLD
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    return process_group


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group in the forward; in the backward, the sum over the group of the
    incoming gradients (the gradient of the sum of all ranks' losses)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        total = tensor.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(tensor: Tensor, group=None) -> Tensor:
    """Differentiable all_reduce (sum) with SyncBatchNorm-style backward (see module doc)."""
    return _AllReduceSum.apply(tensor, group if group is not None else dist.group.WORLD)


def batch_layout(rows: int, seed: Tensor, device: torch.device, group) -> tuple[int, int, Tensor]:
    """(rows before this rank, global rows, the first rank's seed) from one all_gather."""
    mine = torch.stack([torch.tensor(rows, dtype=torch.int64), seed.to(torch.int64)]).to(device)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu()
    sizes = table[:, 0].tolist()
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes), table[0, 1].clone()


@torch.compiler.disable
def global_histogram(features: Tensor, dictionary: Tensor, seed: Tensor, similarity: str,
                     estimator: str, tau: float, row_offset: int, backend: str, group) -> Tensor:
    """The histogram (C, K) of the global batch of `group`, on every rank (arguments as for
    `fierce_ext.ops.histogram`; `row_offset` is added to the global offset of this rank)."""
    if torch._C._are_functorch_transforms_active():
        raise NotImplementedError("sync=True / process_group= (the histogram of the global batch) "
                                  "runs under plain autograd only, not under torch.func "
                                  "transforms")
    rows = features.shape[0]
    before, total, seed = batch_layout(rows, seed, features.device, group)
    if total == 0:  # every rank knows it now: all raise, none waits
        raise ValueError("features must hold at least one row in the global batch: every rank "
                         "of the process group has batch size 0")
    # The global rows' noise counters, checked on every rank alike before the next collective
    # (a check of this rank's rows alone could stop some ranks and leave the others waiting).
    noise.check_rows(row_offset, total, dictionary.shape[0], dictionary.shape[2])
    if rows == 0:  # a share with no rows: weight 0 below; the sum keeps features in the graph
        compute = backends.compute_dtype(features.dtype)
        local = features.new_zeros(dictionary.shape[0], dictionary.shape[2], dtype=compute) \
            + features.sum().to(compute)
    else:
        local, _ = ops.histogram(features, dictionary, seed, similarity, estimator, tau,
                                 row_offset + before, backend)
    # Weight by the local batch size so that uneven splits average over rows, not ranks.
    return all_reduce_sum(local * rows, group) / total
