"""Benchmark of the FIERCE feature entropy: the paper's PyTorch formulation against fierce_ext.

    python benchmarks/entropy_kernel.py                     # defaults for the device present
    python benchmarks/entropy_kernel.py --shapes mid,large --dtypes fp32,bf16
    python benchmarks/entropy_kernel.py --quick             # seconds: a smoke run (CI)
    python benchmarks/entropy_kernel.py --shapes age --similarity distance  # the age experiment

Measured per shape, dtype and backend (cosine similarity unless --similarity says otherwise, the
paper's gumbel_hard estimator): forward, backward and forward+backward time, peak extra memory
of a forward+backward, an effective TFLOP/s (6*B*D*C*K flops, the three GEMMs of a fused
forward+backward: forward, recompute, gradient, over the measured time) and the time over the
"three-GEMM floor", 3x one measured GEMM (B, D) x (D, C*K), timed as the shape's rows. On CUDA
that GEMM multiplies float32 as the fused backends do this run
(fierce_ext.backends.fp32_precision: tf32, or cuBLAS's exact float32 for ieee, and for tf32x3,
which torch has no GEMM for), bf16 and fp16 in their dtype. The floor is a reference rate: codes
that keep their logits and so do two GEMMs (the paper's, the CPU torch backend for one chunk)
can beat it (x floor < 1).

Backends: "paper" (benchmarks/paper_baseline.py, eager), "paper-compiled" (its torch.compile;
always on CUDA, with --compile on CPU where compiling is slow), and every fierce_ext backend
that fierce_ext.available_backends(device) reports available.

How it is measured (each row's `timing` and `bwd_method` say which way):
* CUDA, launch-bound shapes (B*C*K <= GRAPH_MAX_LOGITS), timing "loop": the median of 10 rounds
  of back-to-back calls, each round timed by the wall clock between two synchronizes, so the
  host's launch time counts where it exceeds the device's (do_bench starts its event right after
  queueing an L2 flush, and a host-bound step's launches hide behind that flush). Their fwd+bwd
  is also replayed from a CUDA graph: the device's share. Larger shapes, timing "do_bench":
  triton.testing.do_bench medians (the L2 flushed before each call). Backward alone
  (bwd_method "replay"): backward(retain_graph=True) of one forward's graph, timed the same way;
  graphs that cannot be replayed (torch.compile's donated buffers) get "fresh": a fresh forward
  before each backward, waited for, then CUDA events around the backward. Memory:
  torch.cuda.max_memory_allocated() during one forward+backward minus the memory allocated
  before it (inputs and dictionary excluded, the feature gradient included).
* CPU: the median of repeated time.perf_counter() measurements after a warm-up (backward alone,
  "fresh": a fresh untimed forward before each timed backward). The backends of a shape take turns
  (CPU_ROUNDS rounds), so that a shared machine's changing load weighs on all of them alike.
  Memory: tracemalloc does not see torch's allocations, so each (shape, dtype) is measured in
  a fresh subprocess: per backend one warm-up forward+backward, then the kernel's peak-RSS mark
  is reset (/proc/self/clear_refs) and one forward+backward runs; extra = peak RSS (VmHWM)
  minus RSS before it. glibc is told to mmap every allocation >= 64 KiB and to trim at once, so
  freed tensors leave the RSS and the mark sees only what is live at the same time. Linux only;
  elsewhere the column stays empty.

Outputs: a printed markdown table and, under benchmarks/results/ (a temporary folder for
--quick unless --out is given), <device>-<date>.json / .md / .png. The .json and .md are
rewritten after every (shape, dtype) case, and on CUDA after every backend, so a run killed
midway (the device check's timeout) leaves everything measured until then; meta.complete says
whether the run finished. The .png comes at the end.

Rows that are not timed say why in `skipped`: the memory rule, a failure, the paper's code in
float16 (NaN: its 1e-21 underflows), or a backend whose warm-up gave a non-finite entropy or
gradient. --no-tf32 also sets FIERCE_EXT_FP32_PRECISION=ieee for the run (the fused backends
read that variable, not torch's flag).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (str(ROOT), str(HERE)):  # fierce_ext from the source tree, paper_baseline beside us
    if _path not in sys.path:
        sys.path.insert(0, _path)

import torch  # noqa: E402

import fierce_ext  # noqa: E402
from paper_baseline import paper_entropy  # noqa: E402

try:  # a progress bar where tqdm is installed (the experiments' extra); plain messages without
    from tqdm import tqdm as _tqdm
except ImportError:
    _tqdm = None


class _NoProgressBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, text):
        pass

    def close(self):
        pass


def _progress_bar(total):
    return _tqdm(total=total, desc="benchmark", unit="case") if _tqdm else _NoProgressBar()


def _say(message):
    """Print a line without breaking the progress bar."""
    (_tqdm.write if _tqdm else print)(message)

# (B, D, C, K). The paper's two shapes and three larger ones (the issues' targets name them),
# plus reduced ones for CPUs and smoke runs.
SHAPES = {
    "few-shot": (256, 640, 1, 100),
    "hyperspectral": (200, 100, 1, 100),
    "mid": (8192, 2048, 8, 256),
    "large": (65536, 1024, 4, 256),
    "xl": (262144, 512, 8, 512),
    "mid-cpu": (1024, 2048, 8, 256),  # "mid" with an eighth of the batch: a CPU minute
    "age": (128, 1, 1, 100),  # the age experiment's term: its own inputs, see make_inputs
    "tiny": (64, 32, 2, 16),  # --quick
}
DEFAULT_SHAPES = {"cpu": ["few-shot", "hyperspectral", "mid-cpu"],
                  "cuda": ["few-shot", "hyperspectral", "mid", "large", "xl"]}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPES = {"cpu": ["fp32"], "cuda": ["fp32", "bf16"]}

# B x C x K tensors alive at the peak of one forward+backward, per materialising backend, for
# the skip rule (x B*C*K * element size). Measured with this script's CPU memory column at
# B, D, C, K = 1024, 256, 8, 256, cosine: paper 8.2 and reference 7.5 fp32 tensors' worth,
# rounded up. With "distance" they also hold B x C x D x K differences: 4 (paper) and 2
# (reference) such tensors at their peak, measured the same way.
MATERIALISED = {"paper": 10, "paper-compiled": 10, "reference": 10}
MATERIALISED_DISTANCE = {"paper": 4, "paper-compiled": 4, "reference": 2}
MiB = 2**20
# The dictionary's range per shape, as the paper draws it: uniform on [-1, 1) unless named here.
DICTIONARY_RANGE = {"hyperspectral": (0.0, 1.0)}
# The paper's code in float16: its guard 1e-21 underflows to 0, so an empty bin's
# 0 * log2(0) makes the entropy NaN. Not timed: no speedup against a NaN baseline.
PAPER_FP16_NOTE = ("the paper's code gives NaN in float16 (its log2(p + 1e-21): 1e-21 "
                   "underflows to 0, an empty bin is 0 * -inf)")


# ----------------------------------------------------------------------------------- cases

def make_inputs(shape_name, dtype, device, requires_grad=True):
    batch, dim, heads, bins = SHAPES[shape_name]
    gen = torch.Generator().manual_seed(0)
    if shape_name == "age":  # its batch: features spread over the bin centres 1..100 (its init)
        features = 50.5 + 16.5 * torch.randn(batch, dim, generator=gen)
        dictionary = fierce_ext.bin_dictionary(bins, 1.0, float(bins), heads)
    else:
        features = torch.randn(batch, dim, generator=gen)
        low, high = DICTIONARY_RANGE.get(shape_name, (-1.0, 1.0))
        dictionary = fierce_ext.uniform_dictionary(dim, bins, heads, low, high, seed=0)
    features, dictionary = features.to(device, dtype), dictionary.to(device, dtype)
    return features.requires_grad_(requires_grad), dictionary


def make_fn(backend, dictionary, similarity, estimator):
    """A closure features -> entropy (0-d) for one backend."""
    if backend == "paper":
        return lambda f: paper_entropy(f, dictionary, similarity)
    if backend == "paper-compiled":
        torch._dynamo.reset()  # a fresh cache per case: never hit the recompile limit
        compiled = torch.compile(paper_entropy, dynamic=False)
        return lambda f: compiled(f, dictionary, similarity)
    # seed=None: a fresh seed per call, as in a training loop.
    return lambda f: fierce_ext.entropy(f, dictionary, similarity=similarity,
                                        estimator=estimator, seed=None, backend=backend)


def backends_for(device, compile_on_cpu):
    names, notes = ["paper"], {}
    if device.type == "cuda" or compile_on_cpu:
        names.append("paper-compiled")
    else:
        notes["paper-compiled"] = "CPU: only with --compile (compiling takes minutes)"
    for name, status in fierce_ext.available_backends(device).items():
        if not status.available:
            notes[name] = status.reason
        elif name == "triton" and device.type == "cpu":
            notes[name] = "Triton interpreter on CPU: timings would be meaningless"
        else:
            names.append(name)
    return names, notes


def memory_need(backend, shape, dtype, similarity):
    """Bytes a materialising backend holds at its peak (0 for the chunked/fused ones)."""
    batch, dim, heads, bins = shape
    factor = MATERIALISED.get(backend, 0)
    size = max(torch.finfo(dtype).bits // 8, 4)  # the reference computes in fp32 at least
    need = factor * batch * heads * bins * size
    if similarity == "distance":
        need += MATERIALISED_DISTANCE.get(backend, 0) * batch * heads * dim * bins * size
    return need


def skip_reason(backend, shape, dtype, similarity, device):
    """Why a materialising backend cannot run this shape here, or None."""
    need, available = memory_need(backend, shape, dtype, similarity), memory_available(device)
    if available is not None and need > 0.8 * available:
        return (f"needs ~{need / 2**30:.1f} GiB of materialised B x C x K tensors, "
                f"{available / 2**30:.1f} GiB available")
    return None


def memory_available(device):
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# --------------------------------------------------------------------------------- timing

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_median_ms(fn, setup=None, min_reps=3, max_reps=50, min_time=0.5, record=None):
    """Median ms of fn() over at least min_reps runs and min_time seconds (setup untimed);
    all the times are appended to `record` when given."""
    times, start = [], time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time
                                    and len(times) < max_reps):
        args = setup() if setup else ()
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    if record is not None:
        record.extend(times)
    return statistics.median(times)


# Shapes this small are launch-bound: the eager time is mostly the host's per-call cost (Python,
# dispatch, launches). On CUDA their eager steps are timed by CUDA_LOOP (host time counted), and
# their fwd+bwd is also timed replayed from a CUDA graph, the device's share.
GRAPH_MAX_LOGITS = 2**22

# How a CUDA row was timed (the row's `timing`):
CUDA_LOOP = "loop"  # wall clock of back-to-back calls between synchronizes
CUDA_DO_BENCH = "do_bench"  # triton.testing.do_bench median: device time, L2 flushed
CPU_TIMING = "perf_counter"
# How its backward alone was timed (the row's `bwd_method`):
BWD_REPLAY = "replay"  # backward(retain_graph=True) of one forward's graph, timed as the row
BWD_FRESH = "fresh"  # a fresh untimed forward before each timed backward


def launch_bound(shape):
    batch, _, heads, bins = shape
    return batch * heads * bins <= GRAPH_MAX_LOGITS


def cuda_median_ms(fn, grad_to_none=None, host_bound=False):
    """Median ms of fn() on CUDA: cuda_loop_ms where host_bound, else do_bench."""
    if host_bound:
        return cuda_loop_ms(fn, grad_to_none)
    from triton.testing import do_bench

    return float(do_bench(fn, grad_to_none=grad_to_none, return_mode="median"))


def cuda_loop_ms(fn, grad_to_none=None, rounds=10, round_s=0.01):
    """Per-call ms of fn() called back to back, the median over `rounds` of a round's wall time
    (n calls between two synchronizes) over n. For launch-bound steps: do_bench records its start
    event right after queueing an L2 flush without synchronising, so a host that takes longer to
    launch a step than the device to run it hides behind that flush; here its time counts."""
    def call():
        if grad_to_none is not None:
            for x in grad_to_none:
                x.grad = None
        fn()

    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    reps = max(3, min(2000, int(round_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            call()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / reps * 1e3)
    return statistics.median(times)


def _check_finite(out, features):
    """Why the entropy or the feature gradient is not finite, or None."""
    if not torch.isfinite(out.detach()).all():
        return f"non-finite entropy ({out.detach().float().item():g}): not timed"
    if features.grad is not None and not torch.isfinite(features.grad).all():
        return "non-finite feature gradient: not timed"
    return None


def _warm_up(fn, features, device):
    """Two untimed forward+backward (compilation, autotuning, lazy initialisation); returns why
    the first one's values are unusable (non-finite), or None."""
    why = None
    for i in range(2):
        out = fn(features)
        out.backward()
        if i == 0:
            why = _check_finite(out, features)
        features.grad = None
        if why:
            break
    _sync(device)
    return why


