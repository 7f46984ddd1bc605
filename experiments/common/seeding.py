"""Seeding: one call makes a run repeatable (Python, NumPy and torch generators)."""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed every global generator and return a fresh torch generator (for data loader shuffling)."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds fierce_ext's noise when seed=None is passed
    return torch.Generator().manual_seed(seed)
