"""torch.compile and torch.library checks of the custom ops (CPU).

Each compile costs seconds on the CPU machines, so the compiled functions are few: one training
step (model + FIERCELoss, fixed seed), `entropy` with the default dictionary and a fixed seed (per
CPU backend, with the cheap aot_eager compiler), and `entropy` with seed=None. All use
fullgraph=True, so any graph break fails the test. Traced calls go through the custom ops, plain
eager calls skip them: both paths are compared here.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

import fierce_ext
from fierce_ext import functional
from fierce_ext.ops import (entropy_backward_op, entropy_op, histogram_backward_op,
                            histogram_op)
from tiny_models import Net, eager_and_compiled_step, entropy_term_moves_the_body

BINS = 10


class _GraphRecorder:
    """A torch.compile backend that runs AOT autograd's forward and backward graphs eagerly and
    keeps them (torch._dynamo.testing.AotEagerAndRecordGraphs, which torch < 2.5 lacks)."""

    def __init__(self):
        self.fw_graphs, self.bw_graphs = [], []

        def keep(graphs):
            def compiler(graph_module, example_inputs):
                graphs.append(graph_module)
                return graph_module.forward
            return compiler

        self.backend = aot_autograd(fw_compiler=keep(self.fw_graphs),
                                    bw_compiler=keep(self.bw_graphs))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    model = Net()
    # sync=True without a process group is the single-process computation and must trace too.
    criterion = fierce_ext.FIERCELoss(8, lam=0.7, bins=BINS, heads=2, tau=0.5, sync=True)
    x, target = torch.randn(32, 6), torch.randint(0, 3, (32,))

    (eager_loss, eager_entropy, eager_grads), (loss, entropy, grads) = \
        eager_and_compiled_step(model, criterion, x, target)
    assert 0 < entropy.item() <= math.log2(BINS)
    torch.testing.assert_close(entropy, eager_entropy)
    torch.testing.assert_close(loss, eager_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], msg=f"gradient of {name}")
    # The entropy part of the gradient is not zero, so the comparison above covers it.
    assert entropy_term_moves_the_body(model, criterion, x, target, grads)


def _calls(graphs, op) -> bool:
    return any(node.target is op for graph in graphs for node in graph.graph.nodes)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_compiled_entropy_default_dictionary_fixed_seed(backend):
    status = fierce_ext.available_backends("cpu")[backend]
    if not status.available:  # triton: only in the interpreter (conftest sets it without a GPU)
        pytest.skip(f"{backend} cannot run on this CPU: {status.reason}")
    torch.manual_seed(1)
    x = torch.randn(40, 5, requires_grad=True)

    def fn(x):
        return fierce_ext.entropy(x, bins=BINS, heads=3, seed=77, estimator="gumbel_soft",
                                  backend=backend)

    expected = fn(x)
    (expected_grad,) = torch.autograd.grad(expected, x)
    recorder = _GraphRecorder()
    value = torch.compile(fn, fullgraph=True, backend=recorder.backend)(x)
    (grad,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert grad.abs().sum() > 0
    # Traced, the backend runs inside the custom ops (eager calls skip their dispatch).
    assert _calls(recorder.fw_graphs, torch.ops.fierce_ext.entropy.default)
    assert _calls(recorder.bw_graphs, torch.ops.fierce_ext.entropy_backward.default)


def _compare_compiled(fn, shapes, dynamic):
    """fn compiled (fullgraph, aot_eager) against fn eager, value and gradient, per (rows, dim)."""
    compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for rows, dim in shapes:
        x = torch.randn(rows, dim, requires_grad=True)
        expected = fn(x)
        (expected_grad,) = torch.autograd.grad(expected, x)
        value = compiled(x)
        (grad,) = torch.autograd.grad(value, x)
        torch.testing.assert_close(value, expected, msg=f"value, {rows} x {dim}")
        torch.testing.assert_close(grad, expected_grad, msg=f"gradient, {rows} x {dim}")
        assert grad[:, -1].abs().sum() > 0  # the entropy term reaches every column


def test_guard_scalar_flag_matches_what_dynamo_traces():
    # functional reads dynamo's rule table to decide whether to call guard_scalar; a wrong answer
    # either fails every compiled call with the default dictionary (the flag True where dynamo
    # cannot trace it: torch 2.5 to 2.7 before the flag was read from the table) or leaves a
    # symbolic D unsupported where it could be. So check the table against dynamo itself.
    from torch.fx.experimental.symbolic_shapes import guard_scalar

    def fn(x):
        return x * guard_scalar(x.shape[1])

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend="eager", fullgraph=True)(torch.ones(2, 3))
        traced = True
    except Exception as error:  # dynamo's Unsupported, wrapped differently across versions
        assert "guard_scalar" in str(error), error
        traced = False
    finally:
        torch._dynamo.reset()
    assert functional._GUARD_SCALAR_TRACES == traced


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_compiled_module_with_dynamic_batch(dynamic):
    # A second batch size makes B symbolic (automatic dynamic shapes; dynamic=True makes it
    # symbolic from the start, and floats such as tau too).
    module = fierce_ext.FeatureEntropy(16, bins=BINS, heads=2, tau=0.5)
    _compare_compiled(lambda x: module(x, seed=5), ((32, 16), (40, 16), (48, 16)), dynamic)


@pytest.mark.skipif(not functional._GUARD_SCALAR_TRACES, reason="dynamo before torch 2.8 cannot "
                    "specialise a symbolic feature dimension for the default dictionary (README, "
                    "Versions)")
@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_compiled_default_dictionary_with_dynamic_shapes(dynamic):
    # A second feature dimension makes D symbolic too: the default dictionary is a constant per D
    # (a recompile), B stays symbolic.
    def fn(x):
        return fierce_ext.entropy(x, bins=BINS, seed=4, estimator="gumbel_soft", tau=0.7)

    _compare_compiled(fn, ((32, 16), (40, 16), (40, 24), (48, 24)), dynamic)


_TAU_STAYS_SYMBOLIC = torch.__version__ >= "2.6"  # dynamo before 2.6 specialises floats


def test_compiled_annealed_tau_is_a_graph_input():
    # An annealed temperature (Gumbel estimators): the op takes tau as a tensor, so a new value
    # is an input of the graph; as a float argument of the custom op it was guarded on its
    # value, one recompile per step until torch's limit (8), then eager.
    torch._dynamo.reset()
    module = fierce_ext.FeatureEntropy(16, bins=BINS, heads=2, estimator="gumbel_soft")
    compiled = torch.compile(module)
    x = torch.randn(32, 16, requires_grad=True)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for step in range(10):
        module.tau = 2.0 * 0.8**step
        value = compiled(x, seed=5)
        (grad,) = torch.autograd.grad(value, x)
        expected = module(x, seed=5)
        (expected_grad,) = torch.autograd.grad(expected, x)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(grad, expected_grad)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames
    assert graphs <= (2 if _TAU_STAYS_SYMBOLIC else 10), graphs


def test_compiled_entropy_seed_none_draws_from_default_generator():
    # fallback_random makes inductor draw from torch's default generator exactly as eager does,
    # so a compiled seed=None call must reproduce the eager one after the same manual_seed; a
    # seed baked into the graph at trace time would fail the second comparison.
    x = torch.randn(64, 4, requires_grad=True)

    def fn(x):
        return fierce_ext.entropy(x, bins=BINS, seed=None)

    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(fn, fullgraph=True)
        results = []
        for seed in (3, 4):
            torch.manual_seed(seed)
            expected = fn(x)
            (expected_grad,) = torch.autograd.grad(expected, x)
            torch.manual_seed(seed)
            value = compiled(x)
            (grad,) = torch.autograd.grad(value, x)
            torch.testing.assert_close(value, expected)
            torch.testing.assert_close(grad, expected_grad)
            results.append(value.item())
    assert results[0] != results[1]  # a new seed per call


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("similarity,estimator,dtype", [
    ("cosine", "gumbel_hard", torch.float32),
    ("dot", "gumbel_soft", torch.float64),
    ("distance", "softmax", torch.float32),
    ("cosine", "gumbel_soft", torch.bfloat16),  # fake must say: fp32 outputs, bf16 gradient
], ids=lambda value: str(value).removeprefix("torch."))
def test_opcheck_histogram_ops(backend, similarity, estimator, dtype):
    torch.manual_seed(2)
    features = torch.randn(9, 4, dtype=dtype, requires_grad=True)
    dictionary = fierce_ext.uniform_dictionary(4, 6, 2, dtype=dtype)
    seed = torch.tensor(12345, dtype=torch.int64)
    tau = torch.tensor(0.7, dtype=torch.float64)  # the seed and tau: 0-d CPU tensors
    args = (features, dictionary, seed, similarity, estimator, tau, 3, backend)
    torch.library.opcheck(histogram_op, args)

    hist, lse = histogram_op(*args)
    grad_histogram = torch.randn_like(hist)
    torch.library.opcheck(histogram_backward_op,
                          (grad_histogram, features.detach(), dictionary, lse, seed, similarity,
                           estimator, tau, 3, backend))

    for reduction in ("mean", "none"):
        torch.library.opcheck(entropy_op, (*args, reduction))
        value, hist, lse = entropy_op(*args, reduction)
        torch.library.opcheck(entropy_backward_op,
                              (torch.randn_like(value), hist, features.detach(), dictionary, lse,
                               seed, similarity, estimator, tau, 3, backend, reduction))


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_captures_the_op(strict):
    # Export traces through the custom op (never into a backend), seed drawn in the graph.
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), fierce_ext.FeatureEntropy(8, bins=10))
    x = torch.randn(16, 6)
    program = torch.export.export(model, (x,), strict=strict)
    targets = {node.target for module in program.graph_module.modules()
               for node in module.graph.nodes if node.op == "call_function"}
    assert torch.ops.fierce_ext.entropy.default in targets
    assert torch.ops.aten.randint.low in targets  # seed=None: a fresh seed per call
    value = program.module()(x)
    assert value.shape == () and 0 < value.item() <= math.log2(10)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("function", ["entropy", "histogram"])
def test_torch_export_keeps_the_gradient(strict, function):
    # Strict export runs an autograd.Function with grad mode off: a traced call through one gave
    # the right value but no gradient (the loss's entropy term silently dropped from training).
    torch.manual_seed(7)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(6, 8)
            self.register_buffer("dictionary", fierce_ext.uniform_dictionary(8, 10, 2))
            self.register_buffer("weights", torch.randn(2, 10))

        def forward(self, x):
            features = self.linear(x)
            if function == "entropy":
                return fierce_ext.entropy(features, self.dictionary, seed=3)
            return (fierce_ext.histogram(features, self.dictionary, seed=3) * self.weights).sum()

    model, x = Model(), torch.randn(16, 6)
    (expected,) = torch.autograd.grad(model(x), model.linear.weight)
    exported = torch.export.export(model, (x,), strict=strict).module()
    value = exported(x)
    torch.testing.assert_close(value, model(x), rtol=0, atol=0)
    assert value.requires_grad
    (grad,) = torch.autograd.grad(value, exported.get_parameter("linear.weight"))
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)


class _LinearEntropy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 8)

    def forward(self, x):
        return fierce_ext.entropy(self.linear(x), bins=12, seed=4)  # the default dictionary


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_default_dictionary_dynamic_batch(strict):
    # The default dictionary is first drawn while export traces with fake tensors: it must be
    # a real constant of the program and stay a real tensor in the cache for eager calls.
    # (Strict export of any autograd.Function with a dynamic batch fails on torch 2.6 and 2.7;
    # traced calls reach the custom op without one, and work there too.)
    functional._cached_dictionary.cache_clear()
    torch.manual_seed(6)
    model = _LinearEntropy()
    program = torch.export.export(model, (torch.randn(16, 6),), strict=strict,
                                  dynamic_shapes={"x": {0: torch.export.Dim("batch", min=2)}})
    for rows in (16, 33):
        x = torch.randn(rows, 6)
        assert torch.equal(program.module()(x), model(x)), rows
    assert type(functional.default_dictionary(8, 12, 1, torch.device("cpu"))) is torch.Tensor


def test_fake_tensor_mode_runs_the_default_dictionary_and_the_factories():
    # Memory estimators and meta-style initialisation run whole models under a plain
    # FakeTensorMode: the cached default dictionary (a real tensor) and the factories' range
    # checks (real numbers) must not leak real tensors into it or read fake ones.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode  # noqa: PLC0415

    with FakeTensorMode():
        features = torch.randn(8, 5, requires_grad=True)
        value = fierce_ext.entropy(features, bins=7, seed=0)
        value.backward()
        module = fierce_ext.FeatureEntropy(5, bins=7, heads=2)
        per_head = module(torch.randn(8, 5))
        dictionaries = (fierce_ext.uniform_dictionary(5, 7), fierce_ext.bin_dictionary(7, 1, 7))
        with pytest.raises(ValueError, match="high=1e.39 is not representable"):
            fierce_ext.uniform_dictionary(5, 7, high=1e39, dtype=torch.float32)
    for tensor in (value, features.grad, per_head, module.dictionary, *dictionaries):
        assert isinstance(tensor, FakeTensor)
    assert value.shape == () and value.dtype == torch.float32
    assert features.grad.shape == (8, 5) and per_head.shape == ()
    assert [d.shape for d in dictionaries] == [(1, 5, 7), (1, 1, 7)]
    assert type(functional.default_dictionary(5, 7, 1, torch.device("cpu"))) is torch.Tensor


@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_make_fx_traces_the_default_dictionary_as_a_constant(tracing_mode):
    # make_fx (AOTAutograd's tracer) with fake tensors refused the cached real dictionary.
    from torch.fx.experimental.proxy_tensor import make_fx  # noqa: PLC0415

    def value_and_grad(features):
        features = features.detach().requires_grad_()
        value = fierce_ext.entropy(features, bins=9, seed=2, estimator="gumbel_soft")
        return value, torch.autograd.grad(value, features)[0]

    graph = make_fx(value_and_grad, tracing_mode=tracing_mode)(torch.randn(12, 4))
    for rows in (12, 12 if tracing_mode != "symbolic" else 20):
        x = torch.randn(rows, 4)
        for got, expected in zip(graph(x), value_and_grad(x)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)


class _RecordOps(TorchDispatchMode):
    """Runs every op unchanged and records it; while active, fierce_ext takes its traced path."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("estimator", ["gumbel_hard", "gumbel_soft", "softmax"])
