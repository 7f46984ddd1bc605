"""Train a small classifier with FIERCE under DistributedDataParallel, on CPU (gloo).

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py

(from the repository root, with fierce_ext installed or PYTHONPATH=.). `FIERCELoss(..., sync=True)`
makes every rank optimise the feature entropy of the GLOBAL batch (all ranks' rows together),
like SyncBatchNorm; a DDP step is then the single-process step on the concatenated batch.
Run without torchrun (`python examples/ddp_train.py`) it trains as one process: sync=True is a
no-op without an initialised process group.

The data are synthetic: 3 coarse classes that bucket a continuous latent variable; the entropy
term keeps the features spread beyond what the coarse labels need.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import fierce_ext


def synthetic_batch(step: int, batch: int, generator_seed: int = 0):
    """The global batch of `step` (identical on every rank): inputs (batch, 10) and coarse
    labels (batch,) that bucket a latent variable into 3 classes."""
    generator = torch.Generator().manual_seed(generator_seed * 100_003 + step)
    latent = torch.rand(batch, generator=generator)
    mixing = torch.randn(2, 10, generator=torch.Generator().manual_seed(generator_seed))
    basis = torch.stack([torch.cos(6.28 * latent), torch.sin(6.28 * latent)], dim=1)
    x = basis @ mixing + 0.05 * torch.randn(batch, 10, generator=generator)
    labels = torch.bucketize(latent, torch.tensor([1 / 3, 2 / 3]))
    return x, labels


class Net(nn.Module):
    def __init__(self, features: int = 16, classes: int = 3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, features))
        self.head = nn.Linear(features, classes)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--global-batch", type=int, default=256,
                        help="rows per step over all ranks (split evenly)")
    parser.add_argument("--lam", type=float, default=0.5, help="entropy weight lambda")
    parser.add_argument("--bins", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by the "
                         f"{world} processes")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = Net()
    if distributed:
        model = nn.parallel.DistributedDataParallel(model)
    criterion = fierce_ext.FIERCELoss(16, lam=args.lam, bins=args.bins, sync=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    per_rank = args.global_batch // world

    if rank == 0:
        print(f"{world} process(es), global batch {args.global_batch} ({per_rank} per rank), "
              f"max entropy {criterion.feature_entropy.max_entropy:.3f} bits")
    for step in range(args.steps):
        x, labels = synthetic_batch(step, args.global_batch)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        logits, features = model(x[rows])
        # The seed is common to all ranks (seed=None would also be: rank 0's draw is used).
        loss = criterion(logits, labels[rows], features, seed=step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        # For the log: the mean over ranks of the per-rank losses (the entropy is global already).
        logged = loss.detach().clone()
        if distributed:
            dist.all_reduce(logged)
            logged /= world
        if rank == 0:
            entropy = criterion.last_entropy.item()
            print(f"step {step:3d}  loss {logged.item():+.4f}  "
                  f"(cross-entropy {logged.item() + args.lam * entropy:.4f})  "
                  f"entropy {entropy:.4f} bits (global batch)")

    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
