"""The outer loop every experiment shares: criteria x seeds (optionally in parallel processes), timing,
and the result payload."""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable

import torch
from tqdm import tqdm

from .results import environment, summarize


def default_jobs(device: torch.device, n_runs: int) -> int:
    """One process per core on the CPU (the models are small: one thread each uses the cores better than
    intra-op threading, measured 2x vs 1.3x on 2 cores); a single process on an accelerator."""
    if device.type != "cpu":
        return 1
    return max(1, min(os.cpu_count() or 1, n_runs))


def _timed(run_one: Callable[[str, int], dict], criterion: str, seed: int, threads: int | None) -> dict:
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()  # what this run computes with, recorded per run
        start = time.perf_counter()
        result = run_one(criterion, seed)
        return {"criterion": criterion, "seed": seed, **result, "wall_time_s": round(time.perf_counter() - start, 2),
                "torch_threads": used}
    finally:
        torch.set_num_threads(previous)  # in-process runs leave the caller's setting alone


def run_grid(criteria: list[str], seeds: int, first_seed: int, run_one: Callable[[str, int], dict],
             progress: bool = True, jobs: int = 1, threads: int | None = None) -> list[dict]:
    """Call ``run_one(criterion, seed)`` for every pair; each returns {"history": [...], "final": {...}}.

    With ``jobs > 1`` the pairs run in that many spawned processes (``run_one`` must then be picklable,
    e.g. a ``functools.partial`` of a module-level function); every run seeds itself, so results do not
    depend on ``jobs``. Results come back in criteria x seeds order.
    """
    pairs = [(criterion, first_seed + offset) for criterion in criteria for offset in range(seeds)]
    if jobs <= 1:
        return [_timed(run_one, c, s, threads) for c, s in tqdm(pairs, desc="runs", disable=not progress,
                                                                 dynamic_ncols=True)]
    context = multiprocessing.get_context("spawn")  # fork + torch threads can deadlock
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_timed, run_one, c, s, threads) for c, s in pairs]
        with tqdm(total=len(futures), desc=f"runs ({jobs} processes)", disable=not progress,
                  dynamic_ncols=True) as bar:
            for future in as_completed(futures):
                future.result()  # re-raise a worker's error here, early
                bar.update(1)
        return [future.result() for future in futures]


def payload(experiment: str, dataset: dict, config: dict, runs: list[dict], metrics: list[str],
            started: float, **extra) -> dict:
    # The threads the runs used (set per run, in their own processes), not the parent's default.
    used = sorted({run["torch_threads"] for run in runs if "torch_threads" in run})
    env = environment()
    env["torch_threads"] = used[0] if len(used) == 1 else used
    return {
        "experiment": experiment,
        "dataset": dataset,
        "config": config,
        "environment": env,
        "total_wall_time_s": round(time.perf_counter() - started, 2),
        "summary": summarize(runs, metrics),
        **extra,
        "runs": runs,
    }
