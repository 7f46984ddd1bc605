"""Age estimation with coarse labels (the paper's Figure 1).

Train a narrow ResNet-18 with a ONE-dimensional feature to tell the younger half from the older half
(age below / above the training median) with cross-entropy, label smoothing or FIERCE, then read the
exact age off that single feature: orient it (the younger half of the TRAINING set must have the lower
mean feature), map it onto the training age distribution by 1-D optimal transport, and report the MSE to
the true ages on the test set (the test set's ages and coarse labels enter only that error).

    python experiments/age/run.py             # digits-rotation STAND-IN, ~6 min on 2 CPU cores
    python experiments/age/run.py --quick     # CI-sized
    python experiments/age/run.py --dataset utkface --root UTKFace/
    python experiments/age/run.py --dataset imdb-wiki --data imdb_crop/imdb.mat
"""
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

try:
    import fierce_ext
except ImportError as error:  # pragma: no cover - a clear message instead of a bare traceback
    raise SystemExit(f"error: cannot import fierce_ext ({error}); install it or run from the repository root") from None

from experiments.age.data import DATASETS, load_digits_rotation, load_imdb_wiki, load_utkface
from experiments.age.model import AgeResNet
from experiments.common import (CrossEntropyCriterion, FIERCECriterion, LabelSmoothingCriterion, accuracy,
                                collect_outputs, ot_age_mse, seed_everything, train_epoch)
from experiments.common.cli import (RESULTS_ROOT, apply_defaults, base_parser, check_device_backend, resolve_device,
                                    resolve_parallelism)
from experiments.common.experiment import payload, run_grid
from experiments.common.plotting import plot_metrics
from experiments.common.results import markdown_table, write_json, write_markdown

DEFAULTS = dict(epochs=30, seeds=3, batch_size=128, lr=1e-3, lam=0.2, ls_epsilon=0.1, image_size=None)
# --quick: ~100 optimiser steps (batch 32, 560 training digits, 5 epochs), enough for CE to learn the coarse
# task and for the BatchNorm running statistics to settle; ~10 s on 2 busy cores.
QUICK = dict(epochs=5, seeds=1, batch_size=32, limit=800)
BINS = 100  # bins at ages 1..100, as in the paper's code
EVAL_NOISE_SEED = 0
# The reported entropy is computed on the CPU (collect_outputs returns CPU tensors) with the torch backend,
# whatever --backend trains with: every backend draws the same noise, and triton / cuda cannot run there.
EVAL_BACKEND = "torch"
METRICS = ["test_accuracy", "age_mse", "entropy_bits"]
CRITERION_NAMES = {"ce": "CE", "ls": "Label smoothing", "fierce": "FIERCE"}


def parse_args(argv=None):
    parser = base_parser(__doc__.split("\n\n")[0], DATASETS, "digits-rotation")
    parser.add_argument("--images", type=Path, default=None,
                        help="imdb-wiki: folder the listed image paths are relative to (default: the metadata's folder)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 16 for digits, 64 for faces")
    parser.add_argument("--copies", type=int, default=None, help="digits-rotation only: rotated copies of each "
                                                                   "digit (default 1)")
    parser.add_argument("--limit", type=int, default=None,
                        help="use at most this many samples (digits-rotation: the first digits, all copies of each, "
                             "cut at N samples; face datasets: a random subset)")
    parser.add_argument("--workers", type=int, default=0,
                        help="data loader worker processes (worth it for face images read from disk; results do "
                             "not depend on it)")
    parser.add_argument("--feature-init", choices=["range", "default"], default="range",
                        help="range: affine map set so the feature starts spread over the bins 1..100, zero "
                             "classifier; default: PyTorch's initialisation")
    args = parser.parse_args(argv)
    if args.images is not None and args.dataset != "imdb-wiki":
        parser.error(f"--images applies to --dataset imdb-wiki only, not {args.dataset}")
    if args.copies is not None and args.dataset != "digits-rotation":
        parser.error(f"--copies applies to --dataset digits-rotation only, not {args.dataset}")
    if args.copies is None:
        args.copies = 1
    if args.quick and args.limit is None:
        args.limit = QUICK["limit"]
    args = apply_defaults(args, DEFAULTS, {k: v for k, v in QUICK.items() if k != "limit"})
    check_device_backend(parser, args)
    if args.image_size is None:
        args.image_size = 16 if args.dataset == "digits-rotation" else 64
    if args.image_size < 8:
        parser.error("--image-size must be >= 8")
    if args.copies < 1 or (args.limit is not None and args.limit < 8) or args.workers < 0:
        parser.error("--copies must be >= 1, --limit >= 8, --workers >= 0")
    if args.dataset != "digits-rotation" and args.root is None:
        parser.error(f"--dataset {args.dataset} needs --root/--data")
    return args


