"""Peak memory of the torch backend: O(chunk * C * K + B * C), never O(B * C * K)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

B, D, C, K = 200_000, 64, 8, 512
GIB = 2**30

# estimator="softmax": the memory pattern (chunks, recompute in the backward, per-row lse) is the
# same for every estimator, but the CPU Philox noise costs ~80 ns per element (more on a loaded
# machine) and would add minutes at B*C*K = 819M elements, twice (forward and recompute).
CHILD = textwrap.dedent(f"""
    import json, resource, torch, fierce_ext

    def rss():  # current resident set, bytes
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    features = torch.randn({B}, {D}, requires_grad=True)
    dictionary = fierce_ext.uniform_dictionary({D}, bins={K}, heads={C})
    before = rss()
    h = fierce_ext.entropy(features, dictionary, estimator="softmax", seed=0, backend="torch")
    h.backward()
    finite = bool(torch.isfinite(h)) and bool(torch.isfinite(features.grad).all())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps(dict(before=before, peak=peak, finite=finite, entropy=float(h.detach()))))
""")


def test_torch_backend_peak_memory():
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=900, env=env, cwd=repo)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["finite"]

    # What the materialising reference needs: every B x C x K float32 tensor is 3.05 GiB, and
    # its forward holds at least the similarities, the logits and the softmax at once.
    one_tensor = B * C * K * 4
    reference_need = 3 * one_tensor
    peak, extra = result["peak"], result["peak"] - result["before"]
    print(f"\ntorch backend B={B} D={D} C={C} K={K} softmax fwd+bwd: peak RSS "
          f"{peak / GIB:.2f} GiB (extra over inputs {extra / GIB:.3f} GiB); one B*C*K fp32 "
          f"tensor {one_tensor / GIB:.2f} GiB, reference needs >= {reference_need / GIB:.1f} GiB")
    assert peak < 3 * GIB
    # The backend's own extra memory is a small fraction of ONE materialised B*C*K tensor.
    assert extra < one_tensor / 4
