"""Compile the Triton backend's kernels for a GPU, on a machine without one.

Triton's interpreter (what the CPU tests run) executes the kernels with numpy and ignores most of
what a real compilation checks: tile shapes `tl.dot` accepts, type rules of the MLIR lowering,
shared memory and registers. This script drives the real launchers of
fierce_ext/backends/fused_triton.py with a compile-only Triton driver whose target is the GPU
architecture asked for (default sm_90, the H100/H200), so every kernel those launchers would start
is compiled to a cubin by Triton's own ptxas, with the arguments, constexprs and launch options
of a real call (nothing is launched). Each cubin's resource use (registers per thread, the
per-thread stack frame where ptxas puts spilled registers) is read with the cuobjdump shipped in
Triton's wheel; shared memory is what Triton reserves for the launch.

    python tests/triton_codegen.py [--arch 90] [--full] [--only TEXT] [--jobs N] [--json FILE]

Exits non-zero when a kernel fails to compile or needs more shared memory than the architecture
has, or when a GEMM kernel does not use the tensor-core instructions its precision mode asks
for (tf32, bf16, f16 or f64 MMA; none for "ieee"). Spills are reported, not failed: they cost
time, not correctness. Run without
TRITON_INTERPRET (the script clears it). tests/test_triton_codegen.py runs it in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must happen before the kernels are decorated

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from entropy_kernel import SHAPES as BENCHMARK_SHAPES  # noqa: E402
from fierce_ext.backends import fused_triton  # noqa: E402

triton = fused_triton.triton

# Shared memory one block may use, per architecture (bytes; the opt-in maximum).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

# (rows, dim, heads, bins): the benchmark's CUDA shapes, the paper's 1-D age case, and a
# ragged one (nothing a multiple of 16).
SHAPES = {name: BENCHMARK_SHAPES[name]
          for name in ("few-shot", "hyperspectral", "mid", "large", "xl")}
SHAPES.update({"age": (256, 1, 1, 100), "ragged": (1001, 37, 3, 77)})
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
PRECISIONS = ("tf32", "ieee", "tf32x3")


class CompileOnlyDriver:
    """Just enough of a Triton driver for `JITFunction.warmup`: a fixed target, no device."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Recorder:
    """Stands in for a kernel in fused_triton: `kernel[grid](*args)` compiles instead of
    launching and records the compiled kernel."""

    def __init__(self, kernel, compiled: list):
        self.kernel, self.compiled = kernel, compiled

    def __getitem__(self, grid):
        def warmup(*args, **kwargs):
            start = time.perf_counter()
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            self.compiled.append((self.kernel.fn.__name__, compiled,
                                  time.perf_counter() - start))
        return warmup


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack frame (spill) bytes and static shared bytes of a cubin (cuobjdump)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", file.name],
                              capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|LOCAL|SHARED|STACK):(\d+)", text))
    return {key.lower(): int(value) for key, value in found.items()}


DOT_KERNELS = ("_forward_kernel", "_softmax_kernel", "_grad_kernel")
# The tensor-core operand type each mode must compile to (None: plain FMAs, no MMA).
EXPECTED_MMA = {("fp32", "tf32"): "tf32", ("fp32", "tf32x3"): "tf32", ("fp32", "ieee"): None,
                ("bf16", "tf32"): "bf16", ("fp16", "tf32"): "f16", ("fp64", "tf32"): "f64"}
# float16 features: the gradient GEMM reads a float32 scratch on TF32 tensor cores (its values
# overflow float16 under a GradScaler; fused_triton._backward).
EXPECTED_MMA_OF_KERNEL = {("fp16", "tf32", "_grad_kernel"): "tf32"}