def time_cuda_case(fn, features, host_bound=False):
    """(forward ms, backward ms, forward+backward ms, bwd_method) on CUDA."""
    def forward_backward():
        fn(features).backward()
        features.grad = None

    fwd = cuda_median_ms(lambda: fn(features), host_bound=host_bound)
    fwdbwd = cuda_median_ms(forward_backward, grad_to_none=[features], host_bound=host_bound)
    try:
        out = fn(features)
        bwd = cuda_median_ms(lambda: out.backward(retain_graph=True), grad_to_none=[features],
                             host_bound=host_bound)
        bwd_method = BWD_REPLAY
    except RuntimeError:  # a graph that cannot be replayed (torch.compile's donated buffers)
        bwd, bwd_method = _cuda_event_backward_ms(fn, features), BWD_FRESH
    features.grad = None
    return fwd, bwd, fwdbwd, bwd_method


# The backends of one shape take turns on the CPU, this many rounds of >= 0.1 s per measure, so
# that a change in the machine's load during the run weighs on all of them alike.
CPU_ROUNDS = 5


def time_cpu_cases(cases, quick):
    """For each (fn, features) of one shape: (forward ms, backward ms, forward+backward ms,
    every forward+backward time) on the CPU, medians over all rounds; or the exception that
    stopped that case."""
    kwargs = (dict(min_reps=1, max_reps=2, min_time=0.0) if quick
              else dict(min_reps=1, max_reps=20, min_time=0.5 / CPU_ROUNDS))
    times = [([], [], []) for _ in cases]
    errors = [None] * len(cases)
    for _ in range(1 if quick else CPU_ROUNDS):
        for i, ((fn, features), (fwd, bwd, fwdbwd)) in enumerate(zip(cases, times)):
            if errors[i] is not None:
                continue

            def forward_backward():
                fn(features).backward()
                features.grad = None

            def fresh_forward():  # untimed; no gradient to accumulate into
                features.grad = None
                return (fn(features),)

            try:
                cpu_median_ms(lambda: fn(features), record=fwd, **kwargs)
                cpu_median_ms(lambda out: out.backward(), setup=fresh_forward, record=bwd,
                              **kwargs)
                features.grad = None
                cpu_median_ms(forward_backward, record=fwdbwd, **kwargs)
            except Exception as error:
                errors[i] = error
    return [error or (statistics.median(fwd), statistics.median(bwd), statistics.median(fwdbwd),
                      fwdbwd)
            for error, (fwd, bwd, fwdbwd) in zip(errors, times)]


