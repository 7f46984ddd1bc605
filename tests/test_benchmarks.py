"""benchmarks/entropy_kernel.py and benchmarks/host_overhead.py: how they time, what they record,
and that a failure stays on its row. GPU runs of the benchmark are rare one-shot runs, so its
CUDA-only branches run here on the CPU under a mocked torch.cuda (`fake_cuda`): the tensors stay
on the CPU, the timers are CPU stubs, and what matters is the control flow. No test asserts a
time."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

import fierce_ext
from fierce_ext import backends

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import host_overhead  # noqa: E402


# ------------------------------------------------------------------------------ host_overhead

@pytest.fixture
def scratch_registry(monkeypatch):
    """host_overhead registers its `noop` backend in fierce_ext.backends: undone after the test."""
    monkeypatch.setattr(backends, "_MODULES", dict(backends._MODULES))
    monkeypatch.setattr(backends, "BACKENDS", backends.BACKENDS)
    monkeypatch.setitem(sys.modules, "fierce_ext_noop_backend", None)


def _with_broken_backend(monkeypatch):
    available = fierce_ext.available_backends
    monkeypatch.setattr(fierce_ext, "available_backends", lambda device: {
        **available(device), "broken": types.SimpleNamespace(available=True)})


def test_host_overhead_prints_a_failing_backend_on_its_row(scratch_registry, monkeypatch,
                                                           capsys):
    _with_broken_backend(monkeypatch)
    status = host_overhead.main(["--device", "cpu", "--shape", "8,4,1,4", "--reps", "3"])
    out = capsys.readouterr().out
    assert status == 0
    assert any(line.startswith("broken") and "failed: ValueError" in line
               for line in out.splitlines()), out
    assert any(line.startswith("torch") and "failed" not in line
               for line in out.splitlines()), out


def test_host_overhead_fails_only_when_nothing_was_measured(scratch_registry, monkeypatch,
                                                            capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no timer")

    monkeypatch.setattr(host_overhead, "best_us", broken)
    assert host_overhead.main(["--device", "cpu", "--shape", "8,4,1,4", "--reps", "3"]) == 1
    assert "noop       failed: RuntimeError: no timer" in capsys.readouterr().out
