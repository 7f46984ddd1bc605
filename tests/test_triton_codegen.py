"""The Triton kernels compile for a real GPU (sm_90), with the launchers' own arguments.

The interpreter tests check what the kernels compute; this checks what only a compilation sees
(tl.dot tile rules, MLIR type rules, shared memory, launch-time checks). It runs
tests/triton_codegen.py in a fresh process, since that must import the kernels without
TRITON_INTERPRET, which tests/conftest.py sets for this process.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fierce_ext.backends import triton_noise

if triton_noise.IMPORT_ERROR:  # not installed, broken or too old; CI asserts that it is None
    pytest.skip(triton_noise.IMPORT_ERROR, allow_module_level=True)

SCRIPT = Path(__file__).with_name("triton_codegen.py")


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # really compile, every time
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=1200)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert " 0 failures" in output, output[-4000:]
    compiled = int(output.split(" distinct kernels compiled")[0].split()[-1])
    assert compiled >= 20, output[-4000:]  # every kernel, in many specialisations
