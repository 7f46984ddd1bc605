"""Figures in the paper's style: CE red, FIERCE green, label smoothing blue; mean +- std over seeds."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"ce": "tab:red", "fierce": "tab:green", "ls": "tab:blue"}
LABELS = {"ce": "CE", "fierce": "FIERCE", "ls": "Label smoothing"}


def metric_curves(runs: list[dict], metric: str) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{criterion: (epochs, mean, sample std)} over the seeds, using the epochs where the metric was recorded."""
    curves = {}
    for criterion in dict.fromkeys(run["criterion"] for run in runs):
        series = []
        for run in runs:
            if run["criterion"] != criterion:
                continue
            points = [(h["epoch"], h[metric]) for h in run["history"] if h.get(metric) is not None]
            series.append(points)
        if not series or not series[0]:
            continue
        epochs = np.array([e for e, _ in series[0]])
        length = min(len(s) for s in series)
        values = np.array([[v for _, v in s[:length]] for s in series], dtype=np.float64)
        # Sample std (ddof=1) like the tables' mean_std; 0 for a single seed.
        std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(length)
        curves[criterion] = (epochs[:length], values.mean(axis=0), std)
    return curves


def plot_metrics(runs: list[dict], panels: list[tuple[str, str]], title: str, path: Path,
                 log_scale: tuple[str, ...] = ()) -> None:
    """One panel per (metric key, y label), a line per criterion, shaded +- one std over seeds."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (metric, ylabel) in zip(axes[0], panels):
        for criterion, (epochs, mean, std) in metric_curves(runs, metric).items():
            color = COLORS.get(criterion, None)
            axis.plot(epochs, mean, color=color, label=LABELS.get(criterion, criterion), lw=1.6)
            axis.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.2, lw=0)
        axis.set_xlabel("epoch")
        axis.set_ylabel(ylabel)
        if metric in log_scale:
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
    axes[0][0].legend(frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_final_bars(summary: dict, panels: list[tuple[str, str]], title: str, path: Path) -> None:
    """Bar chart of the final metrics (mean +- std over seeds), one panel per metric."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4), squeeze=False)
    criteria = list(summary)
    for axis, (metric, ylabel) in zip(axes[0], panels):
        means = [summary[c][metric]["mean"] for c in criteria]
        stds = [summary[c][metric]["std"] for c in criteria]
        axis.bar([LABELS.get(c, c) for c in criteria], means, yerr=stds, capsize=4,
                 color=[COLORS.get(c, "gray") for c in criteria])
        axis.set_ylabel(ylabel)
        axis.tick_params(axis="x", labelrotation=15)
        axis.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
