"""Skips every test in this folder when torch.cuda.is_available() is False, with that reason.

The GPU machine runs them (benchmarks/device_check.sh); on the CPU machines they are collected
and reported as skipped, never silently dropped.

Under the device check (benchmarks/pytest_shards.sh sets FIERCE_SIGTERM_INTERRUPT=1 for its
pytest processes), the SIGTERM of a step's timeout is turned into a KeyboardInterrupt, once:
pytest then stops the running test and still prints the failures so far and its summary line,
where the default SIGTERM would end the process with nothing but dots in its log. Any other run
keeps the default SIGTERM.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
_REASON = "needs a CUDA device: torch.cuda.is_available() is False"


def _interrupt_on_sigterm(signum, frame):
    # Once: a second SIGTERM (the timeout signals the whole process group, and the shard runner
    # passes it on too) must not interrupt pytest's report of the first; SIGKILL stays the backstop.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt("SIGTERM (the device check's step timeout)")


if os.environ.get("FIERCE_SIGTERM_INTERRUPT") == "1" \
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
    try:
        signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    except ValueError:  # not the main thread (pytest run inside another program): leave it
        pass


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=_REASON)
    for item in items:
        if _HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)
