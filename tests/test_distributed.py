"""sync=True across torch.distributed processes: CPU, gloo, 2 spawned processes on 127.0.0.1.

Reference: one process holding the concatenated batch (rank 0's rows first), same seed. Checked:
- the histogram and the entropy on every rank equal the reference's, for even and uneven splits;
- per-row feature gradients: rank r's rows get world_size x the reference gradient of those rows
  (SyncBatchNorm semantics: the gradient of the sum over ranks of the ranks' identical losses);
- seed=None: every rank uses the first rank's seed, whatever its own generator state;
- NaN features on one rank make the histogram NaN on every rank;
- a rank with no rows contributes nothing; an empty global batch raises on every rank;
- a DDP step with FIERCELoss(sync=True) and SGD leaves the parameters of a single-process step
  on the whole batch (equal per-rank batch sizes, since the cross-entropy is a per-rank mean).
Every check runs inside the workers; a failure there fails the test through mp.spawn.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fierce_ext
from fierce_ext.noise import draw_seed

WORLD = 2
BINS = 12

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(worker, *args):
    mp.spawn(_bootstrap, args=(worker, _free_port()) + args, nprocs=WORLD, join=True)


def _bootstrap(rank, worker, port, *args):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)  # two processes on a small machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        # Barriers: a rank that finishes early must not close its connections while the other
        # is still connecting or receiving (gloo then fails with "Connection closed by peer").
        dist.barrier()
        worker(rank, *args)
        dist.barrier()
    except BaseException:
        traceback.print_exc()  # to the test's captured stderr; mp.spawn reports the exit code
        _leave(1)
    _leave(0)


def _leave(status: int) -> None:
    """End a worker without destroying its process group, neither here nor at interpreter exit:
    before torch 2.8, ProcessGroupGloo's destructor holds the GIL while it waits for a gloo
    thread that may need the GIL to free a tensor of a finished collective (pytorch/pytorch
    #56297, fixed by #154976). That deadlock hung a CI run on torch 2.4.1 for good. After the
    final barrier every collective is done, so nothing is lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _split(full, sizes, rank):
    start = sum(sizes[:rank])
    return full[start:start + sizes[rank]]


def _gathered(tensor):
    out = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(out, tensor.contiguous())
    return out


CASES = [  # (per-rank batch sizes, similarity, estimator, dtype, heads)
    ((8, 8), "cosine", "gumbel_hard", torch.float64, 1),
    ((5, 11), "dot", "gumbel_soft", torch.float64, 2),
    ((13, 3), "distance", "softmax", torch.float64, 2),
    ((7, 10), "cosine", "gumbel_hard", torch.float32, 3),
]


def _histogram_worker(rank):
    for sizes, similarity, estimator, dtype, heads in CASES:
        generator = torch.Generator().manual_seed(sum(sizes))
        full = torch.randn(sum(sizes), 5, generator=generator, dtype=dtype)
        dictionary = fierce_ext.uniform_dictionary(5, BINS, heads, dtype=dtype)
        weights = torch.randn(heads, BINS, generator=generator, dtype=dtype)  # a generic dL/dp
        kwargs = dict(similarity=similarity, estimator=estimator, tau=0.5, seed=321)
        tight = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else {}
        context = f"rank {rank}, case {sizes, similarity, estimator, dtype}"

        reference_rows = full.clone().requires_grad_()
        reference = fierce_ext.histogram(reference_rows, dictionary, **kwargs)
        reference_entropy = fierce_ext.histogram_entropy(reference)
        (reference_grad,) = torch.autograd.grad(
            (reference * weights).sum() - reference_entropy, reference_rows)

        rows = _split(full, sizes, rank).clone().requires_grad_()
        hist = fierce_ext.histogram(rows, dictionary, sync=True, **kwargs)
        entropy = fierce_ext.histogram_entropy(hist)
        torch.testing.assert_close(hist, reference, **tight, msg=f"histogram, {context}")
        torch.testing.assert_close(entropy, reference_entropy, **tight, msg=f"entropy, {context}")
        ((hist * weights).sum() - entropy).backward()
        torch.testing.assert_close(rows.grad, WORLD * _split(reference_grad, sizes, rank),
                                   **tight, msg=f"feature gradient, {context}")
        assert rows.grad.abs().sum() > 0, context

        # entropy() and an explicit process group give the same global value.
        group = dist.new_group(list(range(WORLD)))
        value = fierce_ext.entropy(_split(full, sizes, rank), dictionary, process_group=group,
                                   **kwargs)
        torch.testing.assert_close(value, reference_entropy, **tight, msg=f"entropy(), {context}")

    # seed=None: ranks draw different seeds locally, but all must use rank 0's.
    full = torch.randn(20, 4, generator=torch.Generator().manual_seed(9))
    dictionary = fierce_ext.uniform_dictionary(4, BINS, 1)
    torch.manual_seed(1000)
    rank0_seed = int(draw_seed())
    torch.manual_seed(1000 + rank)
    hist = fierce_ext.histogram(_split(full, (9, 11), rank), dictionary, sync=True)
    reference = fierce_ext.histogram(full, dictionary, seed=rank0_seed)
    torch.testing.assert_close(hist, reference)
    other = _gathered(hist)
    torch.testing.assert_close(other[0], other[1], rtol=0, atol=0)

    # NaN in one rank's rows poisons the global histogram on every rank.
    rows = _split(full, (9, 11), rank).clone()
    if rank == 1:
        rows[3, 0] = float("nan")
    hist = fierce_ext.histogram(rows, dictionary, seed=1, sync=True)
    assert torch.isnan(hist).all(), f"rank {rank}: NaN did not propagate"

    # Noise counters past 2^63: the global rows decide, on every rank alike. Here rank 0's own
    # rows would fit but the global batch does not; a per-rank check would stop rank 1 only and
    # leave rank 0 waiting in the all_reduce.
    limit = 2**63 // 3  # 1 head, ceil(12 / 4) = 3 counters per row
    try:
        fierce_ext.histogram(_split(full, (9, 11), rank), dictionary, seed=1, sync=True,
                             row_offset=limit - 15)
    except ValueError as error:
        assert "row_offset" in str(error), error
    else:
        raise AssertionError(f"rank {rank}: rows past the noise counter's range were accepted")
    hist = fierce_ext.histogram(_split(full, (9, 11), rank), dictionary, seed=1, sync=True,
                                row_offset=limit - 20)
    torch.testing.assert_close(hist, fierce_ext.histogram(full, dictionary, seed=1,
                                                          row_offset=limit - 20))

    # A rank without rows (an epoch's short last batch): the other rank's rows make the
    # histogram, both take part in the collectives, the empty rank's features get an empty
    # gradient. Every rank empty: a ValueError on each, none left waiting.
    for estimator in ("gumbel_hard", "softmax"):
        kwargs = dict(estimator=estimator, seed=5)
        reference_rows = full.clone().requires_grad_()
        reference = fierce_ext.entropy(reference_rows, dictionary, **kwargs)
        (reference_grad,) = torch.autograd.grad(reference, reference_rows)
        rows = _split(full, (20, 0), rank).clone().requires_grad_()
        value = fierce_ext.entropy(rows, dictionary, sync=True, **kwargs)
        torch.testing.assert_close(value, reference)
        value.backward()
        assert rows.grad.shape == rows.shape
        torch.testing.assert_close(rows.grad, WORLD * _split(reference_grad, (20, 0), rank))
    try:
        fierce_ext.histogram(full[:0], dictionary, sync=True)
    except ValueError as error:
        assert "global batch" in str(error), error
    else:
        raise AssertionError(f"rank {rank}: an empty global batch was accepted")

    # The collectives' autograd is eager only: torch.func transforms get a clear error.
    try:
        torch.func.grad(lambda x: fierce_ext.entropy(x, dictionary, sync=True, seed=1))(full)
    except NotImplementedError as error:
        assert "torch.func" in str(error)
    else:
        raise AssertionError("sync=True ran under torch.func.grad")

    try:
        fierce_ext.histogram(full, dictionary, process_group="world")
    except TypeError as error:
        assert "process_group" in str(error)
    else:
        raise AssertionError("a non-ProcessGroup process_group was accepted")


def test_sync_histogram_entropy_and_gradients_match_single_process():
    _run(_histogram_worker)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), features


