"""A small classifier that returns its features too, for training-step tests (CPU and GPU)."""

from __future__ import annotations

import torch
from torch import nn


class Net(nn.Module):
    """x -> (logits, features): two-layer MLP body, linear head."""

    def __init__(self, dim_in: int = 6, dim_feat: int = 8, classes: int = 3, hidden: int = 16):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(),
                                  nn.Linear(hidden, dim_feat))
        self.head = nn.Linear(dim_feat, classes)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), features


def gradients(module: nn.Module) -> dict:
    """A copy of every parameter's gradient, by name."""
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def eager_and_compiled_step(model: nn.Module, criterion: nn.Module, x, target, seed: int = 1234):
    """One training step (model + FIERCELoss with a fixed noise seed) run eagerly, then under
    torch.compile(fullgraph=True): ((loss, entropy, gradients) eager, (...) compiled)."""
    def step(x, target):
        logits, features = model(x)
        loss = criterion(logits, target, features, seed=seed)
        return loss, criterion.last_entropy

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        model.zero_grad()
        loss, entropy = fn(x, target)
        loss.backward()
        results.append((loss, entropy, gradients(model)))
    return results


def entropy_term_moves_the_body(model: Net, criterion: nn.Module, x, target, grads: dict) -> bool:
    """Whether `grads` (of a FIERCELoss step) differ on the body from the gradients of the
    criterion's classification part alone: the entropy term then really reaches the body, so a
    comparison of `grads` covers its gradient."""
    model.zero_grad()
    logits, _ = model(x)
    criterion.criterion(logits, target).backward()
    classification = gradients(model)
    model.zero_grad()
    return any(not torch.allclose(grads[name], classification[name], rtol=1e-3, atol=1e-6)
               for name in grads if name.startswith("body."))
