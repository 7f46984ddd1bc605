"""benchmarks/entropy_kernel.py and benchmarks/host_overhead.py: how they time, what they record,
and that a failure stays on its row. GPU runs of the benchmark are rare one-shot runs, so its
CUDA-only branches run here on the CPU under a mocked torch.cuda (`fake_cuda`): the tensors stay
on the CPU, the timers are CPU stubs, and what matters is the control flow. No test asserts a
time."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import fierce_ext
from fierce_ext import backends

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "benchmarks") not in sys.path:
    sys.path.insert(0, str(ROOT / "benchmarks"))

import entropy_kernel as ek  # noqa: E402
import host_overhead  # noqa: E402

FP32_ENV = backends.FP32_PRECISION_ENV


def _args(**kwargs):
    return argparse.Namespace(**{**dict(quick=True, similarity="cosine",
                                        estimator="gumbel_hard", threads=1), **kwargs})


def _measure(shape, dtype, names, device, **kwargs):
    return ek.measure_shape(shape, dtype, names, device, _args(**kwargs), ek._NoProgressBar())


# ------------------------------------------------------------------------------ fake CUDA

class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class _FakeCuda:
    """The torch.cuda that entropy_kernel calls; `calls` records what happened, in order."""

    Event = _FakeEvent

    def __init__(self):
        self.calls = []

    def synchronize(self, device=None):
        self.calls.append(("synchronize",))

    def set_device(self, device):
        self.calls.append(("set_device", torch.device(device).index))

    def current_device(self):
        return 0

    def reset_peak_memory_stats(self, device=None):
        pass

    def memory_allocated(self, device=None):
        return 0

    def max_memory_allocated(self, device=None):
        return 0

    def mem_get_info(self, device=None):
        return 80 * 2**30, 80 * 2**30

    def empty_cache(self):
        pass

    def get_device_name(self, device=None):
        return "Fake GPU"

    def is_available(self):
        return True


@pytest.fixture
def fake_cuda(monkeypatch):
    """entropy_kernel's CUDA branches on the CPU: its module `torch` is a proxy whose .cuda is a
    _FakeCuda and whose randn ignores the device, inputs stay on the CPU, and triton's do_bench /
    do_bench_cudagraph are CPU stubs that record their calls (with the TF32 flag then set) in
    cuda.calls. do_bench_cudagraph detaches grad_to_none in place, as triton's does."""
    testing = pytest.importorskip("triton.testing")
    cuda = _FakeCuda()

    class TorchProxy(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    proxy = TorchProxy("torch")
    proxy.cuda = cuda
    proxy.randn = lambda *shape, device=None, **kwargs: torch.randn(*shape, **kwargs)

    def do_bench(fn, warmup=25, rep=100, grad_to_none=None, quantiles=None, return_mode="mean"):
        cuda.calls.append(("do_bench", torch.backends.cuda.matmul.allow_tf32))
        times = []
        for _ in range(3):
            for x in grad_to_none or ():
                x.grad = None
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def do_bench_cudagraph(fn, rep=20, grad_to_none=None, quantiles=None, return_mode="mean"):
        cuda.calls.append(("do_bench_cudagraph",))
        fn()
        for x in grad_to_none or ():
            x.detach_()
            x.requires_grad_(True)
            x.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    make_inputs = ek.make_inputs
    monkeypatch.setattr(ek, "torch", proxy)
    monkeypatch.setattr(ek, "make_inputs", lambda name, dtype, device, requires_grad=True:
                        make_inputs(name, dtype, torch.device("cpu"), requires_grad))
    monkeypatch.setattr(testing, "do_bench", do_bench)
    monkeypatch.setattr(testing, "do_bench_cudagraph", do_bench_cudagraph)
    # run() sets these flags for a CUDA device: give them back (monkeypatch cannot, torch's
    # cuBLAS flags are properties of a module object).
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield cuda
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


CUDA0 = torch.device("cuda", 0)


def test_launch_bound_cuda_rows_are_timed_by_the_wall_clock_loop(fake_cuda):
    # do_bench's events miss a host-bound step's launch time (it overlaps the L2 flush queued
    # before the start event): launch-bound shapes, floor included, are timed by cuda_loop_ms.
    rows = _measure("tiny", "fp32", ["paper", "torch"], CUDA0)
    assert [r["backend"] for r in rows if "fwdbwd_ms" in r] == ["paper", "torch"], rows
    assert {(r["timing"], r["bwd_method"]) for r in rows} == {(ek.CUDA_LOOP, ek.BWD_REPLAY)}
    assert not [c for c in fake_cuda.calls if c[0] == "do_bench"]
    assert all(r["graph_fwdbwd_ms"] > 0 for r in rows)
    assert "loop / replay" in ek.markdown_table(rows)


def test_larger_cuda_shapes_keep_do_bench(fake_cuda, monkeypatch):
    monkeypatch.setattr(ek, "GRAPH_MAX_LOGITS", 0)  # "tiny" is then a device-bound shape
    rows = _measure("tiny", "fp32", ["paper"], CUDA0)
    assert rows[0]["timing"] == ek.CUDA_DO_BENCH and "graph_fwdbwd_ms" not in rows[0]
    # the GEMM floor, the forward, the fwd+bwd and the replayed backward
    assert len([c for c in fake_cuda.calls if c[0] == "do_bench"]) == 4


class _NoReplay:
    """An output whose backward refuses retain_graph, as torch.compile's donated buffers do."""

    def __init__(self, out):
        self.out = out

    def backward(self, retain_graph=False):
        if retain_graph:
            raise RuntimeError("compiled with non-empty donated buffers")
        self.out.backward()


@pytest.mark.parametrize("host_bound", [True, False])
def test_a_backward_that_cannot_be_replayed_is_timed_fresh_and_says_so(fake_cuda, host_bound):
    features, dictionary = ek.make_inputs("tiny", torch.float32, CUDA0)
    fn = ek.make_fn("paper", dictionary, "cosine", "gumbel_hard")
    *times, method = ek.time_cuda_case(lambda f: _NoReplay(fn(f)), features, host_bound)
    assert method == ek.BWD_FRESH and all(t > 0 for t in times)
    assert ek.time_cuda_case(fn, features, host_bound)[3] == ek.BWD_REPLAY
    assert features.grad is None


@pytest.mark.parametrize("similarity, setting, allow_tf32, label", [
    ("cosine", None, True, "tf32"),
    ("distance", None, False, "ieee"),  # exact float32 by default for distance
    ("cosine", "ieee", False, "ieee"),
    ("cosine", "tf32x3", False, "ieee (for tf32x3)"),
])
def test_the_fp32_floor_gemm_uses_the_fused_backends_precision(fake_cuda, monkeypatch,
                                                               similarity, setting, allow_tf32,
                                                               label):
    if setting is None:
        monkeypatch.delenv(FP32_ENV, raising=False)
    else:
        monkeypatch.setenv(FP32_ENV, setting)
    monkeypatch.setattr(ek, "GRAPH_MAX_LOGITS", 0)  # do_bench, which records the flag
    rows = _measure("tiny", "fp32", ["paper"], CUDA0, similarity=similarity)
    assert fake_cuda.calls[0] == ("do_bench", allow_tf32)  # the GEMM comes first
    assert rows[0]["gemm_precision"] == label


@pytest.mark.parametrize("device, index", [("cuda:1", 1), ("cuda", 0)])
def test_run_makes_the_chosen_cuda_device_current(fake_cuda, tmp_path, device, index):
    ek.main(["--device", device, "--shapes", "tiny", "--dtypes", "fp32", "--backends", "paper",
             "--out", str(tmp_path)])
    assert fake_cuda.calls[0] == ("set_device", index)  # before any event or synchronize
    (result,) = tmp_path.glob("*.json")
    data = json.loads(result.read_text())
    assert data["meta"]["device"] == f"cuda:{index}" and data["meta"]["complete"]
    assert data["rows"][0]["timing"] == ek.CUDA_LOOP


# ------------------------------------------------------------------------------ on the CPU

CPU = torch.device("cpu")


def test_cpu_backward_alone_starts_without_a_gradient():
    features = torch.randn(8, 4, requires_grad=True)
    seen = []  # features.grad is None at each forward, the backward-alone ones included

    def fn(f):
        seen.append(f.grad is None)
        return (f * 2).sum()

    (result,) = ek.time_cpu_cases([(fn, features)], quick=False)
    assert not isinstance(result, Exception), result
    assert len(seen) > 3 * ek.CPU_ROUNDS and all(seen)


def test_the_paper_code_is_not_timed_in_fp16():
    rows = _measure("tiny", "fp16", ["paper", "torch"], CPU)
    ek.add_speedups(rows)
    paper, torch_row = rows
    assert paper["skipped"] == ek.PAPER_FP16_NOTE and "fwdbwd_ms" not in paper
    assert torch_row["fwdbwd_ms"] > 0 and "speedup_vs_paper" not in torch_row


def test_a_backend_with_non_finite_values_is_not_timed(monkeypatch):
    make_fn = ek.make_fn
    monkeypatch.setattr(ek, "make_fn", lambda backend, *args: (
        (lambda f: make_fn(backend, *args)(f) * float("nan")) if backend == "torch"
        else make_fn(backend, *args)))
    rows = _measure("tiny", "fp32", ["paper", "torch"], CPU)
    assert "fwdbwd_ms" in rows[0]
    assert "non-finite entropy" in rows[1]["skipped"] and "fwdbwd_ms" not in rows[1]


def test_the_hyperspectral_dictionary_is_uniform_on_0_1():
    _, dictionary = ek.make_inputs("hyperspectral", torch.float32, CPU)
    assert dictionary.min() >= 0 and dictionary.max() < 1
    _, dictionary = ek.make_inputs("few-shot", torch.float32, CPU)
    assert dictionary.min() < 0


def test_an_unknown_backend_name_is_an_error(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        ek.main(["--quick", "--backends", "paper,torhc", "--out", str(tmp_path)])
    message = str(exit_.value.code)
    assert "'torhc'" in message and "paper-compiled" in message and "triton" in message
    assert not list(tmp_path.iterdir())  # refused before measuring anything


def test_no_tf32_also_sets_the_fused_backends_precision(tmp_path, monkeypatch):
    monkeypatch.delenv(FP32_ENV, raising=False)
    ek.main(["--quick", "--no-tf32", "--backends", "paper", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("*.json")
    assert json.loads(result.read_text())["meta"]["fp32_precision"] == "ieee"
    (table,) = tmp_path.glob("*.md")
    assert "float32 precision ieee" in table.read_text()
    assert backends.fp32_precision("cosine") == "tf32"  # only for the run


def test_no_tf32_refuses_another_explicit_precision(tmp_path, monkeypatch):
    monkeypatch.setenv(FP32_ENV, "tf32")
    with pytest.raises(SystemExit) as exit_:
        ek.main(["--quick", "--no-tf32", "--backends", "paper", "--out", str(tmp_path)])
    assert FP32_ENV in str(exit_.value.code)


def _row(dtype, backend, **values):
    return dict(shape="mid", B=1, D=1, C=1, K=1, dtype=dtype, backend=backend, **values)


def test_plot_leaves_out_dtypes_and_backends_without_a_time(tmp_path):
    pytest.importorskip("matplotlib")
    meta = dict(device_name="x", threads=1)
    rows = [_row("fp32", "paper", fwdbwd_ms=3.0, floor_ms=0.5),
            _row("fp32", "torch", skipped="failed: X"),
            _row("bf16", "paper", skipped="failed: X"), _row("bf16", "torch", skipped="failed: X")]
    assert ek.plot(rows, meta, tmp_path / "some.png") and (tmp_path / "some.png").exists()
    assert not ek.plot(rows[1:], meta, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_a_run_whose_rows_were_all_skipped_ends_normally(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(ek, "memory_available", lambda device: 2**20)  # skips the paper's code
    rows = ek.run(ek.parse_args(["--quick", "--shapes", "few-shot", "--backends", "paper",
                           "--out", str(tmp_path)]))
    assert rows and all(r.get("skipped") for r in rows)
    assert "no figure" in capsys.readouterr().out


def test_a_failing_plot_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    def broken(*args):
        raise ValueError("Data cannot be log-scaled")

    monkeypatch.setattr(ek, "plot", broken)
    rows = ek.run(ek.parse_args(["--quick", "--backends", "paper", "--out", str(tmp_path)]))
    assert rows[0]["fwdbwd_ms"] > 0
    assert "no figure: ValueError: Data cannot be log-scaled" in capsys.readouterr().out


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