def tensor_core_use(ptx: str) -> str | None:
    """"wgmma.tf32", "mma.bf16", ...: the MMA instructions of a kernel's PTX, or None."""
    kinds = sorted({f"{op}.{kind}" for op, kind in re.findall(
        r"\b(wgmma|mma)(?:\.mma_async)?\.sync\.aligned\.m\d+n\d+k\d+\S*?\.(?:f32|f64)\."
        r"(tf32|bf16|f16|f64)\b", ptx)})
    return ",".join(kinds) or None


def cases(full: bool):
    """(shape, dtype, precision, similarity, estimator): every constexpr value and every
    benchmark shape at least once; with full=True the whole product."""
    similarities, estimators = ("dot", "cosine", "distance"), fused_triton.ESTIMATORS
    if full:
        for shape, dtype in itertools.product(SHAPES, DTYPES):
            precisions = PRECISIONS if dtype == "fp32" else ("tf32",)
            for precision, similarity, estimator in itertools.product(
                    precisions, similarities, estimators):
                yield shape, dtype, precision, similarity, estimator
        return
    for similarity, estimator in itertools.product(similarities, estimators):
        yield "ragged", "fp32", "tf32", similarity, estimator
    for shape in SHAPES:
        for dtype in ("fp32", "bf16"):
            yield shape, dtype, "tf32", "cosine", "gumbel_hard"
    yield "age", "fp32", "tf32", "distance", "gumbel_hard"
    for precision in PRECISIONS[1:]:
        yield "large", "fp32", precision, "cosine", "gumbel_hard"
    for dtype in ("fp16", "fp64"):
        yield "ragged", dtype, "tf32", "dot", "gumbel_soft"


def compile_case(shape, dtype, precision, similarity, estimator):
    rows, dim, heads, bins = SHAPES[shape]
    # Tensors without storage: the launchers only read shapes, strides and dtypes, and the
    # compile-only driver never touches data. data_ptr() 0 is 16-byte aligned, as CUDA
    # allocations are.
    features = torch.empty(rows, dim, dtype=DTYPES[dtype], device="meta")
    dictionary = torch.empty(heads, dim, bins, device="meta")
    fused_triton.FP32_PRECISION = precision
    # The entropy pair: the histogram kernels with the entropy in the reduce kernel (small
    # problems) or in the entropy kernel after it; the backward's softmax kernel forming dL/dp.
    entropy, histogram, lse = fused_triton.entropy_forward(features, dictionary, similarity,
                                                           estimator, 1.0, 12345, 0, "mean")
    grad = torch.empty(heads, bins, device="meta")
    fused_triton.histogram_backward(grad, features, dictionary, lse, similarity, estimator, 1.0,
                                    12345, 0)
    fused_triton.entropy_backward(torch.empty_like(entropy), histogram, features, dictionary,
                                  lse, similarity, estimator, 1.0, 12345, 0, "mean")
    if shape == "ragged" and dtype == "fp32":  # the debug launcher of the noise words
        fused_triton.noise_words(12345, rows, heads, bins, 0, device="meta")


def install_compile_only(arch: int) -> list:
    """Point fused_triton at a compile-only driver for `arch`; returns the list its kernels
    append (name, compiled kernel, seconds) to."""
    from triton.runtime.driver import driver
    driver.set_active(CompileOnlyDriver(arch))
    compiled: list = []
    for name in ("_forward_kernel", "_reduce_kernel", "_entropy_kernel", "_softmax_kernel",
                 "_grad_kernel", "noise_words_kernel"):
        setattr(fused_triton, name, Recorder(getattr(fused_triton, name), compiled))
    fused_triton.unavailable_reason = lambda device: None  # meta tensors stand in for CUDA ones
    fused_triton._multiprocessors = lambda device: 132  # H100/H200 SXM
    fused_triton._device_guard = lambda device: contextlib.nullcontext()
    return compiled