def cuda_graph_fwdbwd_ms(fn, features):
    """(median ms of fwd+bwd replayed from a CUDA graph, None) or (None, why not)."""
    from triton.testing import do_bench_cudagraph

    def step():
        fn(features).backward()

    try:
        return float(do_bench_cudagraph(step, grad_to_none=[features],
                                        return_mode="median")), None
    except Exception as error:  # not capturable (a host sync, a CPU tensor in the step, ...)
        torch.cuda.synchronize()
        return None, f"{type(error).__name__}: {error}"[:200]
    finally:
        features.grad = None


def _cuda_event_backward_ms(fn, features, reps=20):
    """Median ms of a backward, each after a fresh forward (for graphs that cannot be replayed).
    The forward is waited for, so the backward starts on an idle device and the events also
    count the host's time to launch it."""
    times = []
    for _ in range(reps):
        features.grad = None
        out = fn(features)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out.backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        features.grad = None
    return statistics.median(times)


def gemm_precision(dtype, device, fp32_precision):
    """(allow_tf32, label) of the floor's GEMM: on CUDA float32 is multiplied as the fused
    backends multiply it this run (fierce_ext.backends.fp32_precision)."""
    if dtype != torch.float32:
        return False, str(dtype).removeprefix("torch.")
    if device.type != "cuda":
        return False, "fp32"
    if fp32_precision == "tf32":
        return True, "tf32"
    if fp32_precision == "tf32x3":  # torch has no 3xTF32 GEMM: cuBLAS's exact float32 instead
        return False, "ieee (for tf32x3)"
    return False, "ieee"


