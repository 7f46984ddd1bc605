"""What the GPU tests measured: each comparison's error beside the bound it asserts.

A GPU session is rare and short, and the first one must also say how tight each tolerance can be.
`assert within(quantity, error, bound)` records one comparison of the running test, then the test
asserts it (recorded first, so a failing test leaves its numbers too). Where
FIERCE_MEASURED_ERRORS names a folder (benchmarks/device_check.sh sets it), every process appends
its records to its own JSON-lines file there, one line per call, flushed at once: a failed,
timed-out or killed run keeps what it measured. Without the variable nothing is written.

    python tests/measured_errors.py FOLDER [--top N]

prints the worst error / bound per test, mode and quantity (--top: the N nearest their bound).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

FOLDER_ENV = "FIERCE_MEASURED_ERRORS"
# The modes the GPU modules parametrise over, as they appear in test ids ([tf32-dot-softmax]).
MODES = ("float16", "bfloat16", "tf32", "float32", "float64")


def record(quantity: str, error: float, bound: float, mode: str | None = None) -> None:
    """Note that the running test measured `error` for `quantity` and asserts error <= bound.
    `mode` names the precision mode where the test id does not."""
    folder = os.environ.get(FOLDER_ENV)
    if not folder:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" (", 1)[0]
    line = json.dumps({"test": test, "mode": mode, "quantity": quantity,
                       "error": float(error), "bound": float(bound)})
    Path(folder).mkdir(parents=True, exist_ok=True)
    with open(Path(folder) / f"errors-{os.getpid()}.jsonl", "a") as file:
        file.write(line + "\n")


def within(quantity: str, error, bound, mode: str | None = None) -> bool:
    """Records `error` against `bound` for `quantity` and returns whether error <= bound (False
    for NaN). Tensors compare elementwise; the element nearest (or furthest over) its bound is
    the one recorded."""
    if hasattr(error, "flatten"):  # a tensor; the bound a tensor or number that expands to it
        error = error.double()
        bound = (bound.double() if hasattr(bound, "flatten")
                 else error.new_tensor(bound)).expand_as(error)
        worst = (error / bound).flatten().argmax()
        record(quantity, error.flatten()[worst].item(), bound.flatten()[worst].item(), mode)
        return bool((error <= bound).all())
    record(quantity, error, bound, mode)
    return error <= bound


def _group(test: str) -> tuple[str, str]:
    """(test function, mode) of a test id such as tests/gpu/test_x.py::test_f[tf32-dot]."""
    name, _, params = test.split("::")[-1].partition("[")
    tokens = params.rstrip("]").split("-")
    return name, next((t for t in tokens if t in MODES), "-")


def _ratio(error: float, bound: float) -> float:
    if math.isnan(error):
        return math.inf
    return error / bound if bound > 0 else (0.0 if error == 0 else math.inf)


def summary(folder: str | Path, top: int | None = None) -> list[str]:
    """One line per (test function, mode, quantity): the largest error / bound over its cases
    (1.0 is at the bound; above it the test failed), with that case's error and bound; sorted
    by name, or only the `top` largest ratios, largest first."""
    worst: dict[tuple[str, str, str], tuple[float, dict]] = {}
    count = 0
    for path in sorted(Path(folder).glob("errors-*.jsonl")):
        for text in path.read_text().splitlines():
            try:
                entry = json.loads(text)
            except json.JSONDecodeError:  # a line cut off by a killed process
                continue
            count += 1
            name, mode = _group(entry["test"])
            key = (name, entry.get("mode") or mode, entry["quantity"])
            ratio = _ratio(entry["error"], entry["bound"])
            if key not in worst or ratio > worst[key][0]:
                worst[key] = (ratio, entry)
    if not worst:
        return [f"no measured errors under {folder}"]
    rows = sorted(worst.items())
    which = "the worst case per test, mode and quantity"
    if top is not None:
        rows = sorted(rows, key=lambda row: -row[1][0])[:top]
        which += f", the {len(rows)} of {len(worst)} nearest their bound"
    lines = [f"measured error / asserted bound over {count} comparisons, {which} "
             "(1.0 = at the bound):"]
    width = max((len(name) for (name, _, _), _ in rows), default=0)
    for (name, mode, quantity), (ratio, entry) in rows:
        lines.append(f"  {name:<{width}}  {mode:<8} {quantity:<13} {ratio:8.3g}   "
                     f"(error {entry['error']:.3g}, bound {entry['bound']:.3g})")
    return lines


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--top", type=int, default=None)
    options = parser.parse_args()
    print("\n".join(summary(options.folder, options.top)))