def load_data(args):
    if args.dataset == "digits-rotation":
        return load_digits_rotation(seed=args.data_seed, copies=args.copies, image_size=args.image_size,
                                    limit=args.limit)
    kwargs = dict(seed=args.data_seed, image_size=args.image_size, limit=args.limit)
    if args.dataset == "utkface":
        return load_utkface(args.root, **kwargs)
    return load_imdb_wiki(args.root, images=args.images, **kwargs)


def make_criterion(name, args):
    if name == "ce":
        return CrossEntropyCriterion()
    if name == "ls":
        return LabelSmoothingCriterion(args.ls_epsilon)
    entropy = fierce_ext.FeatureEntropy(1, bins=BINS, similarity="distance", estimator="gumbel_hard",
                                        dictionary=fierce_ext.bin_dictionary(BINS, 1, BINS), backend=args.backend)
    return FIERCECriterion(entropy, args.lam, normalized=True)  # (CE + alpha (log2 K - H)) / (1 + alpha)


class CoarseLabels(torch.utils.data.Dataset):
    """Wrap an (image, age) dataset into (image, coarse label)."""

    def __init__(self, dataset, median_age: float):
        self.dataset, self.median_age = dataset, median_age

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, age = self.dataset[index]
        return image, (age >= self.median_age).long()


def train_loader(dataset, batch_size: int, workers: int, seed: int) -> DataLoader:
    """Shuffled training batches whose order depends on ``seed`` and the epoch only, not on ``workers``.

    The permutations come from the sampler's own generator; the DataLoader's generator (a separate one)
    only draws the per-iterator base seed of the workers. With one shared generator, as with
    ``DataLoader(shuffle=True, generator=g)``, that draw happens once per iterator, i.e. once per epoch
    without persistent workers and once per run with them, so the permutations would depend on
    ``workers``. Workers persist across epochs (no pool restarted every epoch)."""
    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
                      drop_last=len(dataset) > batch_size)


def eval_loader(dataset, workers: int) -> DataLoader:
    """Batches in order. Its own generator: a DataLoader without one draws its workers' base seed from
    torch's global generator at every iteration, which FIERCE's noise seeds (seed=None) also draw from."""
    return DataLoader(dataset, batch_size=256, num_workers=workers, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(0))


