"""The paper's age model: a narrow ResNet-18 whose features are averaged to a single number.

ResNet-18 layout ([2, 2, 2, 2] basic blocks), 16 feature maps in the first stage (then 32, 64, 128),
a stride-1 3x3 stem and no max-pool (small images). The penultimate features are averaged over space
and channels to ONE dimension, passed through a learnable affine map (so the scalar can reach the
entropy bins at 1..100), and a linear 1 -> 2 layer classifies younger / older half.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class AgeResNet(nn.Module):
    def __init__(self, in_channels: int = 3, width: int = 16, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 classes: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages, channels = [], width
        for stage, count in enumerate(blocks):
            out_channels = width * 2 ** stage
            for block in range(count):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.affine = nn.Linear(1, 1)
        self.classifier = nn.Linear(1, classes)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected images (batch, channels, height, width), got shape {tuple(x.shape)}")
        return self.stages(self.stem(x)).mean(dim=(1, 2, 3)).unsqueeze(1)  # (B, 1): space AND channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.affine(self.pooled(x))
        return self.classifier(feature), feature

    @torch.no_grad()
    def init_feature_range(self, x: torch.Tensor, low: float = 1.0, high: float = 100.0) -> None:
        """Data-dependent init of the affine map: the batch's features get mean (low + high) / 2 and
        standard deviation (high - low) / 6, i.e. they start spread over the entropy bins.

        Why: the averaged feature of a fresh network varies by ~1e-2 across images, while the bins sit
        1 apart over 1..100; with Adam's ~1e-3 steps the scale could not travel that far in a short
        run, and the entropy term would see every sample in the same bin. Run in train mode (batch
        statistics), as the training steps that follow.
        """
        was_training = self.training
        self.train()
        pooled = self.pooled(x)
        scale = (high - low) / 6.0 / pooled.std().clamp_min(1e-8)
        self.affine.weight.fill_(scale.item())
        self.affine.bias.fill_((low + high) / 2.0 - scale.item() * pooled.mean().item())
        self.train(was_training)
