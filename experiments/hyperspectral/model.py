"""The paper's unmixing MLP: 144 -> 200 -> 400 -> 100 (features) -> P, ReLU activations."""
from __future__ import annotations

import torch
import torch.nn as nn


class UnmixingMLP(nn.Module):
    def __init__(self, bands: int = 144, materials: int = 4, hidden: tuple[int, ...] = (200, 400),
                 feature_dim: int = 100):
        super().__init__()
        layers, width = [], bands
        for size in (*hidden, feature_dim):
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.body = nn.Sequential(*layers)  # ends with ReLU: the features are non-negative
        self.head = nn.Linear(feature_dim, materials)
        self.feature_dim = feature_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.head(features), features
