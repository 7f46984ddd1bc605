"""Command-line options shared by the experiments."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import fierce_ext
from fierce_ext.backends import BACKENDS

from .losses import CRITERIA

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_ROOT = REPO_ROOT / "experiments" / "results"


def base_parser(description: str, datasets: list[str], default_dataset: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dataset", choices=datasets, default=default_dataset)
    parser.add_argument("--root", "--data", dest="root", type=Path, default=None,
                        help="dataset file or folder (required for the non-default datasets)")
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA),
                        help="training criteria to compare")
    parser.add_argument("--lam", type=float, default=None, help="FIERCE weight (lambda / alpha)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None, help="number of training seeds per criterion")
    parser.add_argument("--seed", type=int, default=0, help="first training seed (seeds are seed..seed+N-1)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the data generation and split")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--ls-epsilon", type=float, default=None, help="label smoothing epsilon")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                        help="fierce_ext backend of the training criterion (passed through as backend=); checked "
                             "against fierce_ext.available_backends(--device)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="runs in parallel processes (default: one per CPU core on the CPU, 1 on a GPU or "
                             "under --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default on the CPU: 1, see README)")
    parser.add_argument("--out", type=Path, default=None, help="output folder")
    parser.add_argument("--quick", action="store_true", help="CI-sized run (under a minute on 2 cores)")
    parser.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return parser


def apply_defaults(args: argparse.Namespace, defaults: dict, quick: dict) -> argparse.Namespace:
    """Fill the options left unset with the experiment's defaults (``quick`` ones under --quick)."""
    chosen = {**defaults, **(quick if args.quick else {})}
    for key, value in chosen.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    for key in ("epochs", "seeds", "batch_size"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be >= 1")
    if args.lam is not None and args.lam < 0:
        raise SystemExit("error: --lam must be >= 0")
    if args.ls_epsilon is not None and not 0 <= args.ls_epsilon <= 1:
        raise SystemExit("error: --ls-epsilon must be in [0, 1]")
    if args.threads is not None and args.threads < 1:
        raise SystemExit("error: --threads must be >= 1")
    if args.jobs is not None and args.jobs < 1:
        raise SystemExit("error: --jobs must be >= 1")
    repeated = sorted({c for c in args.criteria if args.criteria.count(c) > 1})
    if repeated:
        raise SystemExit(f"error: --criteria lists {', '.join(repeated)} more than once (use --seeds for repeats)")
    return args


def check_device_backend(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fail at parse time, with the reason, when --backend cannot run on --device (e.g. triton or cuda on
    the CPU), instead of a traceback at the first training step."""
    device = resolve_device(args.device)
    if args.backend == "auto":
        return
    status = fierce_ext.available_backends(device)
    if not status[args.backend].available:
        usable = ["auto"] + [name for name, s in status.items() if s.available]
        parser.error(f"--backend {args.backend} cannot run on --device {args.device}: {status[args.backend].reason} "
                     f"(usable there: {', '.join(usable)})")


def resolve_parallelism(args: argparse.Namespace, device: torch.device, n_runs: int) -> tuple[int, int | None]:
    """(processes, torch threads per process). On the CPU the models are too small for intra-op threads
    to pay (measured on 2 cores: the MLP gains nothing, the ResNet 1.3x, and on a busy machine spinning
    threads run 10x slower), so each run gets one thread and the cores run separate runs instead."""
    from .experiment import default_jobs

    jobs = args.jobs if args.jobs is not None else (1 if args.quick else default_jobs(device, n_runs))
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    return jobs, threads


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise SystemExit(f"error: bad --device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} requested but CUDA is not available")
    return device