def _train(model, criterion, x, target, steps, lr=0.5):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        logits, features = model(x)
        criterion(logits, target, features, seed=step + 7).backward()
        optimizer.step()


def _ddp_worker(rank, per_rank, steps):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(WORLD * per_rank, 6, generator=generator)
    target = torch.randint(0, 3, (WORLD * per_rank,), generator=generator)
    torch.manual_seed(42)
    reference = _Net()
    model = nn.parallel.DistributedDataParallel(_Net())
    model.module.load_state_dict(reference.state_dict())
    initial = {k: v.clone() for k, v in reference.state_dict().items()}

    _train(reference, fierce_ext.FIERCELoss(8, lam=2.0, bins=BINS), x, target, steps)
    sizes = (per_rank,) * WORLD
    criterion = fierce_ext.FIERCELoss(8, lam=2.0, bins=BINS, sync=True)
    _train(model, criterion, _split(x, sizes, rank), _split(target, sizes, rank), steps)

    for name, value in model.module.state_dict().items():
        torch.testing.assert_close(value, reference.state_dict()[name],
                                   msg=f"parameter {name} on rank {rank}")
        assert not torch.equal(value, initial[name]), f"{name} did not move"
    # Without sync each rank would optimise its own half-batch entropy: a different step.
    torch.manual_seed(42)
    unsynced = nn.parallel.DistributedDataParallel(_Net())
    unsynced.module.load_state_dict(initial)
    _train(unsynced, fierce_ext.FIERCELoss(8, lam=2.0, bins=BINS),
           _split(x, sizes, rank), _split(target, sizes, rank), steps)
    assert not torch.allclose(unsynced.module.body.weight, reference.body.weight, atol=1e-5)
    # In eval mode each rank computes its own batch's entropy, as SyncBatchNorm: rank 0
    # evaluating alone must not wait in a collective for rank 1 (it hung until the timeout).
    if rank == 0:
        criterion.eval()
        with torch.no_grad():
            logits, features = model.module(x)
            local = fierce_ext.FIERCELoss(8, lam=2.0, bins=BINS)(logits, target, features, seed=1)
            assert torch.equal(criterion(logits, target, features, seed=1), local)


def test_ddp_step_with_sync_equals_single_process_step():
    _run(_ddp_worker, 12, 2)


def test_sync_without_process_group_is_single_process():
    assert not dist.is_initialized()
    torch.manual_seed(0)
    x = torch.randn(16, 4, requires_grad=True)
    dictionary = fierce_ext.uniform_dictionary(4, BINS, 2)
    h_sync = fierce_ext.entropy(x, dictionary, seed=5, sync=True)
    (g_sync,) = torch.autograd.grad(h_sync, x)
    h = fierce_ext.entropy(x, dictionary, seed=5)
    (g,) = torch.autograd.grad(h, x)
    torch.testing.assert_close(h_sync, h, rtol=0, atol=0)
    torch.testing.assert_close(g_sync, g, rtol=0, atol=0)
    module = fierce_ext.FeatureEntropy(4, dictionary=dictionary, sync=True)
    torch.testing.assert_close(module(x, seed=5), h, rtol=0, atol=0)
