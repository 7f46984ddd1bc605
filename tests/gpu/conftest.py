"""Skips every test in this folder when torch.cuda.is_available() is False, with that reason.

The GPU machine runs them (benchmarks/device_check.sh); on the CPU machines they are collected
and reported as skipped, never silently dropped.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
_REASON = "needs a CUDA device: torch.cuda.is_available() is False"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=_REASON)
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)
