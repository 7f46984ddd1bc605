"""Training-loop integration on a GPU, for every backend that runs there: torch.library.opcheck
of the autograd op, a fullgraph-compiled training step against eager, autocast in float16 and
bfloat16, and torch.func transforms (the CPU versions of these tests are tests/test_compile.py,
tests/test_amp.py and tests/test_func_transforms.py). Skipped without CUDA (conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch

import fierce_ext
from fierce_ext.ops import (entropy_backward_op, entropy_op, histogram_backward_op,
                            histogram_op)
from tiny_models import Net, eager_and_compiled_step, entropy_term_moves_the_body

BINS = 16
GPU_BACKENDS = ("torch", "triton", "cuda")


@pytest.fixture(params=GPU_BACKENDS)
def gpu_backend(request) -> str:
    status = fierce_ext.available_backends("cuda")[request.param]
    if not status.available:
        pytest.skip(f"backend {request.param!r} unavailable here: {status.reason}")
    return request.param


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("similarity,estimator,dtype", [
    ("cosine", "gumbel_hard", torch.float32),
    ("dot", "gumbel_soft", torch.float64),
    ("distance", "softmax", torch.float32),
    ("cosine", "gumbel_soft", torch.bfloat16),
    ("dot", "gumbel_hard", torch.float16),
], ids=lambda value: str(value).removeprefix("torch."))
def test_opcheck_histogram_ops_on_cuda(gpu_backend, similarity, estimator, dtype):
    torch.manual_seed(2)
    features = torch.randn(67, 20, dtype=dtype, device="cuda", requires_grad=True)
    dictionary = fierce_ext.uniform_dictionary(20, 24, 2, dtype=dtype, device="cuda")
    seed = torch.tensor(12345, dtype=torch.int64)  # the seed and tau stay CPU tensors
    tau = torch.tensor(0.7, dtype=torch.float64)
    args = (features, dictionary, seed, similarity, estimator, tau, 3, gpu_backend)
    torch.library.opcheck(histogram_op, args)
    hist, lse = histogram_op(*args)
    assert hist.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.library.opcheck(histogram_backward_op,
                          (torch.randn_like(hist), features.detach(), dictionary, lse, seed,
                           similarity, estimator, tau, 3, gpu_backend))
    for reduction in ("mean", "none"):
        torch.library.opcheck(entropy_op, (*args, reduction))
        value, hist, lse = entropy_op(*args, reduction)
        assert value.dtype == hist.dtype
        torch.library.opcheck(entropy_backward_op,
                              (torch.rand_like(value), hist, features.detach(), dictionary, lse,
                               seed, similarity, estimator, tau, 3, gpu_backend, reduction))


def test_compiled_training_step_matches_eager_on_cuda(gpu_backend):
    torch.manual_seed(0)
    model = Net(12, 32, 4, hidden=64).cuda()
    criterion = fierce_ext.FIERCELoss(32, lam=0.7, bins=BINS, heads=2, tau=0.5,
                                      backend=gpu_backend).cuda()
    x = torch.randn(300, 12, device="cuda")
    target = torch.randint(0, 4, (300,), device="cuda")

    (eager_loss, eager_entropy, eager), (loss, entropy, grads) = \
        eager_and_compiled_step(model, criterion, x, target)
    assert 0 < entropy.item() <= math.log2(BINS)
    # Same kernels for the FIERCE part; inductor may fuse the model's own ops differently.
    torch.testing.assert_close(entropy, eager_entropy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=1e-4)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager[name], rtol=1e-3, atol=1e-5,
                                   msg=f"gradient of {name}")
    assert entropy_term_moves_the_body(model, criterion, x, target, grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16],
                         ids=lambda value: str(value).removeprefix("torch."))
def test_autocast_training_step_on_cuda(gpu_backend, dtype):
    torch.manual_seed(1)
    model = Net(12, 32, 4, hidden=64).cuda()
    criterion = fierce_ext.FIERCELoss(32, lam=0.5, bins=BINS, backend=gpu_backend).cuda()
    x = torch.randn(256, 12, device="cuda")
    target = torch.randint(0, 4, (256,), device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        logits, features = model(x)
        features.retain_grad()
        loss = criterion(logits, target, features, seed=5)
    assert features.dtype == dtype  # the premise: autocast made half-precision features
    assert criterion.last_entropy.dtype == torch.float32
    assert 0 < criterion.last_entropy.item() <= math.log2(BINS)
    loss.backward()
    assert features.grad.dtype == dtype and torch.isfinite(features.grad).all()
    weight = model.body[0].weight.grad
    assert weight.dtype == torch.float32 and torch.isfinite(weight).all()
    assert weight.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16],
                         ids=lambda value: str(value).removeprefix("torch."))
def test_autocast_op_matches_fp32_on_the_same_values(gpu_backend, dtype):
    # The op computes in fp32 whatever autocast says: half features must give what fp32
    # features holding the same values give, up to the backend's own half-precision GEMM
    # (tensor cores read the half operands; an fp32 reference reads them exactly).
    torch.manual_seed(3)
    features = (torch.randn(512, 48, device="cuda") * 0.5).to(dtype).requires_grad_()
    exact = features.detach().float().requires_grad_()
    dictionary = fierce_ext.uniform_dictionary(48, BINS, 2, device="cuda")
    kwargs = dict(similarity="cosine", estimator="gumbel_soft", tau=0.5, seed=9,
                  backend=gpu_backend)
    weights = torch.randn(2, BINS, device="cuda")
    expected = fierce_ext.histogram(exact, dictionary, **kwargs)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), exact)
    with torch.autocast("cuda", dtype=dtype):
        hist = fierce_ext.histogram(features, dictionary, **kwargs)
    (grad,) = torch.autograd.grad((hist * weights).sum(), features)
    assert hist.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(hist, expected, rtol=0, atol=2e-3)
    torch.testing.assert_close(grad.float(), expected_grad, rtol=0.05,
                               atol=0.05 * expected_grad.abs().max().item())


def test_fp16_large_features_do_not_overflow(gpu_backend):
    # |r . w| is ~2e4 typically here and beyond float16's 65504 in the tails: the op must
    # accumulate in fp32.
    torch.manual_seed(4)
    features = (torch.randn(128, 256, device="cuda") * 2000).half().requires_grad_()
    dictionary = fierce_ext.uniform_dictionary(256, BINS, 1, device="cuda")
    value = fierce_ext.entropy(features, dictionary, similarity="dot", estimator="gumbel_soft",
                               tau=5000.0, seed=2, backend=gpu_backend)
    (grad,) = torch.autograd.grad(value, features)
    assert torch.isfinite(value) and 0 <= value.item() <= math.log2(BINS) + 1e-5
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda value: str(value).removeprefix("torch."))
def test_torch_func_grad_and_vmap_on_cuda(gpu_backend, dtype):
    # Under torch.func the same backend functions run (ops.EntropyUnderTransforms): the same bits
    # as plain autograd, and vmap gives each mapped problem what a separate call gives.
    torch.manual_seed(6)
    xs = torch.randn(2, 300, 40, device="cuda").to(dtype)
    dictionary = fierce_ext.uniform_dictionary(40, BINS, 2, device="cuda")

    def entropy(x):
        return fierce_ext.entropy(x, dictionary, estimator="gumbel_soft", tau=0.5, seed=8,
                                  backend=gpu_backend)

    expected = []
    for x in xs:
        leaf = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(entropy(leaf), leaf)
        assert g.dtype == dtype and g.abs().sum() > 0
        expected.append(g)
        torch.testing.assert_close(torch.func.grad(entropy)(x), g, rtol=0, atol=0)
    torch.testing.assert_close(torch.func.vmap(entropy)(xs),
                               torch.stack([entropy(x) for x in xs]), rtol=0, atol=0)
    torch.testing.assert_close(torch.func.vmap(torch.func.grad(entropy))(xs),
                               torch.stack(expected), rtol=0, atol=0)
