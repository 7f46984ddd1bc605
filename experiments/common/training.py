"""Training and evaluation loops shared by the experiments.

Models return ``(logits, features)``; criteria are called as ``criterion(logits, target, features)``
and return ``(loss, logs)`` (see ``losses.py``).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm  # not tqdm.auto: its asyncio variant calls iter() on the iterable at construction


def _maybe_progress(iterable, progress: bool, desc: str):
    """``iterable`` itself when progress is off, else wrapped in a plain tqdm bar.

    Never ``tqdm.auto``: its ``tqdm_asyncio`` calls ``iter(iterable)`` in the constructor even with
    ``disable=True``, which for a DataLoader builds (and discards) an iterator: one draw from the
    shuffle generator, and with workers a started worker pool that prefetches (consuming a whole
    permutation). The loader must be iterated exactly once per epoch."""
    if not progress:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def train_epoch(model, loader: DataLoader, criterion, optimizer, device: torch.device,
                progress: bool = True, desc: str = "train") -> dict[str, float]:
    """One pass over ``loader``; returns the batch-averaged loss, accuracy and criterion logs."""
    model.train()
    sums: dict[str, float] = defaultdict(float)
    count = 0
    for inputs, target in _maybe_progress(loader, progress, desc):
        inputs, target = inputs.to(device), target.to(device)
        logits, features = model(inputs)
        loss, logs = criterion(logits, target, features)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} ({desc})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        batch = target.shape[0]
        count += batch
        sums["train_loss"] += loss.item() * batch
        sums["train_accuracy"] += (logits.argmax(1) == target).float().sum().item()
        for key, value in logs.items():
            sums[f"train_{key}"] += value * batch
    if count == 0:
        raise ValueError("the training loader is empty")
    return {key: value / count for key, value in sums.items()}


@torch.no_grad()
def collect_outputs(model, loader: DataLoader, device: torch.device, progress: bool = False,
                    desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``loader``; return (logits, features, targets) on the CPU."""
    model.eval()
    logits, features, targets = [], [], []
    for inputs, target in _maybe_progress(loader, progress, desc):
        batch_logits, batch_features = model(inputs.to(device))
        logits.append(batch_logits.float().cpu())
        features.append(batch_features.float().cpu())
        targets.append(target.cpu())
    return torch.cat(logits), torch.cat(features), torch.cat(targets)


class TensorBatches:
    """Mini-batches of in-memory tensors, shuffled with ``generator``: what DataLoader(TensorDataset(...))
    yields, but one index operation per batch instead of one Python call per sample."""

    def __init__(self, *tensors: torch.Tensor, batch_size: int, shuffle: bool = True,
                 generator: torch.Generator | None = None, drop_last: bool = False):
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("TensorBatches needs tensors with the same first dimension")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors, self.batch_size = tensors, batch_size
        self.shuffle, self.generator, self.drop_last = shuffle, generator, drop_last

    def __len__(self) -> int:
        n = self.tensors[0].shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = self.tensors[0].shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for batch in range(len(self)):
            index = order[batch * self.batch_size:(batch + 1) * self.batch_size]
            yield tuple(t[index] for t in self.tensors)