def test_eager_call_and_custom_op_path_agree(backend, estimator, monkeypatch):
    # Plain eager calls run the backend directly; under a dispatch mode (as under tracing) the
    # same computation goes through the custom ops. Both must give the same bits.
    torch.manual_seed(3)
    x = torch.randn(33, 7, requires_grad=True)
    dictionary = fierce_ext.uniform_dictionary(7, 12, 2)

    def value_and_grad():
        value = fierce_ext.entropy(x, dictionary, seed=5, tau=0.6, estimator=estimator,
                                   backend=backend)
        return value, torch.autograd.grad(value, x)[0]

    with monkeypatch.context() as patch:
        for name in ("entropy_op", "entropy_backward_op"):
            patch.setattr(fierce_ext.ops, name, lambda *args: pytest.fail("custom op called"))
        value, grad = value_and_grad()
    recorder = _RecordOps()
    with recorder:
        traced_value, traced_grad = value_and_grad()
    assert torch.ops.fierce_ext.entropy.default in recorder.ops
    assert torch.ops.fierce_ext.entropy_backward.default in recorder.ops
    assert torch.equal(value, traced_value) and torch.equal(grad, traced_grad)
    assert grad.abs().sum() > 0


class _PassThroughMode(TorchDispatchMode):
    """A dispatch mode that changes nothing but makes the calls take the custom ops' path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("function", ["entropy", "histogram"])
@pytest.mark.parametrize("path", ["eager", "op"])
def test_double_backward_is_an_error_not_a_number(backend, function, path):
    # No second derivative exists: create_graph=True still gives the first-order gradient, and
    # differentiating that gradient raises, in fierce_ext's words (not torch's generic "no
    # autograd formula was registered"), instead of returning a plausible number. Both paths:
    # plain eager and the custom ops (here under a dispatch mode, as when traced).
    x = torch.randn(16, 4, requires_grad=True)
    dictionary = fierce_ext.uniform_dictionary(4, 8)
    weights = torch.randn(1, 8)

    def value():
        options = dict(seed=1, estimator="softmax", backend=backend)
        if function == "entropy":
            return fierce_ext.entropy(x, dictionary, **options)
        return (fierce_ext.histogram(x, dictionary, **options) * weights).sum()

    with _PassThroughMode() if path == "op" else contextlib.nullcontext():
        (grad,) = torch.autograd.grad(value(), x, create_graph=True)
    torch.testing.assert_close(grad, torch.autograd.grad(value(), x)[0], rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="fierce_ext's histogram and entropy have no "
                                                  "second derivative"):
        torch.autograd.grad(grad.square().sum(), x)


def test_compiled_double_backward_raises():
    # Compiled, torch itself refuses first (AOTAutograd has no double backward).
    x = torch.randn(16, 4, requires_grad=True)
    dictionary = fierce_ext.uniform_dictionary(4, 8)
    entropy = torch.compile(lambda x: fierce_ext.entropy(x, dictionary, seed=1,
                                                         estimator="softmax"), fullgraph=True)
    (grad,) = torch.autograd.grad(entropy(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grad.square().sum(), x)


def test_eager_argument_errors_unchanged():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="tau"):
        fierce_ext.entropy(x, tau=float("inf"))
    with pytest.raises(ValueError, match="tau"):
        fierce_ext.entropy(x, tau=float("nan"))
    with pytest.raises(ValueError, match="dictionary dim"):
        fierce_ext.entropy(x, torch.rand(1, 5, 4))
    with pytest.raises(ValueError, match="requires grad"):
        fierce_ext.entropy(x, torch.rand(1, 3, 4, requires_grad=True))
    with pytest.raises(TypeError, match="sync"):
        fierce_ext.entropy(x, sync=1)
    with pytest.raises(ValueError, match="bins"):
        fierce_ext.entropy(x, bins=0)


def test_numpy_scalar_arguments_under_compile():
    # Eager code accepts numpy scalars (test_api_errors). Dynamo traces them as arrays, which
    # are no numbers.Integral: without fullgraph the frame falls back to eager and gives the eager
    # value; with fullgraph=True the error says what to pass instead.
    x = torch.randn(16, 5)

    def step(x, seed, tau):
        return fierce_ext.entropy(x, seed=seed, tau=tau, bins=BINS)

    expected = step(x, 3, 0.5)
    numpy_args = (np.int64(3), np.float32(0.5))
    torch.testing.assert_close(torch.compile(step, backend="eager")(x, *numpy_args), expected,
                               rtol=0, atol=0)
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(step, backend="eager", fullgraph=True)(x, *numpy_args)
    chain, error = [], info.value  # where dynamo puts the TypeError depends on torch's version
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    # Dynamo before torch 2.9 drops the message of an exception raised in traced code (checked:
    # 2.4.1, 2.5.1, 2.6.0, 2.7.1 and 2.8.0 drop it, 2.9.1 and later keep it).
    if torch.__version__ >= "2.9":
        assert any("tau must be a real number" in m and "pass a Python number" in m
                   for m in chain), chain
