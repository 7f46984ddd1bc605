"""Label smoothing loss, the scaled-cosine entropy, metrics, and the 1-D optimal-transport age read-out."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fierce_ext
from experiments.common.losses import LabelSmoothingCriterion, ScaledCosineEntropy, label_smoothing_cross_entropy
from experiments.common.metrics import (abundance_mse, accuracy, orient, orientation, ot_age_mse, ot_map_1d,
                                       transfer_mse)
from experiments.common.plotting import metric_curves
from experiments.common.results import markdown_table, mean_std, summarize


def quantile_match(values, reference):
    """Sorting-based quantile matching: the k-th smallest value gets the k-th smallest reference."""
    mapped = np.empty(len(values))
    mapped[np.argsort(values, kind="stable")] = np.sort(reference)
    return mapped


# --- scaled-cosine entropy ----------------------------------------------------------------------------

def test_scaled_cosine_entropy_is_cosine_at_scale_one_and_ignores_the_norm():
    features = torch.rand(64, 12, generator=torch.Generator().manual_seed(0)).requires_grad_()
    dictionary = fierce_ext.uniform_dictionary(12, 10, low=0.0, high=1.0, seed=1)
    torch.manual_seed(5)  # both draw their noise seed from torch's default generator
    cosine = fierce_ext.entropy(features, dictionary, similarity="cosine")
    torch.manual_seed(5)
    scaled = ScaledCosineEntropy(dictionary, 1.0)(features)
    torch.testing.assert_close(scaled, cosine)
    # A function of r / |r|: its gradient is orthogonal to each feature row.
    module = ScaledCosineEntropy(dictionary, 30.0)
    (grad,) = torch.autograd.grad(module(features), features)
    assert grad.abs().max() > 0
    radial = (grad * features).sum(dim=1) / features.norm(dim=1)
    assert radial.abs().max() <= 1e-5 * grad.norm(dim=1).max()
    with pytest.raises(ValueError, match="scale"):
        ScaledCosineEntropy(dictionary, 0.0)


# --- label smoothing ---------------------------------------------------------------------------------
def test_label_smoothing_matches_explicit_soft_targets():
    torch.manual_seed(0)
    logits, target = torch.randn(7, 5), torch.randint(0, 5, (7,))
    eps = 0.4
    soft = torch.full((7, 5), eps / 5)
    soft[torch.arange(7), target] += 1 - eps
    expected = -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, target, eps), expected)
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, target, eps),
                               F.cross_entropy(logits, target, label_smoothing=eps))


def test_label_smoothing_limits_and_errors():
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, target, 0.0), F.cross_entropy(logits, target))
    # With epsilon = 1 the target is uniform: the loss no longer depends on the labels.
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, target, 1.0),
                               label_smoothing_cross_entropy(logits, target.flip(0), 1.0))
    with pytest.raises(ValueError):
        label_smoothing_cross_entropy(logits, target, 1.5)
    with pytest.raises(ValueError):
        label_smoothing_cross_entropy(logits[0], target, 0.1)
    with pytest.raises(ValueError):
        LabelSmoothingCriterion(-0.1)


def test_label_smoothing_optimum_is_the_smoothed_target():
    # The minimiser over the logits puts probability 1 - eps + eps/K on the true class.
    logits = torch.zeros(1, 4, requires_grad=True)
    optimizer = torch.optim.LBFGS([logits], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = label_smoothing_cross_entropy(logits, torch.tensor([2]), 0.4)
        loss.backward()
        return loss

    optimizer.step(closure)
    assert F.softmax(logits, 1)[0, 2].item() == pytest.approx(0.6 + 0.1, abs=1e-4)


# --- metrics -----------------------------------------------------------------------------------------
def test_accuracy_and_abundance_mse():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)
    predicted = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    truth = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    assert abundance_mse(predicted, truth) == pytest.approx((0.25 + 0.25 + 0.0) / 2)  # sum over materials, mean over pixels
    with pytest.raises(ValueError):
        abundance_mse(predicted, truth[:1])
    with pytest.raises(ValueError):
        accuracy(logits, torch.tensor([0]))


def test_transfer_mse_leaves_the_global_generator_alone():
    # It used to build torch.nn.Linear, whose initialisation draws from the global generator, from which
    # FIERCE (seed=None) draws its noise seeds: how often the metric ran changed the training.
    gen = torch.Generator().manual_seed(0)
    features, abundances = torch.randn(60, 5, generator=gen), F.softmax(torch.randn(60, 3, generator=gen), dim=1)
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    transfer_mse(features[:40], abundances[:40], features[40:], abundances[40:], max_iter=20)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_transfer_mse_recovers_linear_softmax_abundances():
    torch.manual_seed(0)
    weight = torch.randn(6, 3)
    features = torch.randn(400, 6) * 5 + 2  # unstandardised on purpose
    abundances = F.softmax(features @ weight, dim=1)
    assert transfer_mse(features[:300], abundances[:300], features[300:], abundances[300:]) < 1e-3
    # Features with no information: about the variance of the abundances.
    noise = torch.randn(400, 6)
    baseline = ((abundances[300:] - abundances[:300].mean(0)) ** 2).sum(1).mean().item()
    assert transfer_mse(noise[:300], abundances[:300], noise[300:], abundances[300:]) > 0.8 * baseline


# --- 1-D optimal transport -------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False), min_size=1,
                max_size=40, unique=True), st.integers(0, 2**31 - 1))
def test_ot_map_equals_quantile_matching(values, seed):
    values = np.array(values)
    reference = np.random.default_rng(seed).normal(50, 20, size=len(values))
    np.testing.assert_allclose(ot_map_1d(values, reference), quantile_match(values, reference), rtol=1e-9, atol=1e-9)


def test_ot_map_unequal_sizes_is_blockwise_mean():
    # 5 values onto 15 references: each value receives the mean of its 3 quantile-matched references.
    rng = np.random.default_rng(1)
    values, reference = rng.normal(size=5), rng.normal(size=15)
    expected = quantile_match(values, np.sort(reference).reshape(5, 3).mean(axis=1))
    np.testing.assert_allclose(ot_map_1d(values, reference), expected, atol=1e-12)


def test_ot_map_ties_and_errors():
    np.testing.assert_allclose(ot_map_1d(np.zeros(4), np.arange(4.0)), 1.5)  # no information: the mean
    np.testing.assert_allclose(ot_map_1d(np.array([3.0, 1.0, 1.0, 0.0]), np.arange(4.0)), [3.0, 1.5, 1.5, 0.0])
    with pytest.raises(ValueError):
        ot_map_1d(np.array([]), np.arange(3.0))
    with pytest.raises(ValueError):
        ot_map_1d(np.array([np.nan, 1.0]), np.arange(3.0))


def test_orientation_and_age_mse():
    ages = np.linspace(0, 100, 50)
    young = ages < np.median(ages)
    feature = -3.0 * ages + 7.0  # perfectly informative but reversed
    np.testing.assert_array_equal(orient(feature, young), -feature)
    np.testing.assert_array_equal(orient(-feature, young), -feature)
    assert orientation(feature, young) == -1.0 and orientation(-feature, young) == 1.0
    assert orientation(feature, np.ones(50, bool)) == 1.0  # one group: no evidence
    assert ot_age_mse(feature, ages, ages, train_features=feature, train_is_young=young) == pytest.approx(0.0, abs=1e-9)
    # A constant feature carries nothing: the read-out predicts the mean age.
    assert ot_age_mse(np.ones(50), ages, ages, train_features=feature, train_is_young=young) == pytest.approx(np.var(ages))
    with pytest.raises(ValueError):
        orient(feature, young[:3])


def test_age_readout_is_oriented_by_the_training_set_only():
    # The test set's own labels would flip this feature; the read-out must take the training set's sign
    # (it used to orient with the test set's coarse labels) and so read the test ages backwards.
    ages = np.linspace(0, 100, 50)
    train_feature, train_young = 2.0 * ages, ages < 50   # training: feature grows with age
    test_feature = -2.0 * ages                           # test: the opposite
    reversed_mse = ot_age_mse(test_feature, ages, ages, train_features=train_feature, train_is_young=train_young)
    assert reversed_mse == pytest.approx(np.mean((ages[::-1] - ages) ** 2))
    assert ot_age_mse(-test_feature, ages, ages, train_features=train_feature,
                      train_is_young=train_young) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(TypeError):
        ot_age_mse(test_feature, ages < 50, ages, ages)  # the old test-label signature is gone


# --- result summaries --------------------------------------------------------------------------------
def test_mean_std_and_table():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert mean_std([2.0])["std"] == 0.0
    assert mean_std([None])["n"] == 0
    runs = [{"criterion": "ce", "final": {"m": 1.0}}, {"criterion": "ce", "final": {"m": 3.0}},
            {"criterion": "fierce", "final": {"m": 0.5}}]
    summary = summarize(runs, ["m"])
    assert list(summary) == ["ce", "fierce"] and summary["ce"]["m"]["mean"] == 2.0
    table = markdown_table(summary, [("m", "metric", 2)], {"ce": "CE", "fierce": "FIERCE"})
    assert "| CE | 2.00 ± 1.41 |" in table and "| FIERCE | 0.50 ± 0.00 |" in table


def test_plot_bands_are_sample_std_like_the_tables():
    runs = [{"criterion": "ce", "history": [{"epoch": 1, "m": v}, {"epoch": 2, "m": 2 * v}]} for v in (1.0, 3.0)]
    runs.append({"criterion": "fierce", "history": [{"epoch": 1, "m": 5.0}, {"epoch": 2, "m": None}]})
    epochs, mean, std = metric_curves(runs, "m")["ce"]
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(std, [mean_std([1.0, 3.0])["std"], mean_std([2.0, 6.0])["std"]])  # ddof=1
    assert metric_curves(runs, "m")["fierce"][2].tolist() == [0.0]  # one seed: no band
