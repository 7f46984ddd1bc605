"""The host-side floor of a training step: `fierce_ext.entropy` with a backend that does nothing.

    python benchmarks/host_overhead.py [--device cuda] [--shape 256,640,1,100] [--reps 2000]

Registers, for this process only, a backend `noop` whose four functions return preallocated
tensors of the right shapes at once, and times (best of 7 rounds of `--reps` calls, wall clock, the
device synchronised around each round) a forward and a forward+backward of `fierce_ext.entropy`
with it and with each real backend that runs on the device. The noop figures are what the package
and torch's autograd cost around the kernels (argument checks, the seed, the autograd.Function,
`.backward()` itself); a real backend's figure minus noop's is its own launches and kernels, and
on a GPU, where the host runs ahead of the device, a real figure close to noop's means the step is
bound by the host. The shape matters only to the real backends. A backend that raises gets its
error on its row; the exit status is 1 only if no backend could be measured.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # fierce_ext from the source tree, as entropy_kernel.py does
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import fierce_ext  # noqa: E402
from fierce_ext import backends  # noqa: E402


def noop_backend(rows, dim, heads, bins, device, dtype):
    """A backend module whose functions return fixed tensors of the right shapes, or None when
    the shape is not the one it was built for."""
    compute = backends.compute_dtype(dtype)
    histogram = torch.full((heads, bins), 1 / bins, dtype=compute, device=device)
    lse = torch.zeros(rows, heads, dtype=compute, device=device)
    grad = torch.zeros(rows, dim, dtype=dtype, device=device)
    entropy = {"mean": torch.zeros((), dtype=compute, device=device),
               "none": torch.zeros(heads, dtype=compute, device=device)}
    module = types.ModuleType("fierce_ext_noop_backend")
    module.NAME = "noop"
    module.unavailable_reason = lambda device: None
    module.histogram_forward = lambda *args: (histogram, lse)
    # Fresh outputs, as a real backend returns (autograd then takes the gradient without a copy).
    module.histogram_backward = lambda *args: torch.empty_like(grad)
    module.entropy_forward = lambda *args: (entropy[args[-1]].clone(), histogram, lse)
    module.entropy_backward = lambda *args: torch.empty_like(grad)
    return module


def register(module) -> None:
    sys.modules[module.__name__] = module
    backends._MODULES[module.NAME] = module.__name__
    backends.BACKENDS = tuple(backends._MODULES)


def best_us(fn, device, reps, rounds=7):
    """Best over `rounds` of the mean time per call of `reps` calls (fewer for slow calls, so
    that a round takes about 0.2 s at most)."""
    fn()  # warm-up (and lazy initialisation)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reps = max(3, min(reps, int(0.2 / max(time.perf_counter() - start, 1e-7))))
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, (time.perf_counter() - start) / reps * 1e6)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="256,640,1,100", help="B,D,C,K (default: few-shot)")
    parser.add_argument("--reps", type=int, default=2000)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows, dim, heads, bins = (int(n) for n in args.shape.split(","))
    register(noop_backend(rows, dim, heads, bins, device, torch.float32))

    features = torch.randn(rows, dim, device=device, requires_grad=True)
    dictionary = fierce_ext.uniform_dictionary(dim, bins, heads, device=device)
    names = ["noop"] + [name for name, status in fierce_ext.available_backends(device).items()
                        if status.available and name not in ("noop", "reference")]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}),"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads, shape B x D x C x K = "
          f"{rows} x {dim} x {heads} x {bins}, fp32, cosine, gumbel_hard, seed=None")
    print(f"{'backend':10} {'forward us':>11} {'fwd+bwd us':>11}")
    measured = 0
    for name in names:
        def forward():
            return fierce_ext.entropy(features, dictionary, backend=name)

        def step():
            features.grad = None
            forward().backward()

        try:  # one failing backend is a result: print it on its row and go on
            times = best_us(forward, device, args.reps), best_us(step, device, args.reps)
        except Exception as error:
            if device.type == "cuda":  # (what it queued before failing, if it can)
                try:
                    torch.cuda.synchronize(device)
                except Exception:
                    pass
            print(f"{name:10} failed: {type(error).__name__}: {error}"[:300])
            continue
        finally:
            features.grad = None
        print(f"{name:10} {times[0]:11.1f} {times[1]:11.1f}")
        measured += 1
    return 0 if measured else 1


if __name__ == "__main__":
    raise SystemExit(main())