def train_one(context: dict, criterion_name: str, seed: int) -> dict:
    """Train one model with one criterion and seed; per-epoch metrics on the test set.
    Module-level (not a closure) so that parallel runs can pickle it."""
    args, device, progress, split = context["args"], torch.device(context["device"]), context["progress"], context["split"]
    median = split.median_age
    train_set, test_set = CoarseLabels(split.train, median), CoarseLabels(split.test, median)
    test_ages = split.test_ages.astype(np.float64)
    eval_dictionary = fierce_ext.bin_dictionary(BINS, 1, BINS)
    seed_everything(seed)
    model = AgeResNet(in_channels=split.in_channels).to(device)
    criterion = make_criterion(criterion_name, args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = train_loader(train_set, args.batch_size, args.workers, seed)
    train_eval, test_eval = eval_loader(train_set, args.workers), eval_loader(test_set, args.workers)
    if args.feature_init == "range":
        # Same start for every criterion: the feature spread over the bins 1..100 (so the entropy term acts
        # from the first step), and a zero classifier (so features of that scale do not start with huge
        # logits and a huge cross-entropy).
        init_batch = next(iter(DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                          generator=torch.Generator().manual_seed(seed))))[0]
        model.init_feature_range(init_batch.to(device), low=1.0, high=float(BINS))
        torch.nn.init.zeros_(model.classifier.weight)
        torch.nn.init.zeros_(model.classifier.bias)
    history = []
    epochs = tqdm(range(1, args.epochs + 1), desc=f"{criterion_name} seed {seed}", leave=False,
                  disable=not progress, dynamic_ncols=True)
    for epoch in epochs:
        record = {"epoch": epoch, **train_epoch(model, loader, criterion, optimizer, device, progress)}
        logits, features, labels = collect_outputs(model, test_eval, device)
        # The read-out's sign comes from the training set (features and coarse labels), never the test set.
        _, train_features, train_labels = collect_outputs(model, train_eval, device)
        record["test_accuracy"] = accuracy(logits, labels)
        record["age_mse"] = ot_age_mse(features.numpy(), test_ages, split.train_ages,
                                       train_features=train_features.numpy(), train_is_young=train_labels.numpy() == 0)
        record["entropy_bits"] = fierce_ext.entropy(features, eval_dictionary, similarity="distance",
                                                    estimator="gumbel_hard", seed=EVAL_NOISE_SEED,
                                                    backend=EVAL_BACKEND).item()
        record["feature_std"] = features.std().item()
        history.append(record)
        epochs.set_postfix(acc=f"{record['test_accuracy']:.3f}", mse=f"{record['age_mse']:.0f}",
                           H=f"{record['entropy_bits']:.2f}")
    return {"history": history, "final": {m: history[-1][m] for m in METRICS}}


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    device = resolve_device(args.device)
    jobs, threads = resolve_parallelism(args, device, len(args.criteria) * args.seeds)
    progress = not args.no_progress
    out_dir = args.out or RESULTS_ROOT / "age"
    split = load_data(args)
    test_ages = split.test_ages.astype(np.float64)
    dataset_info = {**split.info, "n_train": len(split.train), "n_test": len(split.test),
                    "median_age": split.median_age,
                    # predicting the training mean age for everyone: what a feature without age information gets
                    "constant_prediction_mse": float(np.mean((test_ages - split.train_ages.mean()) ** 2))}
    context = {"args": args, "device": str(device), "progress": progress and jobs == 1, "split": split}
    runs = run_grid(args.criteria, args.seeds, args.seed, partial(train_one, context), progress, jobs, threads)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(jobs=jobs, threads=threads,
                  model="ResNet-18 [2,2,2,2], width 16, stride-1 stem, no max-pool, 1-D feature + affine, linear 1->2",
                  feature_init=("affine map set on one training batch (feature mean 50.5, std 16.5), zero classifier"
                                if args.feature_init == "range" else "PyTorch default"),
                  optimizer="Adam", fierce="(CE + lam (log2 100 - H)) / (1 + lam), distance similarity, "
                                          "bins at 1..100, gumbel_hard",
                  age_readout="sign from the training set's features and coarse labels, 1-D OT (POT emd_1d) "
                              "of the test features onto the training ages",
                  entropy_eval=f"whole test set, bins 1..100, gumbel_hard, noise seed {EVAL_NOISE_SEED}, "
                               f"{EVAL_BACKEND} backend on the CPU")
    result = payload("age", dataset_info, config, runs, METRICS, started)
    write_outputs(out_dir, result, runs)
    print(f"wrote {out_dir}/results.json, results.md, curves.png ({result['total_wall_time_s']:.0f} s)")
    return result


def write_outputs(out_dir: Path, result: dict, runs: list[dict]) -> None:
    dataset, config, env = result["dataset"], result["config"], result["environment"]
    tag = " [STAND-IN: rotated digits, angle plays the age]" if dataset["stand_in"] else ""
    unit = dataset.get("age_unit", "years")
    write_json(out_dir / "results.json", result)
    table = markdown_table(result["summary"], [("test_accuracy", "coarse accuracy", 3),
                                               ("age_mse", f"age MSE ({unit}²)", 0),
                                               ("entropy_bits", "feature entropy (bits)", 2)], CRITERION_NAMES)
    write_markdown(out_dir / "results.md", f"Age estimation with coarse labels{tag}", [
        f"Data: {dataset['description']}; {dataset['n_train']} train / {dataset['n_test']} test samples; "
        f"coarse label = age below the training median ({dataset['median_age']:.1f} {unit}).",
        f"Mean ± std over {config['seeds']} seeds (seeds {config['seed']}..{config['seed'] + config['seeds'] - 1}), "
        f"{config['epochs']} epochs, alpha = {config['lam']}, LS epsilon = {config['ls_epsilon']}; metrics on the "
        f"test set at the last epoch. For scale: predicting the mean age for everyone gives MSE "
        f"{dataset['constant_prediction_mse']:.0f}. Machine: {env['cpu_count']} CPU cores, torch {env['torch']}, "
        f"device {config['device']}, backend {config['backend']}; total {result['total_wall_time_s']:.0f} s.",
    ], table)
    plot_metrics(runs, [("age_mse", f"age MSE via 1-D OT ({unit}²)"), ("entropy_bits", "feature entropy (bits)"),
                        ("test_accuracy", "coarse test accuracy")],
                 f"Age estimation, coarse labels{tag}", out_dir / "curves.png")


if __name__ == "__main__":
    main()
