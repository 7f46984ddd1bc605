"""Training criteria: cross-entropy, label smoothing and FIERCE.

Every criterion is called as ``criterion(logits, target, features) -> (loss, logs)`` so the training
loop does not care which one it runs; ``logs`` holds floats to average over the epoch.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import fierce_ext


def label_smoothing_cross_entropy(logits: torch.Tensor, target: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Cross-entropy against (1 - epsilon) * onehot(target) + epsilon / K (mean over the batch).

    Written out rather than calling ``F.cross_entropy(label_smoothing=...)`` so the definition the
    experiments use is explicit: epsilon is spread uniformly over all K classes, the true one included.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, classes), got shape {tuple(logits.shape)}")
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"label smoothing epsilon must be in [0, 1], got {epsilon}")
    log_probs = F.log_softmax(logits, dim=1)
    nll = -log_probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean()


class CrossEntropyCriterion(nn.Module):
    name = "ce"

    def forward(self, logits, target, features):
        loss = F.cross_entropy(logits, target)
        return loss, {"ce": loss.item()}


class LabelSmoothingCriterion(nn.Module):
    name = "ls"

    def __init__(self, epsilon: float):
        super().__init__()
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"label smoothing epsilon must be in [0, 1], got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits, target, features):
        loss = label_smoothing_cross_entropy(logits, target, self.epsilon)
        return loss, {"ce": F.cross_entropy(logits.detach(), target).item()}


class FIERCECriterion(nn.Module):
    """Cross-entropy minus lambda times the feature entropy H (bits) of the batch's features.

    ``normalized=False``: CE - lam * H (the paper's hyperspectral code).
    ``normalized=True``:  (CE + lam * (log2 K - H)) / (1 + lam) (the paper's age code), which has
    the same gradient direction up to the 1 / (1 + lam) scale and stays non-negative.
    ``feature_entropy`` is a ``fierce_ext.FeatureEntropy`` module (its dictionary is a buffer).
    """

    name = "fierce"

    def __init__(self, feature_entropy: nn.Module, lam: float, normalized: bool = False):
        super().__init__()
        if lam < 0:
            raise ValueError(f"lambda must be >= 0, got {lam}")
        self.feature_entropy = feature_entropy
        self.lam = lam
        self.normalized = normalized
        self.max_entropy_bits = math.log2(feature_entropy.dictionary.shape[-1])

    def forward(self, logits, target, features):
        ce = F.cross_entropy(logits, target)
        entropy_bits = self.feature_entropy(features)
        if self.normalized:
            loss = (ce + self.lam * (self.max_entropy_bits - entropy_bits)) / (1.0 + self.lam)
        else:
            loss = ce - self.lam * entropy_bits
        return loss, {"ce": ce.item(), "batch_entropy_bits": entropy_bits.item()}


class ScaledCosineEntropy(nn.Module):
    """Feature entropy (bits) with the similarity ``scale * cos(r, w)``.

    fierce_ext's ``cosine`` lies in [-1, 1], where the Gumbel noise (std 1.28) decides the bin,
    and its ``dot`` grows and shrinks with the features, so a network can raise the estimate by
    shrinking them. Scaling the cosine fixes the similarity's range instead. Computed as the
    ``dot`` similarity of ``scale * r / |r|`` with unit-norm atoms, so every backend runs it.
    """

    def __init__(self, dictionary: torch.Tensor, scale: float, backend: str = "auto"):
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.register_buffer("dictionary", dictionary / dictionary.norm(dim=1, keepdim=True))
        self.scale, self.backend = scale, backend

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return fierce_ext.entropy(self.scale * F.normalize(features, dim=1), self.dictionary,
                                  similarity="dot", estimator="gumbel_hard", backend=self.backend)


CRITERIA = ("ce", "ls", "fierce")