def gemm_ms(shape, dtype, device, quick, fp32_precision="tf32"):
    """(ms, precision label) of one (B, D) x (D, C*K) GEMM: the floor's unit. On CUDA timed as
    the shape's rows are (cuda_loop_ms where launch-bound)."""
    batch, dim, heads, bins = shape
    a = torch.randn(batch, dim, device=device).to(dtype)
    b = torch.randn(dim, heads * bins, device=device).to(dtype)
    allow_tf32, label = gemm_precision(dtype, device, fp32_precision)
    if device.type == "cuda":
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        try:
            return cuda_median_ms(lambda: a @ b, host_bound=launch_bound(shape)), label
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    a @ b
    kwargs = dict(min_reps=1, max_reps=2, min_time=0.0) if quick else {}
    return cpu_median_ms(lambda: a @ b, **kwargs), label


# --------------------------------------------------------------------------------- memory

def cuda_extra_mib(fn, features, device):
    features.grad = None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn(features).backward()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    features.grad = None
    return (peak - before) / MiB


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_memory_worker(spec):
    """Runs in a fresh subprocess: peak extra RSS (MiB) of one forward+backward per backend."""
    torch.set_num_threads(spec["threads"])
    features, dictionary = make_inputs(spec["shape"], DTYPES[spec["dtype"]], torch.device("cpu"))
    out = {}
    for backend in spec["backends"]:
        fn = make_fn(backend, dictionary, spec["similarity"], spec["estimator"])
        fn(features).backward()  # warm-up: lazy initialisation is not the kernel's memory
        features.grad = None
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
        fn(features).backward()
        # RSS moves by whole pages and the allocator's bookkeeping: a tiny negative delta
        # is noise, reported as 0.
        out[backend] = max(0.0, (_rss_kib("VmHWM") - before) / 1024)
        features.grad = None
    return out


