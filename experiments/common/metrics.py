"""Metrics: coarse accuracy, abundance MSE, linear transfer, and the 1-D optimal-transport age read-out."""
from __future__ import annotations

import numpy as np
import ot
import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    if logits.shape[0] != target.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions for {target.shape[0]} targets")
    return (logits.argmax(dim=1) == target).float().mean().item()


def abundance_mse(predicted: torch.Tensor, abundances: torch.Tensor) -> float:
    """Mean over pixels of the sum over materials of squared errors (the paper's Table 1 MSE)."""
    if predicted.shape != abundances.shape:
        raise ValueError(f"shape mismatch: predicted {tuple(predicted.shape)} vs abundances {tuple(abundances.shape)}")
    return ((predicted - abundances) ** 2).sum(dim=1).mean().item()


def transfer_mse(
    train_features: torch.Tensor,
    train_abundances: torch.Tensor,
    test_features: torch.Tensor,
    test_abundances: torch.Tensor,
    max_iter: int = 200,
) -> float:
    """Fit softmax(linear(features)) to the abundances with an MSE loss on the training pixels (features
    frozen), return the abundance MSE on the test pixels.

    The features are standardised first: the linear layer can absorb any affine rescaling, so this does
    not change what can be fitted, only how well L-BFGS is conditioned. The fit is deterministic and leaves
    torch's global random generator untouched.
    """
    with torch.enable_grad():
        train_features = train_features.detach().double()
        test_features = test_features.detach().double()
        mean = train_features.mean(dim=0)
        std = train_features.std(dim=0).clamp_min(1e-6)  # dead ReLU units have std 0
        x_train = (train_features - mean) / std
        x_test = (test_features - mean) / std
        target = train_abundances.detach().double()
        # Zero parameters made directly (deterministic start: uniform prediction). Not torch.nn.Linear, whose
        # default initialisation draws from torch's global generator before being overwritten: that would
        # shift the noise seeds FIERCE draws from it (seed=None), so how often this metric runs would
        # change the training. Nothing here touches any random generator.
        weight = torch.zeros(target.shape[1], x_train.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(target.shape[1], dtype=torch.float64, requires_grad=True)

        def layer(x):
            return F.linear(x, weight, bias)

        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure():
            optimizer.zero_grad()
            loss = ((F.softmax(layer(x_train), dim=1) - target) ** 2).sum(dim=1).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            predicted = F.softmax(layer(x_test), dim=1)
    return abundance_mse(predicted.float(), test_abundances.float())


def ot_map_1d(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map each of ``values`` onto the distribution of ``reference`` by 1-D optimal transport.

    Uniform weights on both sides; POT's exact 1-D solver gives the monotone coupling G (n x m), and
    each value is sent to the barycentre of the reference values it is coupled with:
    out_i = n * sum_j G_ij reference_j. With n == m this is plain quantile matching (the i-th smallest
    value receives the i-th smallest reference). Equal values are indistinguishable, so they all receive
    the mean of what their group is coupled with (a collapsed feature predicts the mean, not a random
    permutation of the references).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    if values.size == 0 or reference.size == 0:
        raise ValueError("ot_map_1d needs non-empty inputs")
    if not (np.all(np.isfinite(values)) and np.all(np.isfinite(reference))):
        raise ValueError("ot_map_1d got non-finite values")
    n, m = values.size, reference.size
    # Transport ranks (ties broken by position) so the coupling is a well-defined monotone plan...
    order = np.argsort(values, kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(n)
    coupling = ot.emd_1d(ranks, reference, np.full(n, 1.0 / n), np.full(m, 1.0 / m), metric="sqeuclidean", dense=False)
    coupling = coupling.tocoo()
    mapped = np.zeros(n)
    np.add.at(mapped, coupling.row, coupling.data * reference[coupling.col])
    mapped *= n
    # ...then give tied values the mean of their group's targets.
    unique, group = np.unique(values, return_inverse=True)
    if unique.size < n:
        mapped = (np.bincount(group, weights=mapped) / np.bincount(group))[group]
    return mapped


def orientation(features: np.ndarray, is_young: np.ndarray) -> float:
    """+1 or -1: the sign that gives the younger group the lower mean feature (+1 with one group only).

    The order of a 1-D feature only carries age information up to its direction; coarse labels (which the
    classifier is trained on) fix that direction. Call it with the TRAINING set's features and labels.
    """
    features = np.asarray(features, dtype=np.float64).ravel()
    is_young = np.asarray(is_young, dtype=bool).ravel()
    if features.shape != is_young.shape:
        raise ValueError(f"{features.size} features for {is_young.size} labels")
    if is_young.all() or not is_young.any():
        return 1.0  # one group only: no evidence for either direction
    return -1.0 if features[is_young].mean() > features[~is_young].mean() else 1.0


def orient(features: np.ndarray, is_young: np.ndarray) -> np.ndarray:
    """``features`` with the sign ``orientation(features, is_young)``: the younger group gets the lower mean."""
    return orientation(features, is_young) * np.asarray(features, dtype=np.float64).ravel()


def ot_age_mse(features: np.ndarray, ages: np.ndarray, reference_ages: np.ndarray, *,
               train_features: np.ndarray, train_is_young: np.ndarray) -> float:
    """MSE between the true ``ages`` and the ages read off the 1-D ``features`` (the test set): the sign is
    fixed on the TRAINING set (``train_features`` with its coarse labels ``train_is_young``), then the
    oriented features are mapped onto ``reference_ages`` (the training ages) by 1-D OT. Neither the test
    set's ages nor its coarse labels enter the read-out; the ages only enter the error.
    """
    ages = np.asarray(ages, dtype=np.float64).ravel()
    sign = orientation(train_features, train_is_young)
    predicted = ot_map_1d(sign * np.asarray(features, dtype=np.float64).ravel(), reference_ages)
    if predicted.shape != ages.shape:
        raise ValueError(f"{predicted.size} predictions for {ages.size} ages")
    return float(np.mean((predicted - ages) ** 2))
