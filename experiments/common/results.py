"""Result files: one JSON with everything, a Markdown table of mean +- std over seeds."""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def mean_std(values: Iterable[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single seed) of the finite values."""
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size)}


def summarize(runs: list[dict], metrics: Iterable[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{criterion: {metric: mean_std over the runs' final values}} in the order the criteria were run."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for criterion in dict.fromkeys(run["criterion"] for run in runs):
        finals = [run["final"] for run in runs if run["criterion"] == criterion]
        summary[criterion] = {m: mean_std(f.get(m) for f in finals) for m in metrics}
    return summary


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=_json_default, allow_nan=True) + "\n")
    tmp.replace(path)  # never leave a half-written file behind


def format_mean_std(stats: dict[str, float], digits: int = 3) -> str:
    if stats["n"] == 0:
        return "n/a"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(
    summary: dict[str, dict[str, dict[str, float]]],
    columns: list[tuple[str, str, int]],
    criterion_names: dict[str, str],
) -> str:
    """Rows: criteria; columns: (metric key, header, decimal digits)."""
    header = "| criterion | " + " | ".join(title for _, title, _ in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    rows = [
        f"| {criterion_names.get(c, c)} | " + " | ".join(format_mean_std(summary[c][k], d) for k, _, d in columns) + " |"
        for c in summary
    ]
    return "\n".join([header, rule, *rows])


def write_markdown(path: Path, title: str, preamble: list[str], table: str, footer: list[str] = ()) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join([f"# {title}", *preamble, table, *footer]) + "\n"
    path.write_text(text)