def cpu_memory(shape_name, dtype_name, backends, args):
    if not (sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")):
        return {}, "needs Linux /proc/self/clear_refs"
    spec = dict(shape=shape_name, dtype=dtype_name, backends=backends, threads=args.threads,
                similarity=args.similarity, estimator=args.estimator)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--_memory-worker",
                          json.dumps(spec)], capture_output=True, text=True, env=env)
    if run.returncode != 0:
        return {}, f"memory worker failed: {run.stderr.strip().splitlines()[-1:]}"
    return json.loads(run.stdout.strip().splitlines()[-1]), None


# ------------------------------------------------------------------------------------ run

def cpu_name():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _release(device):
    # Return cached blocks, so the next case's free-memory check and peak start clean.
    if device.type == "cuda":
        torch.cuda.empty_cache()


def device_tag(device):
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")
    return "cpu"


def _failed(row, error, shape_name, dtype_name, backend):
    row["skipped"] = f"failed: {type(error).__name__}: {error}"[:300]
    _say(f"FAILED {shape_name} {dtype_name} {backend}: {row['skipped']}")


def measure_shape(shape_name, dtype_name, backends, device, args, bar, all_rows=None,
                  save=None):
    """The rows of one (shape, dtype): every backend timed (on the CPU taking turns, see
    time_cpu_cases), its memory, and its rate against the shape's GEMM floor. Each row is also
    appended to `all_rows` as soon as it exists, and `save()` is called after each backend on
    CUDA (on the CPU the backends take turns, so a shape's rows are complete only at its end)."""
    shape, dtype = SHAPES[shape_name], DTYPES[dtype_name]
    batch, dim, heads, bins = shape
    host_bound = device.type == "cuda" and launch_bound(shape)
    # The floor's float32 GEMMs at the precision the fused backends use this run.
    floor, floor_precision = gemm_ms(shape, dtype, device, args.quick,
                                     fierce_ext.backends.fp32_precision(args.similarity))
    _release(device)
    flops = 3 * 2 * batch * dim * heads * bins

    def rate(row):
        if "fwdbwd_ms" in row:
            row.update(gemm_ms=floor, gemm_precision=floor_precision, floor_ms=3 * floor,
                       tflops=flops / (row["fwdbwd_ms"] * 1e-3) / 1e12,
                       x_floor=row["fwdbwd_ms"] / (3 * floor))

    rows, cpu_cases = [], []
    for backend in backends:
        bar.set_postfix_str(f"{shape_name} {dtype_name} {backend}")
        row = dict(shape=shape_name, B=batch, D=dim, C=heads, K=bins, dtype=dtype_name,
                   backend=backend)
        rows.append(row)
        if all_rows is not None:
            all_rows.append(row)
        skip = skip_reason(backend, shape, dtype, args.similarity, device)
        if dtype == torch.float16 and backend in ("paper", "paper-compiled"):
            skip = PAPER_FP16_NOTE
        if skip:
            row["skipped"] = skip
            _say(f"skip {shape_name} {dtype_name} {backend}: {skip}")
            bar.update()
            continue
        features, dictionary = make_inputs(shape_name, dtype, device)
        fn = make_fn(backend, dictionary, args.similarity, args.estimator)
        try:  # report and continue: one broken backend is a result
            unusable = _warm_up(fn, features, device)
            if unusable:
                row["skipped"] = unusable
                _say(f"skip {shape_name} {dtype_name} {backend}: {unusable}")
            elif device.type == "cuda":  # the row gets its numbers only if all of them came
                measured = dict(zip(("fwd_ms", "bwd_ms", "fwdbwd_ms", "bwd_method"),
                                    time_cuda_case(fn, features, host_bound)))
                measured["timing"] = CUDA_LOOP if host_bound else CUDA_DO_BENCH
                measured["extra_mib"] = cuda_extra_mib(fn, features, device)
                if launch_bound(shape):
                    measured["graph_fwdbwd_ms"], why = cuda_graph_fwdbwd_ms(fn, features)
                    if why:
                        measured["graph_note"] = why
                row.update(measured)
                rate(row)
            else:
                cpu_cases.append((row, fn, features))
        except Exception as error:
            _failed(row, error, shape_name, dtype_name, backend)
        del features, dictionary, fn  # the CPU cases keep theirs until they are timed
        _release(device)
        bar.update()
        if save is not None and device.type == "cuda":
            save()

    if cpu_cases:
        timed = time_cpu_cases([(fn, features) for _, fn, features in cpu_cases], args.quick)
        for (row, _, _), result in zip(cpu_cases, timed):
            if isinstance(result, Exception):
                _failed(row, result, shape_name, dtype_name, row["backend"])
                continue
            fwd, bwd, fwdbwd, repeats = result
            row.update(fwd_ms=fwd, bwd_ms=bwd, fwdbwd_ms=fwdbwd, fwdbwd_min_ms=min(repeats),
                       fwdbwd_repeats=len(repeats), timing=CPU_TIMING, bwd_method=BWD_FRESH)
        cpu_cases.clear()
        measured = [row["backend"] for row in rows if "fwdbwd_ms" in row]
        values, why = cpu_memory(shape_name, dtype_name, measured, args) if measured else ({}, None)
        for row in rows:
            if "fwdbwd_ms" in row:
                row["extra_mib"] = values.get(row["backend"])
                if why:
                    row["memory_note"] = why

    for row in rows:
        rate(row)
    return rows


