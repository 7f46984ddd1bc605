"""examples/ddp_train.py does what README.md and examples/README.md say: run by torchrun with 2
processes (CPU, gloo) it trains and prints, step by step, the numbers a single-process run prints
(FIERCELoss(sync=True) makes a DDP step the single-process step on the whole batch)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch.distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
# step   0  loss -1.2664  (cross-entropy 1.1478)  entropy 4.8283 bits (global batch)
STEP_LINE = re.compile(r"^step +(\d+) +loss ([-+.\d]+) +\(cross-entropy ([-.\d]+)\) +"
                       r"entropy ([-.\d]+) bits", re.M)


def _run_example(*launcher: str) -> tuple[str, list[tuple[float, float, float]]]:
    """The example's output and its (loss, cross-entropy, entropy) per step."""
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([*launcher, "examples/ddp_train.py", "--steps", str(STEPS)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [(int(m[1]), float(m[2]), float(m[3]), float(m[4]))
             for m in STEP_LINE.finditer(done.stdout)]
    assert [s[0] for s in steps] == list(range(STEPS)), done.stdout
    return done.stdout, [s[1:] for s in steps]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_example_under_torchrun_prints_the_single_process_numbers():
    single_out, single = _run_example(sys.executable)
    ddp_out, ddp = _run_example(sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc_per_node", "2")
    assert "1 process(es), global batch 256" in single_out
    assert "2 process(es), global batch 256 (128 per rank)" in ddp_out
    # Printed to 4 decimals; float rounding of the two runs may move the last one.
    for step, (one, two) in enumerate(zip(single, ddp)):
        assert two == pytest.approx(one, abs=2e-4), (step, single_out, ddp_out)
    # It trains: the cross-entropy falls over the steps.
    assert single[-1][1] < single[0][1]
