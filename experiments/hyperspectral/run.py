"""Hyperspectral unmixing with coarse labels (the paper's Table 1).

Train the unmixing MLP on the dominant material of each pixel (argmax of its abundances) with
cross-entropy, label smoothing or FIERCE, then measure how well the abundances (the fine task) can be
read from the network: the softmax output itself (raw MSE) and a linear softmax layer trained on the
frozen 100-d features (transfer MSE), both on the test pixels.

    python experiments/hyperspectral/run.py            # default scene, 3-6 min on 2 CPU cores
    python experiments/hyperspectral/run.py --quick    # CI-sized
    python experiments/hyperspectral/run.py --dataset pickle --data houston.pkl
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
import torch.nn.functional as F
from tqdm import tqdm

try:
    import fierce_ext
except ImportError as error:  # pragma: no cover - a clear message instead of a bare traceback
    raise SystemExit(f"error: cannot import fierce_ext ({error}); install it or run from the repository root") from None

from experiments.common import (CrossEntropyCriterion, FIERCECriterion, LabelSmoothingCriterion, ScaledCosineEntropy,
                                TensorBatches, abundance_mse, accuracy, collect_outputs, seed_everything, train_epoch,
                                transfer_mse)
from experiments.common.cli import (RESULTS_ROOT, apply_defaults, base_parser, check_device_backend, resolve_device,
                                    resolve_parallelism)
from experiments.common.experiment import payload, run_grid
from experiments.common.plotting import plot_final_bars, plot_metrics
from experiments.common.results import markdown_table, write_json, write_markdown
from experiments.hyperspectral.data import generate_scene, load_paper_pickle, split_indices
from experiments.hyperspectral.model import UnmixingMLP

DATASETS = ["houston-like", "pickle"]
DEFAULTS = dict(epochs=200, seeds=3, batch_size=200, lr=1e-4, lam=1.0, ls_epsilon=0.4, transfer_every=50)
QUICK = dict(epochs=4, seeds=1, transfer_every=4)
ENTROPY_BINS = 100
EVAL_NOISE_SEED = 0  # fixed Gumbel noise for the reported (test-set) entropy, so epochs are comparable
# The reported entropy is computed on the CPU (collect_outputs returns CPU tensors) with the torch backend,
# whatever --backend trains with: every backend draws the same noise, and triton / cuda cannot run there.
EVAL_BACKEND = "torch"
PAPER_TABLE_1 = {"raw_mse": {"ce": 0.186, "ls": 0.066, "fierce": 0.130},
                 "transfer_mse": {"ce": 0.177, "ls": 0.02, "fierce": 0.006}}
METRICS = ["test_accuracy", "raw_mse", "transfer_mse", "entropy_bits", "feature_norm", "dead_units"]
CRITERION_NAMES = {"ce": "CE", "ls": "Label smoothing", "fierce": "FIERCE"}


def parse_args(argv=None):
    parser = base_parser(__doc__.split("\n\n")[0], DATASETS, "houston-like")
    parser.add_argument("--transfer-every", type=int, default=None,
                        help="evaluate the transfer MSE every N epochs (and at the first and last ones)")
    parser.add_argument("--input-scaling", choices=["standardize", "none"], default="standardize",
                        help="per-band standardisation of the pixels (training statistics), or raw values")
    parser.add_argument("--fierce-scale", type=float, default=None,
                        help="FIERCE with the similarity S * cos(r, w) against the same dictionary instead of "
                             "the paper's dot product: the features' norm no longer moves the estimate "
                             "(see the README)")
    args = apply_defaults(parser.parse_args(argv), DEFAULTS, QUICK)
    if args.transfer_every < 1:
        parser.error("--transfer-every must be >= 1")
    if args.fierce_scale is not None and not 0 < args.fierce_scale < float("inf"):
        parser.error("--fierce-scale must be finite and > 0")
    if args.dataset == "pickle" and args.root is None:
        parser.error("--dataset pickle needs --data PATH to the paper's pickle file")
    check_device_backend(parser, args)
    return args


def load_data(args):
    if args.dataset == "pickle":
        scene = load_paper_pickle(args.root)
        description = f"the paper's data file {args.root}"
        stand_in = False
    else:
        scene = generate_scene(seed=args.data_seed)
        description = ("STAND-IN: synthetic Houston-like scene, extended linear mixing model of earthlib "
                       "spectra (measured urban spectra; vegetation = PROSAIL simulations), 30 dB SNR")
        stand_in = True
    train, test = split_indices(len(scene.labels), 0.7, seed=args.data_seed)
    if args.input_scaling == "standardize":
        # Per-band standardisation with training statistics. Besides conditioning, the input scale sets
        # the initial feature scale, which the dot-similarity entropy estimator is sensitive to: raw
        # reflectances (~0.1-0.4) start the features inside the Gumbel-noise regime (see the README).
        mean, std = scene.pixels[train].mean(axis=0), scene.pixels[train].std(axis=0) + 1e-8
        scene.pixels = ((scene.pixels - mean) / std).astype(np.float32)
    tensors = {name: (torch.from_numpy(scene.pixels[idx]), torch.from_numpy(scene.labels[idx]),
                      torch.from_numpy(scene.abundances[idx])) for name, idx in (("train", train), ("test", test))}
    info = {"name": args.dataset, "description": description, "stand_in": stand_in,
            "pixels": len(scene.labels), "image": [scene.height, scene.width], "bands": scene.pixels.shape[1],
            "materials": list(scene.material_names), "n_train": len(train), "n_test": len(test),
            "class_counts_train": np.bincount(scene.labels[train], minlength=len(scene.material_names)).tolist(),
            **{k: v for k, v in scene.info.items() if k != "name"}}
    return tensors, info


def make_criterion(name, args, feature_dim):
    if name == "ce":
        return CrossEntropyCriterion()
    if name == "ls":
        return LabelSmoothingCriterion(args.ls_epsilon)
    dictionary = fierce_ext.uniform_dictionary(feature_dim, ENTROPY_BINS, low=0.0, high=1.0, seed=0)
    if args.fierce_scale is not None:
        return FIERCECriterion(ScaledCosineEntropy(dictionary, args.fierce_scale, args.backend), args.lam)
    entropy = fierce_ext.FeatureEntropy(feature_dim, bins=ENTROPY_BINS, similarity="dot",
                                        estimator="gumbel_hard", dictionary=dictionary, backend=args.backend)
    return FIERCECriterion(entropy, args.lam, normalized=False)


def make_scheduler(optimizer, epochs: int):
    """The paper decays the rate x0.1 once, at epoch 100 of 200: halfway, whatever --epochs is. (StepLR with
    step_size epochs // 2 decays every epochs // 2 epochs: a second time within the run for odd counts.)
    Stepped once per epoch."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[max(1, epochs // 2)], gamma=0.1)


def train_one(context: dict, criterion_name: str, seed: int) -> dict:
    """Train one model with one criterion and seed; per-epoch metrics on the test pixels.
    Module-level (not a closure) so that parallel runs can pickle it."""
    args, device, progress = context["args"], torch.device(context["device"]), context["progress"]
    (x_train, y_train, a_train), (x_test, y_test, a_test) = context["train"], context["test"]
    # The reported entropy always uses the paper's dictionary and estimator, whatever the criterion.
    eval_dictionary = fierce_ext.uniform_dictionary(100, ENTROPY_BINS, low=0.0, high=1.0, seed=0)
    generator = seed_everything(seed)
    model = UnmixingMLP(x_train.shape[1], a_train.shape[1]).to(device)
    criterion = make_criterion(criterion_name, args, model.feature_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = make_scheduler(optimizer, args.epochs)
    loader = TensorBatches(x_train, y_train, batch_size=args.batch_size, generator=generator)
    train_eval = TensorBatches(x_train, y_train, batch_size=4096, shuffle=False)
    test_eval = TensorBatches(x_test, y_test, batch_size=4096, shuffle=False)
    history = []
    epochs = tqdm(range(1, args.epochs + 1), desc=f"{criterion_name} seed {seed}", leave=False,
                  disable=not progress, dynamic_ncols=True)
    for epoch in epochs:
        record = {"epoch": epoch, **train_epoch(model, loader, criterion, optimizer, device, progress)}
        scheduler.step()
        logits, features, _ = collect_outputs(model, test_eval, device)
        record["test_accuracy"] = accuracy(logits, y_test)
        record["raw_mse"] = abundance_mse(F.softmax(logits, dim=1), a_test)
        record["entropy_bits"] = fierce_ext.entropy(features, eval_dictionary, similarity="dot",
                                                    estimator="gumbel_hard", seed=EVAL_NOISE_SEED,
                                                    backend=EVAL_BACKEND).item()
        # Diagnostics: the dot-similarity estimator is scale-sensitive (see the README).
        record["feature_norm"] = features.norm(dim=1).mean().item()
        record["dead_units"] = (features <= 0).all(dim=0).float().mean().item()
        record["transfer_mse"] = None
        if epoch == 1 or epoch % args.transfer_every == 0 or epoch == args.epochs:
            _, train_features, _ = collect_outputs(model, train_eval, device)
            record["transfer_mse"] = transfer_mse(train_features, a_train, features, a_test)
        history.append(record)
        epochs.set_postfix(acc=f"{record['test_accuracy']:.3f}", raw=f"{record['raw_mse']:.3f}",
                           H=f"{record['entropy_bits']:.2f}")
    return {"history": history, "final": {m: history[-1][m] for m in METRICS}}


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    device = resolve_device(args.device)
    jobs, threads = resolve_parallelism(args, device, len(args.criteria) * args.seeds)
    progress = not args.no_progress
    out_dir = args.out or RESULTS_ROOT / "hyperspectral"
    data, dataset_info = load_data(args)
    context = {"args": args, "device": str(device), "progress": progress and jobs == 1,
               "train": data["train"], "test": data["test"]}
    runs = run_grid(args.criteria, args.seeds, args.seed, partial(train_one, context), progress, jobs, threads)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(jobs=jobs, threads=threads, model="MLP 144-200-400-100-4 (ReLU)", optimizer="Adam",
                  lr_decay="x0.1 once, at epoch epochs // 2 (MultiStepLR)",
                  fierce="CE - lam * H, " + ("dot similarity" if args.fierce_scale is None else
                                             f"similarity {args.fierce_scale:g} * cosine")
                         + ", 1 x 100 x 100 dictionary U[0, 1) (seed 0), gumbel_hard",
                  entropy_eval=f"whole test set, paper's dictionary, gumbel_hard, noise seed {EVAL_NOISE_SEED}, "
                               f"{EVAL_BACKEND} backend on the CPU")
    result = payload("hyperspectral", dataset_info, config, runs, METRICS, started, paper_table_1=PAPER_TABLE_1)
    write_outputs(out_dir, result, runs)
    print(f"wrote {out_dir}/results.json, results.md, curves.png, final.png "
          f"({result['total_wall_time_s']:.0f} s)")
    return result


def write_outputs(out_dir: Path, result: dict, runs: list[dict]) -> None:
    dataset = result["dataset"]
    config = result["config"]
    tag = " [stand-in data]" if dataset["stand_in"] else ""
    write_json(out_dir / "results.json", result)
    table = markdown_table(result["summary"], [("test_accuracy", "coarse accuracy", 3),
                                               ("raw_mse", "raw MSE", 3), ("transfer_mse", "transfer MSE", 4),
                                               ("entropy_bits", "feature entropy (bits)", 2),
                                               ("feature_norm", "mean feature norm", 2),
                                               ("dead_units", "dead feature units", 2)], CRITERION_NAMES)
    paper = "\n".join(["| criterion | raw MSE | transfer MSE |", "|---|---|---|"] + [
        f"| {CRITERION_NAMES[c]} | {PAPER_TABLE_1['raw_mse'][c]} | {PAPER_TABLE_1['transfer_mse'][c]} |"
        for c in ("ce", "ls", "fierce")])
    env = result["environment"]
    write_markdown(out_dir / "results.md", f"Hyperspectral unmixing with coarse labels{tag}", [
        f"Data: {dataset['description']}; {dataset['n_train']} train / {dataset['n_test']} test pixels.",
        f"Mean ± std over {config['seeds']} seeds (seeds {config['seed']}..{config['seed'] + config['seeds'] - 1}), "
        f"{config['epochs']} epochs, lambda = {config['lam']}, LS epsilon = {config['ls_epsilon']}, input scaling "
        f"{config['input_scaling']}; metrics on the "
        f"test pixels at the last epoch. Machine: {env['cpu_count']} CPU cores, torch {env['torch']}, "
        f"device {config['device']}, backend {config['backend']}; total {result['total_wall_time_s']:.0f} s.",
        f"FIERCE: {config['fierce']}.",
    ], table, ["The paper's Table 1 (Houston data, for comparison):", paper])
    title = f"Hyperspectral unmixing, coarse labels{tag}: {dataset['name']}"
    plot_metrics(runs, [("test_accuracy", "coarse test accuracy"), ("raw_mse", "raw MSE"),
                        ("transfer_mse", "transfer MSE"), ("entropy_bits", "feature entropy (bits)")],
                 title, out_dir / "curves.png", log_scale=("transfer_mse",))
    plot_final_bars(result["summary"], [("raw_mse", "raw MSE"), ("transfer_mse", "transfer MSE"),
                                        ("entropy_bits", "feature entropy (bits)")], title, out_dir / "final.png")


if __name__ == "__main__":
    main()