def compile_cases(arch: int, case_list: list) -> tuple[list, list]:
    """Compile every case; (one row per compiled kernel, failure messages)."""
    compiled = install_compile_only(arch)
    limit = SHARED_LIMIT.get(arch, 49152)
    rows, failures = [], []
    for case in case_list:
        start = len(compiled)
        try:
            compile_case(*case)
        except Exception as error:  # report every failing case, not just the first
            message = f"FAILED {case}: {type(error).__name__}: {error}"
            if error.__cause__ is not None:
                message += f"\n    caused by {type(error.__cause__).__name__}: {error.__cause__}"
            failures.append(message)
            continue
        # A backward in several row chunks launches the same kernels once per chunk.
        launched: dict = {}
        for kernel, binary, seconds in compiled[start:]:  # the first one compiled it
            launched.setdefault((kernel, binary.hash), (kernel, binary, seconds))
        for kernel, binary, seconds in launched.values():
            usage = resource_usage(binary.asm["cubin"])
            shared = max(binary.metadata.shared, usage.get("shared", 0))
            mma = tensor_core_use(binary.asm["ptx"])
            rows.append(dict(case="/".join(case), kernel=kernel, hash=binary.hash,
                             registers=usage.get("reg"), stack_bytes=usage.get("stack"),
                             shared_bytes=shared, warps=binary.metadata.num_warps,
                             stages=binary.metadata.num_stages, mma=mma,
                             seconds=round(seconds, 2)))
            expected = (EXPECTED_MMA_OF_KERNEL.get((case[1], case[2], kernel),
                                                   EXPECTED_MMA[case[1], case[2]])
                        if kernel in DOT_KERNELS else None)
            used = {kind.split(".")[-1] for kind in mma.split(",")} if mma else set()
            if used != ({expected} if expected else set()):
                failures.append(f"FAILED {case}: {kernel} uses MMA {mma}, expected "
                                f"{expected or 'none'}")
            if shared > limit:
                failures.append(f"FAILED {case}: {kernel} needs {shared} bytes of shared "
                                f"memory, sm_{arch} has {limit}")
    return rows, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10")
    parser.add_argument("--full", action="store_true", help="every shape x dtype x mode")
    parser.add_argument("--only", help="compile only the cases whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiling processes (default: one per CPU)")
    parser.add_argument("--json", type=Path, help="write the per-kernel table here")
    args = parser.parse_args(argv)

    if fused_triton.triton is None:
        print(f"triton is not importable: {fused_triton._IMPORT_ERROR}")
        return 1
    print(f"triton {triton.__version__}, target sm_{args.arch}", flush=True)
    todo = [case for case in cases(args.full) if not args.only or args.only in "/".join(case)]
    jobs = max(1, min(args.jobs, len(todo)))
    if jobs == 1:
        rows, failures = compile_cases(args.arch, todo)
    else:  # fresh interpreters (spawn): each patches its own copy of the backend
        context = multiprocessing.get_context("spawn")
        with context.Pool(jobs) as pool:
            parts = pool.starmap(compile_cases, [(args.arch, todo[i::jobs]) for i in range(jobs)])
        rows = [row for part_rows, _ in parts for row in part_rows]
        failures = [message for _, part_failures in parts for message in part_failures]
    for message in failures:
        print(message)
    distinct = list({(row["kernel"], row["hash"]): row for row in rows}.values())
    print(f"\n{len(distinct)} distinct kernels compiled for sm_{args.arch} from {len(todo)} "
          f"cases, {len(failures)} failures")
    print(f"{'case':<46} {'kernel':<18} {'regs':>4} {'stack':>5} {'shared':>7} {'warps':>5} "
          f"tensor cores")
    for row in sorted(distinct, key=lambda row: (row["kernel"], row["case"])):
        print(f"{row['case']:<46} {row['kernel']:<18} {row['registers']!s:>4} "
              f"{row['stack_bytes']!s:>5} {row['shared_bytes']:>7} {row['warps']:>5} "
              f"{row['mma'] or '-'}")
    if args.json:
        args.json.write_text(json.dumps(dict(triton=triton.__version__, arch=args.arch,
                                             rows=distinct, failures=failures), indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
