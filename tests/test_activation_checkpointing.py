"""Activation checkpointing (torch.utils.checkpoint) around a block that calls `entropy`.

The block's forward runs again in the backward. With `seed=None` the op draws its seed from
torch's default CPU generator, whose state checkpoint restores before the recompute
(preserve_rng_state, the default), so the recomputed op sees the noise the first forward drew
and the gradient is that of the value returned. A seed drawn from anything checkpoint does not
restore would give a gradient for other noise: these tests compare it with a plain step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fierce_ext

BINS = 10


def _block_and_input():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 6))
    return block, torch.randn(48, 12)


def _step(loss_of_input, block, x, seed):
    """The loss and the block's parameter gradients after torch.manual_seed(seed)."""
    block.zero_grad()
    torch.manual_seed(seed)
    loss = loss_of_input(x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in block.parameters()]


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft"])
def test_checkpointed_block_gives_the_plain_gradient(use_reentrant, estimator):
    block, x = _block_and_input()

    def loss_of_input(inputs):
        return -fierce_ext.entropy(block(inputs), bins=BINS, estimator=estimator)

    def checkpointed(inputs):
        # The reentrant form only backpropagates when an input requires grad.
        inputs = inputs.detach().requires_grad_(use_reentrant)
        return checkpoint(loss_of_input, inputs, use_reentrant=use_reentrant)

    values = []
    for seed in (1, 2):
        expected, expected_grads = _step(loss_of_input, block, x, seed)
        value, grads = _step(checkpointed, block, x, seed)
        torch.testing.assert_close(value, expected, rtol=0, atol=0)
        for grad, expected_grad in zip(grads, expected_grads):
            torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)
        values.append(value.item())
    assert values[0] != values[1]  # seed=None really drew new noise per step


def test_compiled_checkpointed_module_gives_the_eager_gradient():
    # fallback_random: inductor draws the seed from the default generator as eager does (its own
    # RNG draws another seed, consistently in forward and backward, but not eager's).
    block, x = _block_and_input()
    criterion = fierce_ext.FeatureEntropy(6, bins=BINS)

    def loss_of_input(inputs):
        return -criterion(block(inputs))

    def checkpointed(inputs):
        return checkpoint(loss_of_input, inputs, use_reentrant=False)

    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(checkpointed, fullgraph=True)
        expected, expected_grads = _step(loss_of_input, block, x, seed=3)
        value, grads = _step(compiled, block, x, seed=3)
    torch.testing.assert_close(value, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)
