"""torch.func transforms over `entropy`, `histogram` and the modules, and the legacy vmap of
autograd's batched gradients (CPU backends).

Under a transform the ops run through `ops.EntropyUnderTransforms` / `HistogramUnderTransforms`
(new-style autograd.Functions with a looping vmap rule); plain autograd runs `ops.Entropy` /
`Histogram`. Both call the same backend functions, so their results must be the same bits.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad, grad_and_value, hessian, jacfwd, jacrev, vjp, vmap

import fierce_ext
from fierce_ext import functional
from oracle import CPU_BACKENDS
from tiny_models import Net

ESTIMATORS = ("gumbel_hard", "gumbel_soft", "softmax")
# The Triton kernels too, where they run here (the interpreter): the transforms hand them the
# unwrapped tensors.
BACKENDS = CPU_BACKENDS + tuple(
    name for name in ("triton",) if fierce_ext.available_backends("cpu")[name].available)


def _autograd_grad(fn, x):
    x = x.detach().clone().requires_grad_()
    value = fn(x)
    (g,) = torch.autograd.grad(value, x)
    return value.detach(), g


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_and_vjp_give_the_autograd_gradient(backend, estimator):
    x = torch.randn(48, 12, dtype=torch.float64)

    def entropy(x):
        return fierce_ext.entropy(x, bins=20, heads=2, seed=7, estimator=estimator,
                                  backend=backend)

    value, expected = _autograd_grad(entropy, x)
    assert expected.abs().max() > 0
    torch.testing.assert_close(grad(entropy)(x), expected, rtol=0, atol=0)
    g, v = grad_and_value(entropy)(x)
    torch.testing.assert_close((g, v), (expected, value), rtol=0, atol=0)
    v, pullback = vjp(entropy, x)
    (g,) = pullback(torch.tensor(0.5, dtype=torch.float64))
    torch.testing.assert_close(g, 0.5 * expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jacrev_of_the_histogram_is_its_autograd_jacobian(backend):
    # jacrev maps the backward over the (C, K) cotangent basis: the vmap rule of the backward.
    x = torch.randn(24, 5, dtype=torch.float64)
    dictionary = fierce_ext.uniform_dictionary(5, 6, 2, dtype=torch.float64)

    def hist(x):
        return fierce_ext.histogram(x, dictionary, seed=3, estimator="gumbel_soft",
                                    backend=backend)

    jacobian = jacrev(hist)(x)
    leaf = x.clone().requires_grad_()
    h = hist(leaf)
    rows = [torch.autograd.grad(h[c, k], leaf, retain_graph=True)[0]
            for c in range(2) for k in range(6)]
    assert jacobian.shape == (2, 6, 24, 5)
    torch.testing.assert_close(jacobian, torch.stack(rows).view(2, 6, 24, 5), rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_maps_separate_problems(backend):
    # An ensemble: each mapped slice has its own features and its own dictionary.
    xs = torch.randn(3, 32, 6, dtype=torch.float64)
    dictionaries = torch.stack([fierce_ext.uniform_dictionary(6, 10, 2, seed=s,
                                                              dtype=torch.float64)
                                for s in range(3)])

    def entropy(x, dictionary):
        return fierce_ext.entropy(x, dictionary, seed=11, estimator="gumbel_soft",
                                  reduction="none", backend=backend)

    mapped = vmap(entropy)(xs, dictionaries)
    expected = torch.stack([entropy(xs[i], dictionaries[i]) for i in range(3)])
    assert mapped.shape == (3, 2)
    torch.testing.assert_close(mapped, expected, rtol=0, atol=0)

    def total(x, dictionary):
        return entropy(x, dictionary).sum()

    per_slice = torch.stack([_autograd_grad(lambda x: total(x, dictionaries[i]), xs[i])[1]
                             for i in range(3)])
    torch.testing.assert_close(vmap(grad(total))(xs, dictionaries), per_slice, rtol=0, atol=0)
    torch.testing.assert_close(grad(lambda xs: vmap(total)(xs, dictionaries).sum())(xs),
                               per_slice, rtol=0, atol=0)


def test_vmap_randomness_decides_the_seeds():
    x = torch.randn(64, 8).expand(4, 64, 8)  # the same features in every slice

    def hist(x):
        return fierce_ext.histogram(x, fierce_ext.uniform_dictionary(8, 16))

    with pytest.raises(RuntimeError, match="randomness"):
        vmap(hist)(x)
    same = vmap(hist, randomness="same")(x)
    assert all(torch.equal(same[0], same[i]) for i in range(4))
    different = vmap(hist, randomness="different")(x)
    assert not all(torch.equal(different[0], different[i]) for i in range(4))


def test_default_dictionary_drawn_under_vmap_stays_a_plain_tensor():
    # The cached default dictionary of a new dim is first drawn inside the transform.
    dim = 13
    functional._cached_dictionary.cache_clear()
    xs = torch.randn(2, 16, dim)
    mapped = vmap(lambda x: fierce_ext.entropy(x, bins=7, seed=1))(xs)
    # The mapped call must use that very dictionary: each slice's entropy is the plain call's on
    # the same features with the explicit default dictionary (drawn outside any transform).
    explicit = fierce_ext.uniform_dictionary(dim, 7)
    plain = torch.stack([fierce_ext.entropy(x, explicit, seed=1) for x in xs])
    assert mapped.shape == plain.shape == (2,)
    torch.testing.assert_close(mapped, plain, rtol=0, atol=0)
    dictionary = functional.default_dictionary(dim, 7, 1, torch.device("cpu"))
    assert type(dictionary) is torch.Tensor
    torch.testing.assert_close(dictionary, fierce_ext.uniform_dictionary(dim, 7), rtol=0, atol=0)


def test_functional_call_training_step_matches_autograd():
    torch.manual_seed(0)
    model = Net()
    criterion = fierce_ext.FIERCELoss(8, lam=0.7, bins=10, heads=2, tau=0.5)
    x, target = torch.randn(32, 6), torch.randint(0, 3, (32,))
    params = dict(model.named_parameters())

    def loss(params):
        logits, features = functional_call(model, params, (x,))
        return criterion(logits, target, features, seed=5)

    grads = grad(loss)(params)
    model.zero_grad()
    loss(params).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=0)


def test_no_second_derivative_and_no_forward_mode():
    x = torch.randn(16, 4, dtype=torch.float64)

    def entropy(x):
        return fierce_ext.entropy(x, bins=8, seed=1, estimator="softmax")

    with pytest.raises(RuntimeError, match="no second derivative"):
        grad(lambda x: grad(entropy)(x).square().sum())(x)
    for transform in (jacfwd, hessian):
        with pytest.raises(NotImplementedError, match="forward-mode"):
            transform(entropy)(x)


def test_batched_gradients_of_autograd():
    # torch.autograd.grad(is_grads_batched=True) and autograd.functional's vectorize=True run the
    # backward under the legacy vmap: the custom op's batching fallback, one backend call each.
    x = torch.randn(24, 5, dtype=torch.float64)
    dictionary = fierce_ext.uniform_dictionary(5, 6, 2, dtype=torch.float64)

    def hist(x):
        return fierce_ext.histogram(x, dictionary, seed=3, estimator="gumbel_soft")

    looped = torch.autograd.functional.jacobian(hist, x)
    assert looped.abs().max() > 0
    torch.testing.assert_close(torch.autograd.functional.jacobian(hist, x, vectorize=True),
                               looped, rtol=0, atol=1e-15)
    leaf = x.clone().requires_grad_()
    basis = torch.eye(12, dtype=torch.float64).view(12, 2, 6)
    (batched,) = torch.autograd.grad(hist(leaf), leaf, basis, is_grads_batched=True)
    torch.testing.assert_close(batched, looped.view(12, 24, 5), rtol=0, atol=1e-15)
