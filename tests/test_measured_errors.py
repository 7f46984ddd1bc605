"""tests/measured_errors.py, the GPU tests' error log: what it writes and how it summarises."""

from __future__ import annotations

import json
import math

import torch

import measured_errors


def test_record_does_nothing_without_the_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(measured_errors.FOLDER_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    measured_errors.record("lse", 1e-3, 1e-2)
    assert list(tmp_path.iterdir()) == []


def test_records_are_grouped_by_test_mode_and_quantity(monkeypatch, tmp_path):
    monkeypatch.setenv(measured_errors.FOLDER_ENV, str(tmp_path / "measured"))
    cases = [("test_a[K150-bfloat16-dot-softmax]", "gradient", 1e-3, 4e-2),
             ("test_a[K100-bfloat16-cosine-softmax]", "gradient", 3e-2, 4e-2),
             ("test_a[K100-float16-cosine-softmax]", "gradient", 2e-3, 1e-2),
             ("test_b", "lse", float("nan"), 1.0)]
    for test, quantity, error, bound in cases:
        monkeypatch.setenv("PYTEST_CURRENT_TEST", f"tests/gpu/test_x.py::{test} (call)")
        measured_errors.record(quantity, error, bound, mode="tf32" if test == "test_b" else None)
    (file,) = (tmp_path / "measured").iterdir()
    entries = [json.loads(line) for line in file.read_text().splitlines()]
    assert [e["test"] for e in entries] == [f"tests/gpu/test_x.py::{c[0]}" for c in cases]
    with open(file, "a") as handle:
        handle.write('{"test": "cut off')  # a killed process leaves a partial line
    lines = measured_errors.summary(tmp_path / "measured")
    assert "over 4 comparisons" in lines[0]
    rows = {tuple(line.split()[:3]): float(line.split()[3]) for line in lines[1:]}
    assert rows.keys() == {("test_a", "bfloat16", "gradient"), ("test_a", "float16", "gradient"),
                           ("test_b", "tf32", "lse")}
    assert math.isclose(rows["test_a", "bfloat16", "gradient"], 0.75, rel_tol=1e-2)  # the worse
    assert math.isclose(rows["test_a", "float16", "gradient"], 0.2, rel_tol=1e-2)
    assert rows["test_b", "tf32", "lse"] == math.inf  # NaN never reads as within the bound


def test_top_keeps_the_cases_nearest_their_bound(monkeypatch, tmp_path):
    monkeypatch.setenv(measured_errors.FOLDER_ENV, str(tmp_path))
    for name, error in (("test_a", 0.1), ("test_b", 0.9), ("test_c", 0.5)):
        monkeypatch.setenv("PYTEST_CURRENT_TEST", f"tests/gpu/test_x.py::{name} (call)")
        measured_errors.record("gradient", error, 1.0)
    lines = measured_errors.summary(tmp_path, top=2)
    assert "the 2 of 3 nearest their bound" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == ["test_b", "test_c"]


def test_within_records_the_element_nearest_its_bound(monkeypatch, tmp_path):
    monkeypatch.setenv(measured_errors.FOLDER_ENV, str(tmp_path))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/gpu/test_x.py::test_a[tf32] (call)")
    error = torch.tensor([1e-3, 4e-3, 2e-3], dtype=torch.float64)
    assert measured_errors.within("lse", error, torch.tensor([1e-2, 5e-3, 1e-1], dtype=torch.float64))
    assert not measured_errors.within("lse", error, 3e-3)  # a number bounds every element
    assert not measured_errors.within("lse", torch.tensor([0.0, float("nan")]), 1.0)
    assert measured_errors.within("gradient", 0.5, 1.0, mode="bfloat16")
    assert not measured_errors.within("gradient", float("nan"), 1.0)
    (file,) = tmp_path.iterdir()
    entries = [json.loads(line) for line in file.read_text().splitlines()]
    assert [(e["error"], e["bound"]) for e in entries[:2]] == [(4e-3, 5e-3), (4e-3, 3e-3)]
    assert math.isnan(entries[2]["error"])  # the NaN element is the one recorded
    assert entries[3]["mode"] == "bfloat16"