@contextlib.contextmanager
def fp32_precision_env(no_tf32):
    """With --no-tf32, FIERCE_EXT_FP32_PRECISION=ieee while the run lasts: the fused backends
    read that variable at each call, not torch's allow_tf32. A user's other setting is refused."""
    name = fierce_ext.backends.FP32_PRECISION_ENV
    previous = os.environ.get(name)
    if no_tf32 and (previous or "").strip().lower() not in ("", "ieee"):
        sys.exit(f"--no-tf32 asks for exact float32 matmuls, but {name}={previous!r} asks the "
                 f"fused backends for another precision: unset it or drop --no-tf32")
    if no_tf32:
        os.environ[name] = "ieee"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def run(args):
    with fp32_precision_env(args.no_tf32):
        return _run(args)


def _run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # Events, do_bench and synchronize() work on the current device: make it this one.
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = not args.no_tf32
        torch.backends.cudnn.allow_tf32 = not args.no_tf32
    try:
        fp32_precision = fierce_ext.backends.fp32_precision(args.similarity)
    except ValueError as error:  # a FIERCE_EXT_FP32_PRECISION the backends would refuse
        sys.exit(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    shape_names = (["tiny"] if args.quick else DEFAULT_SHAPES[device.type]) \
        if not args.shapes else args.shapes.split(",")
    dtype_names = args.dtypes.split(",") if args.dtypes else DEFAULT_DTYPES[device.type]
    for name in shape_names:
        if name not in SHAPES:
            sys.exit(f"--shapes: unknown shape {name!r}; known: {', '.join(SHAPES)}")
    for name in dtype_names:
        if name not in DTYPES:
            sys.exit(f"--dtypes: unknown dtype {name!r}; known: {', '.join(DTYPES)}")
    backends, notes = backends_for(device, args.compile)
    if args.backends:
        wanted = args.backends.split(",")
        known = ["paper", "paper-compiled", *fierce_ext.backends.BACKENDS]
        for name in wanted:
            if name not in known:
                sys.exit(f"--backends: unknown backend {name!r}; known: {', '.join(known)}")
        backends = [b for b in backends if b in wanted]
    for name, why in notes.items():
        print(f"not measured: {name}: {why}")

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    floor_fp32 = gemm_precision(torch.float32, device, fp32_precision)[1]
    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="fierce-bench-")) if args.quick else HERE / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "-".join([device_tag(device), _dt.date.today().isoformat()]
                    + (["quick"] if args.quick else []) + ([args.tag] if args.tag else []))
    meta = dict(
        date=_dt.datetime.now().isoformat(timespec="seconds"), device=str(device),
        device_name=(torch.cuda.get_device_name(device) if device.type == "cuda"
                     else f"{cpu_name()}, {os.cpu_count()} logical CPUs"),
        torch=torch.__version__, fierce_ext=fierce_ext.__version__, python=platform.python_version(),
        threads=args.threads, similarity=args.similarity, estimator=args.estimator,
        tf32=(device.type == "cuda" and not args.no_tf32), quick=args.quick,
        # How fierce_ext's GPU backends multiply float32 features for this similarity (the
        # paper's code follows `tf32` above).
        fp32_precision=fp32_precision,
        load_average_start=load_start, load_average_end=None,
        not_measured=notes,
        timing=(f"B*C*K <= 2^{GRAPH_MAX_LOGITS.bit_length() - 1} (launch-bound, timing "
                f"'{CUDA_LOOP}'): median of 10 rounds of back-to-back calls, wall clock between "
                f"two synchronizes (host time counted, no L2 flush); larger ('{CUDA_DO_BENCH}'): "
                f"triton.testing.do_bench median (L2 flushed before each call)"
                if device.type == "cuda"
                else f"median of time.perf_counter repeats, the backends of a shape taking "
                     f"turns ({CPU_ROUNDS} rounds of >= {0.5 / CPU_ROUNDS:g} s per measure)"),
        bwd_timing=(f"'{BWD_REPLAY}': backward(retain_graph=True) of one forward's graph, "
                    f"timed as the row; '{BWD_FRESH}': a fresh untimed forward before each "
                    f"backward, waited for, then CUDA events around the backward (graphs that "
                    f"cannot be replayed: torch.compile's)" if device.type == "cuda"
                    else f"'{BWD_FRESH}': a fresh untimed forward before each timed backward"),
        memory=("torch.cuda.max_memory_allocated during fwd+bwd minus allocated before"
                if device.type == "cuda" else
                "peak RSS (VmHWM after clear_refs) minus RSS before, fresh subprocess per "
                "shape, glibc mmap threshold 64 KiB"),
        floor="3 x one measured (B,D)x(D,C*K) GEMM, timed as the shape's rows; "
              + (f"fp32 as the fused backends multiply it ({floor_fp32}), bf16/fp16 in "
                 f"their dtype" if device.type == "cuda" else "in the dtype"),
        floor_fp32_precision=floor_fp32,
        # complete: False while running (and in what a killed run leaves): the files are
        # rewritten after every case, so a timeout keeps everything measured until then.
        complete=False, cases_total=len(shape_names) * len(dtype_names), cases_done=0,
    )
    rows = []

    def save(complete=False):
        add_speedups(rows)
        meta["complete"] = complete
        meta["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        try:
            write_results(out_dir, stem, meta, rows)
        except Exception as error:  # an interim copy must never stop the measuring
            if complete:
                raise
            _say(f"warning: could not write the interim results: {type(error).__name__}: {error}")

    save()
    print(f"writing {out_dir / stem}.json / .md, rewritten after every case")
    bar = _progress_bar(len(shape_names) * len(dtype_names) * len(backends))
    for shape_name in shape_names if backends else []:  # (no backend: not even the GEMMs)
        for dtype_name in dtype_names:
            measure_shape(shape_name, dtype_name, backends, device, args, bar, rows, save)
            meta["cases_done"] += 1
            save()
    bar.close()
    save(complete=True)

    print()
    print(markdown_table(rows))
    written = ".json / .md"
    if not rows:
        print("\nnothing was measured (see the notes above)")
    else:
        try:  # the numbers are written already: a figure that fails fails alone
            if plot(rows, meta, out_dir / f"{stem}.png"):
                written += " / .png"
            else:
                print("\nno figure: no row has a time")
        except Exception as error:  # matplotlib is optional, and a plot bug must not fail a run
            print(f"\nno figure: {type(error).__name__}: {error}")
    print(f"\nwrote {out_dir / stem}{written}")
    if load_start and load_start[0] > (os.cpu_count() or 1):
        print(f"warning: load average {load_start[0]:.1f} on {os.cpu_count()} CPUs at the start:"
              " other processes shared the machine, timings are inflated")
    return rows


def add_speedups(rows):
    paper = {(r["shape"], r["dtype"]): r.get("fwdbwd_ms") for r in rows
             if r["backend"] == "paper"}
    for row in rows:
        base = paper.get((row["shape"], row["dtype"]))
        if base and row.get("fwdbwd_ms"):
            row["speedup_vs_paper"] = base / row["fwdbwd_ms"]


def _write_atomically(path, text):
    # A kill while writing must leave the previous complete file, never a truncated one.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out_dir, stem, meta, rows):
    """<stem>.json (meta and every row) and <stem>.md (header and table)."""
    _write_atomically(out_dir / f"{stem}.json", json.dumps(dict(meta=meta, rows=rows), indent=2)
                      + "\n")
    _write_atomically(out_dir / f"{stem}.md", header_text(meta) + "\n" + markdown_table(rows)
                      + "\n")


def header_text(meta):
    lines = [f"# FIERCE entropy benchmark: {meta['device_name']} ({meta['date']})", "",
             f"torch {meta['torch']}, fierce_ext {meta['fierce_ext']}, {meta['threads']} threads, "
             f"similarity={meta['similarity']}, estimator={meta['estimator']}"
             + (", TF32 matmuls on" if meta["tf32"] else "")
             + f", fierce_ext GPU float32 precision {meta.get('fp32_precision', '?')}", "",
             f"- time: {meta['timing']}"]
    if meta.get("bwd_timing"):
        lines.append(f"- bwd ms: {meta['bwd_timing']}")
    lines += [f"- memory: {meta['memory']}", f"- floor: {meta['floor']}"]
    if meta.get("load_average_start"):
        lines.append(f"- load average at start / end: "
                     f"{', '.join(f'{x:.1f}' for x in meta['load_average_start'])} / "
                     f"{', '.join(f'{x:.1f}' for x in meta['load_average_end'])}")
    for name, why in meta["not_measured"].items():
        lines.append(f"- not measured: {name}: {why}")
    if not meta.get("complete", True):
        lines.append(f"- INCOMPLETE: {meta['cases_done']} of {meta['cases_total']} "
                     f"(shape, dtype) cases finished when this was written (the run was still "
                     f"going, or was cut short)")
    return "\n".join(lines) + "\n"


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or math.isnan(value):
            return f"{value:g}"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows):
    head = ("| shape | B x D x C x K | dtype | backend | fwd ms | bwd ms | fwd+bwd ms | "
            "extra MiB | TFLOP/s | x 3-GEMM floor | speedup vs paper | fwd+bwd ms, CUDA graph | "
            "timing / bwd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        dims = f"{r['B']} x {r['D']} x {r['C']} x {r['K']}"
        if r.get("skipped") or "fwdbwd_ms" not in r:
            why = f"skipped: {r['skipped']}" if r.get("skipped") else "not measured (yet)"
            lines.append(f"| {r['shape']} | {dims} | {r['dtype']} | {r['backend']} | "
                         f"{why} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['shape']} | {dims} | {r['dtype']} | {r['backend']} | {_fmt(r.get('fwd_ms'))} | "
            f"{_fmt(r.get('bwd_ms'))} | {_fmt(r['fwdbwd_ms'])} | {_fmt(r.get('extra_mib'))} | "
            f"{_fmt(r.get('tflops'))} | {_fmt(r.get('x_floor'))} | "
            f"{_fmt(r.get('speedup_vs_paper'))} | "
            f"{'not capturable' if r.get('graph_note') else _fmt(r.get('graph_fwdbwd_ms'))} | "
            f"{r.get('timing', '?')} / {r.get('bwd_method', '?')} |")
    return "\n".join(lines)


def _points(rows, shapes, key, backend=None):
    """(x, y) of the rows' positive `key` per shape (its index in `shapes`), for one backend."""
    xs, ys = [], []
    for i, shape in enumerate(shapes):
        hit = [r for r in rows if r["shape"] == shape and backend in (None, r["backend"])
               and (r.get(key) or 0) > 0]  # (NaN > 0 is false too)
        if hit:
            xs.append(i)
            ys.append(hit[0][key])
    return xs, ys


def plot(rows, meta, path):
    """fwd+bwd time per shape and backend, a panel per dtype on a log axis, to `path`. A log
    axis needs positive data: backends and dtypes without a time are left out, and nothing is
    written (False returned) when no row has one."""
    panels = []
    for dtype in sorted({r["dtype"] for r in rows}):
        measured = [r for r in rows if r["dtype"] == dtype]
        shapes = list(dict.fromkeys(r["shape"] for r in measured))
        series = {backend: _points(measured, shapes, "fwdbwd_ms", backend)
                  for backend in dict.fromkeys(r["backend"] for r in measured)}
        series = {backend: points for backend, points in series.items() if points[0]}
        if series:
            panels.append((dtype, shapes, series, _points(measured, shapes, "floor_ms")))
    if not panels:
        return False

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len(shapes) for _, shapes, _, _ in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6, 3 + 2.2 * widest) * len(panels), 4.5),
                             squeeze=False)
    for ax, (dtype, shapes, series, floor) in zip(axes[0], panels):
        # Markers joined per backend: on a log axis, bars would start at an arbitrary bottom.
        for backend, (xs, ys) in series.items():
            ax.plot(xs, ys, "o-", label=backend)
        if floor[0]:
            ax.plot(*floor, "k--", marker="_", markersize=20, label="3-GEMM floor")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes)
        ax.set_yscale("log")
        ax.set_ylabel("forward + backward, ms (log)")
        ax.set_title(f"{meta['device_name']}, {meta['threads']} threads, {dtype}", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", help=f"comma list of {', '.join(SHAPES)} "
                        f"(default: {DEFAULT_SHAPES['cpu']} on CPU, all named on CUDA)")
    parser.add_argument("--dtypes", help="comma list of fp32, bf16, fp16 "
                        "(default: fp32 on CPU, fp32,bf16 on CUDA)")
    parser.add_argument("--backends", help="comma list to restrict the backends measured: paper, "
                        f"paper-compiled, {', '.join(fierce_ext.backends.BACKENDS)}")
    parser.add_argument("--device", help="cpu or cuda[:i] (default: cuda if present)")
    parser.add_argument("--compile", action="store_true",
                        help="CPU: also measure torch.compile of the paper code (slow to build)")
    parser.add_argument("--similarity", default="cosine", choices=["dot", "cosine", "distance"])
    parser.add_argument("--estimator", default="gumbel_hard",
                        choices=["gumbel_hard", "gumbel_soft", "softmax"],
                        help="fierce_ext estimator (the paper's code is always gumbel_hard)")
    parser.add_argument("--no-tf32", action="store_true",
                        help="CUDA: keep fp32 matmuls in full fp32, torch's and fierce_ext's "
                        "(sets FIERCE_EXT_FP32_PRECISION=ieee; default: TF32 allowed)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny smoke run (one small shape, one repeat)")
    parser.add_argument("--out", help="output folder (default: benchmarks/results/, a "
                        "temporary folder with --quick)")
    parser.add_argument("--tag", help="appended to the output file names")
    parser.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(cpu_memory_worker(json.loads(args.memory_worker))))
        return
    run(args)


if __name__ == "__main__":
    main()
