"""Run the GPU test modules on a CPU, to check the tests' own code before a GPU is at hand.

    python tests/gpu/dry_run.py [-h] [-k EXPR | any pytest argument ...]

The GPU tests run only on the GPU machines this project is lent for minutes at a time; a bug in
a test (a wrong tolerance model, a shape the data cannot support) would spend that time. This
script copies the modules of tests/gpu/ into a temporary folder with the few substitutions below
and runs pytest on the copies:
* the `cuda` backend's compiled ops are the CUDA kernels' own source run by the kernel emulator
  (tests/gpu/emulated_cuda_ops.py: CPU kernels registered under the ops' schemas);
* the Triton kernels run in Triton's interpreter, on smaller shapes (its cost grows with the
  number of programs);
* DEVICE is the CPU.
Tests of the CUDA runtime itself (streams, graphs, memory statistics) are deselected, and so are
the cases whose reference cannot be had on a CPU (the paper's eager code in TF32) or that take the
emulator too long. What it cannot check is the device: speed, tensor-core rounding (the
interpreter computes bf16 dots in fp32 and ignores precision flags), races, compiled Triton.
Every substitution must apply, so a changed test module fails here loudly instead of running
unpatched. About 7-10 minutes on 2 cores (26 before the emulator stopped using swapcontext).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parent
ROOT = TESTS.parent

_CUDA_SKIP = ('if not torch.cuda.is_available():  # conftest.py skips this directory too; never '
              'run without CUDA\n    pytest.skip("needs a CUDA device", allow_module_level=True)')
_TRITON_SKIP = ('if not torch.cuda.is_available():  # conftest.py skips this folder too; never '
                'run without CUDA\n    pytest.skip("needs a CUDA device: '
                'torch.cuda.is_available() is False",\n                allow_module_level=True)')

# module: [(text, replacement)], each text present in the module.
SUBSTITUTIONS = {
    "test_cuda_gpu.py": [
        (_CUDA_SKIP, "import emulated_cuda_ops  # noqa: E402,F401  (dry run: emulated ops)"),
        ('DEVICE = torch.device("cuda")', 'DEVICE = torch.device("cpu")'),
    ],
    "test_triton_gpu.py": [
        (_TRITON_SKIP, ""),
        ('DEVICE = torch.device("cuda")', 'DEVICE = torch.device("cpu")'),
        ("ALIGNED = (8192, 512, 4, 256)", "ALIGNED = (200, 40, 2, 140)"),
        ("RAGGED = (8191, 509, 3, 250)", "RAGGED = (203, 37, 3, 150)"),
        ("(1024, 64, 2, 4096)", "(64, 8, 1, 600)"),
        ("torch.rand(4096, 1,", "torch.rand(300, 1,"),
        ("(3000, 96, 2, 130)", "(100, 24, 2, 130)"),
        ("(256, 640, 1, 100)", "(64, 40, 1, 100)"),
        ("(1000,) + RAGGED[1:]", "(100,) + RAGGED[1:]"),
        ('Path(__file__).resolve().parents[2] / "benchmarks"', repr(str(ROOT / "benchmarks"))),
    ],
    "test_integration_gpu.py": [
        ("import fierce_ext\n", "import emulated_cuda_ops  # noqa: F401  (dry run)\nimport "
         "fierce_ext\n"),
        ('device="cuda"', 'device="cpu"'),
        (".cuda()", ".cpu()"),
        ('available_backends("cuda")', 'available_backends("cpu")'),
        ('torch.autocast("cuda"', 'torch.autocast("cpu"'),
    ],
}

DESELECTED = " and ".join(f"not {name}" for name in (
    "streams_and_in_graphs",                 # CUDA streams and graphs
    "graphs_and_determinism",
    "large_batch",                           # 40000 rows: hours in the emulator
    "two-launch",                            # 9000 rows: tens of minutes
    "extra_memory",                          # torch.cuda memory statistics
    "(paper_eager and tf32)",                # the CPU has no TF32 matmul to compare with
))


def prepare(folder: pathlib.Path) -> None:
    shutil.copy(TESTS / "conftest.py", folder / "conftest.py")
    for name, substitutions in SUBSTITUTIONS.items():
        text = (HERE / name).read_text()
        for old, new in substitutions:
            if old not in text:
                raise SystemExit(f"dry_run: {name} no longer contains {old!r}; update "
                                 f"SUBSTITUTIONS")
            text = text.replace(old, new)
        (folder / name).write_text(text)


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):  # every other argument goes to pytest
        print(__doc__)
        return 0
    with tempfile.TemporaryDirectory(prefix="fierce-gpu-dry-run.") as work:
        folder = pathlib.Path(work)
        prepare(folder)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(HERE), str(ROOT),
                                             env.get("PYTHONPATH", "")])
        args = argv if any(a == "-k" or a.startswith("-k") for a in argv) else ["-k", DESELECTED,
                                                                                *argv]
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "--rootdir", work, *args, work]
        return subprocess.run(command, env=env, cwd=work).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
