"""Regression tests for a review of the experiments: data-loader iteration and --workers, the global
random generator and evaluation, backends at parse time and in evaluation, the learning-rate schedule,
command-line checks and the recorded thread count."""
import json

import pytest
import torch
from torch.utils.data import TensorDataset

import fierce_ext
from experiments.age import run as age_run
from experiments.common.experiment import payload, run_grid
from experiments.common.training import collect_outputs, train_epoch
from experiments.hyperspectral import run as hyperspectral_run


class CountingLoader:
    """An iterable that counts how often an iterator is made from it."""

    def __init__(self, batches):
        self.batches, self.iterators = batches, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.iterators += 1
        return iter(self.batches)


def tiny_model_and_batches():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    wrapped = lambda x: (model(x), x)  # (logits, features)
    wrapped.train = model.train
    wrapped.eval = model.eval
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    criterion = lambda logits, target, features: (torch.nn.functional.cross_entropy(logits, target), {})
    return model, wrapped, batches, criterion


@pytest.mark.parametrize("progress", [False, True])
def test_loops_make_one_iterator_per_pass(progress):
    # tqdm.auto's asyncio bar called iter(loader) in its constructor even when disabled: a second iterator
    # per epoch, i.e. an extra draw of a DataLoader's generator (and, with workers, a prefetched permutation).
    model, wrapped, batches, criterion = tiny_model_and_batches()
    loader = CountingLoader(batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for epoch in range(3):
        train_epoch(wrapped, loader, criterion, optimizer, torch.device("cpu"), progress=progress)
    assert loader.iterators == 3
    collect_outputs(wrapped, loader, torch.device("cpu"), progress=progress)
    assert loader.iterators == 4


def batches_seen(workers, epochs=3):
    data = TensorDataset(torch.arange(40.0)[:, None], torch.arange(40))
    loader = age_run.train_loader(data, batch_size=8, workers=workers, seed=3)
    seen = []
    for _ in range(epochs):
        seen.append([target.tolist() for _, target in loader])
    return seen


def test_age_batches_do_not_depend_on_workers():
    torch.manual_seed(0)
    serial = batches_seen(0)
    state = torch.random.get_rng_state()
    assert batches_seen(2) == serial
    assert batches_seen(0) == serial
    assert torch.equal(torch.random.get_rng_state(), state)  # the loaders leave the global generator alone
    assert serial[0] != serial[1]  # reshuffled every epoch


def test_age_loader_is_iterated_once_per_epoch_by_the_training_helper():
    # Through train_epoch, a loader with persistent workers must give the batches of a plain one.
    seen = {}
    data = TensorDataset(torch.randn(24, 3, generator=torch.Generator().manual_seed(1)), torch.arange(24) % 2)
    for workers in (0, 2):
        loader = age_run.train_loader(data, batch_size=8, workers=workers, seed=5)
        model, wrapped, _, _ = tiny_model_and_batches()
        order = []

        def criterion(logits, target, features, order=order):
            order.append(features[:, 0].tolist())
            return torch.nn.functional.cross_entropy(logits, target), {}

        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            train_epoch(wrapped, loader, criterion, optimizer, torch.device("cpu"), progress=False)
        seen[workers] = order
    assert seen[0] == seen[2]


def test_age_quick_training_does_not_depend_on_workers(tmp_path):
    argv = ["--quick", "--epochs", "2", "--limit", "200", "--criteria", "fierce", "--no-progress"]
    serial = age_run.main(argv + ["--out", str(tmp_path / "w0")])
    workers = age_run.main(argv + ["--workers", "2", "--out", str(tmp_path / "w2")])
    assert workers["runs"][0]["history"] == serial["runs"][0]["history"]


def test_transfer_every_does_not_change_fierce_training(tmp_path):
    # transfer_mse used to build torch.nn.Linear (initialised from the global generator), which FIERCE's
    # seed=None noise also draws from: evaluating more often changed the training that followed.
    argv = ["--quick", "--epochs", "3", "--criteria", "fierce", "--no-progress"]
    every = hyperspectral_run.main(argv + ["--transfer-every", "1", "--out", str(tmp_path / "a")])
    rarely = hyperspectral_run.main(argv + ["--transfer-every", "3", "--out", str(tmp_path / "b")])
    strip = lambda history: [{k: v for k, v in h.items() if k != "transfer_mse"} for h in history]
    assert strip(every["runs"][0]["history"]) == strip(rarely["runs"][0]["history"])
    assert every["runs"][0]["history"][1]["transfer_mse"] is not None
    assert rarely["runs"][0]["history"][1]["transfer_mse"] is None


def test_scheduler_decays_once_halfway():
    def rates(epochs, make):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        scheduler = make(optimizer, epochs)
        seen = []
        for _ in range(epochs):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    step_lr = lambda optimizer, epochs: torch.optim.lr_scheduler.StepLR(optimizer, max(1, epochs // 2), 0.1)
    # The default 200 epochs: the same rates as the StepLR the committed results were run with.
    assert rates(200, hyperspectral_run.make_scheduler) == rates(200, step_lr)
    for epochs in (1, 2, 5, 7, 201):
        seen = rates(epochs, hyperspectral_run.make_scheduler)
        assert len(set(seen)) == (1 if epochs < 2 else 2), epochs  # one decay at most
        assert seen.index(min(seen)) == (0 if epochs < 2 else epochs // 2)
    assert len(set(rates(5, step_lr))) == 3  # what StepLR did: decayed at epochs 2 and 4 of 5


@pytest.mark.parametrize("module", [age_run, hyperspectral_run])
def test_reported_entropy_does_not_use_the_training_backend(module, tmp_path):
    # The evaluation runs on CPU tensors: with --backend cuda/triton on a GPU it crashed at the first epoch.
    # CE does not use the backend, so here only the evaluation could fail.
    args = module.parse_args(["--quick", "--epochs", "1", "--criteria", "ce", "--no-progress"])
    args.backend = "cuda"  # cannot run on the CPU tensors the evaluation sees
    if module is age_run:
        context = {"args": args, "device": "cpu", "progress": False, "split": module.load_data(args)}
    else:
        data, _ = module.load_data(args)
        context = {"args": args, "device": "cpu", "progress": False, "train": data["train"], "test": data["test"]}
    result = module.train_one(context, "ce", 0)
    assert result["final"]["entropy_bits"] > 0


@pytest.mark.parametrize("module", [age_run, hyperspectral_run])
def test_backend_checked_at_parse_time(module, capsys):
    for backend in ("triton", "cuda"):
        if fierce_ext.available_backends("cpu")[backend].available:
            continue  # e.g. Triton's interpreter enabled: then it can run
        with pytest.raises(SystemExit) as error:
            module.parse_args(["--backend", backend])
        assert error.value.code == 2
        message = capsys.readouterr().err
        assert f"--backend {backend} cannot run on --device cpu" in message and "usable there" in message
    with pytest.raises(SystemExit):
        module.parse_args(["--backend", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err
    for backend in ("auto", "torch", "reference"):
        assert module.parse_args(["--backend", backend]).backend == backend


def test_backend_triton_on_cpu_is_a_clear_command_line_error():
    # End to end: an argparse error before any training, not a traceback mid-run. Without Triton's
    # interpreter (which tests/conftest.py switches on for this process), triton cannot run on a CPU.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "experiments/age/run.py", "--backend", "triton", "--quick"],
                               cwd=root, capture_output=True, text=True, timeout=120, env=env)
    assert completed.returncode == 2
    assert "--backend triton cannot run on --device cpu" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("argv", [
    ["--criteria", "ce", "ce"],
    ["--criteria", "fierce", "ce", "fierce"],
    ["--dataset", "utkface", "--root", ".", "--images", "."],
    ["--dataset", "utkface", "--root", ".", "--copies", "2"],
    ["--dataset", "imdb-wiki", "--root", ".", "--copies", "1"],
    ["--images", "."],  # digits-rotation
])
def test_age_options_that_do_not_apply_are_errors(argv):
    with pytest.raises(SystemExit):
        age_run.parse_args(argv)


def test_hyperspectral_duplicate_criteria_are_an_error():
    with pytest.raises(SystemExit, match="more than once"):
        hyperspectral_run.parse_args(["--criteria", "ls", "ls"])


def test_recorded_threads_are_those_the_runs_used():
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen = []
        runs = run_grid(["ce"], 2, 0, lambda c, s: seen.append(torch.get_num_threads()) or {"history": [], "final": {}},
                        progress=False, jobs=1, threads=1)
        assert seen == [1, 1] and [r["torch_threads"] for r in runs] == [1, 1]
        result = payload("x", {}, {}, runs, [], 0.0)
        assert result["environment"]["torch_threads"] == 1  # not the parent's 2
        json.dumps(result)
    finally:
        torch.set_num_threads(previous)
