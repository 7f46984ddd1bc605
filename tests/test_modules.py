"""The nn.Modules, the default dictionary, reductions, low-precision inputs and the diagnostics."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fierce_ext
from fierce_ext.functional import default_dictionary
from fierce_ext.noise import draw_seed
from oracle import entropy_bits, oracle

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env_with_repo():
    # Whether fierce_ext is installed or imported from the source tree, the child finds it.
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    return env


def test_feature_entropy_state_dict_round_trip(backend):
    custom = torch.rand(2, 8, 10, generator=torch.Generator().manual_seed(3)) * 4 - 2
    module = fierce_ext.FeatureEntropy(8, bins=10, heads=2, dictionary=custom, backend=backend)
    state = module.state_dict()
    assert set(state) == {"dictionary"} and torch.equal(state["dictionary"], custom)
    assert list(module.parameters()) == []  # a buffer: never trained
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fresh = fierce_ext.FeatureEntropy(8, bins=10, heads=2, backend=backend)
    assert not torch.equal(fresh.dictionary, custom)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh.dictionary, custom)
    features = torch.randn(32, 8)
    # Both compute with the custom dictionary (not a default one): the function's value on it.
    expected = fierce_ext.entropy(features, custom, seed=4, backend=backend)
    assert torch.equal(module(features, seed=4), expected)
    assert torch.equal(fresh(features, seed=4), expected)


def test_feature_entropy_dictionary_is_a_copy():
    # The module keeps its own copy: mutating the caller's tensor later changes nothing.
    custom = torch.rand(1, 4, 6)
    module = fierce_ext.FeatureEntropy(4, dictionary=custom)
    custom.zero_()
    assert module.dictionary.abs().sum() > 0


def test_dictionaries_drawn_on_the_cpu_under_a_default_device():
    # A default device (torch.set_default_device or `with torch.device(...)`; meta here, cuda in
    # the wild) must not move the draw: the atoms stay those of the CPU generator, and
    # device=None means the default device, as in torch's factories. (The context manager, since
    # torch 2.4's set_default_device(None) leaves get_default_device broken.)
    expected = fierce_ext.uniform_dictionary(5, 7, 2, seed=4)
    centres = fierce_ext.bin_dictionary(7, 1, 7)
    with torch.device("meta"):
        assert fierce_ext.uniform_dictionary(5, 7, 2, seed=4).device.type == "meta"
        assert torch.equal(fierce_ext.uniform_dictionary(5, 7, 2, seed=4, device="cpu"), expected)
        assert torch.equal(fierce_ext.bin_dictionary(7, 1, 7, device="cpu"), centres)
        assert fierce_ext.FeatureEntropy(5, bins=7).dictionary.device.type == "meta"


def test_reset_parameters_after_meta_init():
    # Built on the meta device, materialised with to_empty (uninitialised memory), then each
    # module's reset_parameters: the dictionary must be the default one again, in the buffer's
    # dtype; a given dictionary cannot be redrawn, which says so.
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Linear(4, 16),
                                  fierce_ext.FIERCELoss(16, bins=10, heads=2).feature_entropy)
    net = net.to_empty(device="cpu")
    for module in net.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    assert torch.equal(net[1].dictionary, fierce_ext.uniform_dictionary(16, 10, 2, seed=0))
    module = fierce_ext.FeatureEntropy(3, bins=5).double()
    module.dictionary.zero_()
    module.reset_parameters()
    assert torch.equal(module.dictionary,
                       fierce_ext.uniform_dictionary(3, 5, 1, seed=0).double())
    given = fierce_ext.FeatureEntropy(3, dictionary=torch.rand(1, 3, 5))
    with pytest.raises(RuntimeError, match="given its dictionary"):
        given.reset_parameters()


def test_fierce_loss_state_dict_round_trip():
    loss = fierce_ext.FIERCELoss(6, lam=0.5, bins=12, heads=3)
    state = loss.state_dict()
    assert "feature_entropy.dictionary" in state
    assert state["feature_entropy.dictionary"].shape == (3, 6, 12)
    other = fierce_ext.FIERCELoss(6, lam=0.5, bins=12, heads=3)
    other.feature_entropy.dictionary.uniform_(5, 6)
    other.load_state_dict(state)
    assert torch.equal(other.feature_entropy.dictionary, state["feature_entropy.dictionary"])


@pytest.mark.parametrize("estimator", ["gumbel_hard", "softmax"])
def test_fierce_loss_is_ce_minus_lambda_h(backend, estimator):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=gen, requires_grad=True)
    target = torch.randint(0, 5, (16,), generator=gen)
    features = torch.randn(16, 6, generator=gen, requires_grad=True)
    loss_fn = fierce_ext.FIERCELoss(6, lam=0.3, bins=9, heads=2, estimator=estimator,
                                    backend=backend)
    torch.manual_seed(11)
    loss = loss_fn(logits, target, features)
    # The module draws its seed from torch's default generator: replay that draw.
    torch.manual_seed(11)
    seed = int(draw_seed())
    h = fierce_ext.entropy(features, loss_fn.feature_entropy.dictionary, estimator=estimator,
                           seed=seed, backend=backend)
    expected = nn.functional.cross_entropy(logits, target) - 0.3 * h
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(loss_fn.last_entropy, h.detach(), rtol=0, atol=0)
    loss.backward()
    assert logits.grad is not None and features.grad is not None
    assert features.grad.abs().sum() > 0


@pytest.mark.parametrize("similarity,estimator,tau", [("dot", "gumbel_soft", 0.5),
                                                      ("distance", "softmax", 2.0),
                                                      ("cosine", "gumbel_hard", 0.25)])
def test_modules_pass_their_options_to_the_function(backend, similarity, estimator, tau):
    # Every other module test keeps the default similarity (and most the default estimator and
    # tau): a module that dropped one of them would go unnoticed.
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(24, 6, generator=gen, requires_grad=True)
    options = dict(similarity=similarity, estimator=estimator, tau=tau, backend=backend)
    module = fierce_ext.FeatureEntropy(6, bins=9, heads=2, **options)
    expected = fierce_ext.entropy(features, module.dictionary, seed=3, reduction="none",
                                  **options)
    got = module(features, seed=3, reduction="none")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    (grad,) = torch.autograd.grad(got.sum(), features)
    (want,) = torch.autograd.grad(expected.sum(), features)
    torch.testing.assert_close(grad, want, rtol=0, atol=0)
    logits, target = torch.randn(24, 4, generator=gen), torch.randint(0, 4, (24,), generator=gen)
    loss_fn = fierce_ext.FIERCELoss(6, lam=0.5, bins=9, heads=2, **options)
    h = fierce_ext.entropy(features, loss_fn.feature_entropy.dictionary, seed=3, **options)
    torch.testing.assert_close(loss_fn(logits, target, features, seed=3),
                               nn.functional.cross_entropy(logits, target) - 0.5 * h,
                               rtol=0, atol=0)


def test_fierce_loss_custom_criterion():
    criterion = nn.MSELoss()
    loss_fn = fierce_ext.FIERCELoss(4, lam=2.0, criterion=criterion, bins=5,
                                    estimator="softmax")
    prediction, target, features = torch.randn(8, 3), torch.randn(8, 3), torch.randn(8, 4)
    h = fierce_ext.entropy(features, loss_fn.feature_entropy.dictionary, estimator="softmax")
    torch.testing.assert_close(loss_fn(prediction, target, features),
                               criterion(prediction, target) - 2.0 * h)


def test_reduction_none_shape_and_mean(backend):
    features = torch.randn(40, 7)
    dictionary = fierce_ext.uniform_dictionary(7, bins=11, heads=3)
    per_head = fierce_ext.entropy(features, dictionary, seed=1, reduction="none",
                                  backend=backend)
    mean = fierce_ext.entropy(features, dictionary, seed=1, backend=backend)
    assert per_head.shape == (3,) and mean.shape == ()
    torch.testing.assert_close(per_head.mean(), mean)
    module = fierce_ext.FeatureEntropy(7, bins=11, heads=3, backend=backend)
    # Its default dictionary is uniform_dictionary(7, 11, 3, seed=0), the one used above: the
    # module's per-head values are the function's, not merely of its shape.
    torch.testing.assert_close(module(features, seed=1, reduction="none"), per_head,
                               rtol=0, atol=0)


def test_entropy_matches_oracle_entropy(backend):
    # The entropy layer on top of the histogram: H = -(1/C) sum p log2 p, in bits.
    features = torch.randn(50, 6, dtype=torch.float64)
    dictionary = fierce_ext.uniform_dictionary(6, bins=13, heads=2, dtype=torch.float64)
    for estimator in ("gumbel_hard", "gumbel_soft", "softmax"):
        h = fierce_ext.entropy(features, dictionary, estimator=estimator, seed=8,
                               reduction="none", backend=backend)
        ref = oracle(features, dictionary, similarity="cosine", estimator=estimator, tau=1.0,
                     seed=8)
        torch.testing.assert_close(h, entropy_bits(ref.histogram), rtol=1e-12, atol=1e-12)


def test_default_dictionary_path_and_cache(backend):
    features = torch.randn(30, 9)
    h = fierce_ext.entropy(features, seed=2, backend=backend)  # dictionary=None
    explicit = fierce_ext.uniform_dictionary(9, bins=100, heads=1, seed=0)
    torch.testing.assert_close(h, fierce_ext.entropy(features, explicit, seed=2,
                                                     backend=backend), rtol=0, atol=0)
    first = default_dictionary(9, 100, 1, torch.device("cpu"))
    assert first is default_dictionary(9, 100, 1, torch.device("cpu"))  # cached, not redrawn
    assert torch.equal(first, explicit)
    h2 = fierce_ext.entropy(features, bins=17, heads=2, seed=2, reduction="none",
                            backend=backend)
    assert h2.shape == (2,) and bool((h2 <= math.log2(17) + 1e-5).all())
    # bins/heads other than the defaults: still uniform_dictionary(D, bins, heads, seed=0).
    torch.testing.assert_close(h2, fierce_ext.entropy(
        features, fierce_ext.uniform_dictionary(9, bins=17, heads=2, seed=0), seed=2,
        reduction="none", backend=backend), rtol=0, atol=0)
    module = fierce_ext.FeatureEntropy(9)
    assert torch.equal(module.dictionary, explicit)


def test_default_dictionary_first_drawn_in_inference_mode_still_trains(backend):
    # An evaluation pass under torch.inference_mode before the first training step draws the
    # cached default dictionary; training must still be able to save it for its backward.
    fierce_ext.functional._cached_dictionary.cache_clear()
    features = torch.randn(24, 11)
    with torch.inference_mode():
        evaluated = fierce_ext.entropy(features, seed=3, backend=backend)
    leaf = features.clone().requires_grad_()
    trained = fierce_ext.entropy(leaf, seed=3, backend=backend)
    trained.backward()
    assert torch.equal(trained.detach(), evaluated)
    assert leaf.grad.abs().sum() > 0
    assert not default_dictionary(11, 100, 1, torch.device("cpu")).is_inference()


def test_default_dictionary_in_float64_for_float64_features():
    h = fierce_ext.entropy(torch.randn(10, 3, dtype=torch.float64), seed=0)
    assert h.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("estimator", ["gumbel_hard", "softmax"])
def test_low_precision_features(backend, dtype, estimator):
    # fp16/bf16 features: computed in fp32, the entropy returned in fp32, the gradient in the
    # input dtype, and equal to the fp32 computation on the same (rounded) values.
    low = torch.randn(64, 12).to(dtype)
    dictionary = fierce_ext.uniform_dictionary(12, bins=20, heads=2)
    results = {}
    for name, x in (("low", low.clone()), ("fp32", low.float())):
        x.requires_grad_(True)
        h = fierce_ext.entropy(x, dictionary, estimator=estimator, seed=6, backend=backend)
        h.backward()
        results[name] = (h.detach(), x.grad)
    h_low, g_low = results["low"]
    assert h_low.dtype == torch.float32 and g_low.dtype == dtype
    assert bool(torch.isfinite(h_low)) and bool(torch.isfinite(g_low.float()).all())
    torch.testing.assert_close(h_low, results["fp32"][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_low, results["fp32"][1].to(dtype))


def test_low_precision_dictionary(backend):
    # A bf16 dictionary is accepted and computed in fp32 too.
    features = torch.randn(20, 5)
    dictionary = fierce_ext.uniform_dictionary(5, bins=8)
    h = fierce_ext.entropy(features, dictionary.bfloat16(), estimator="softmax",
                           backend=backend)
    ref = fierce_ext.entropy(features, dictionary.bfloat16().float(), estimator="softmax",
                             backend=backend)
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, ref)


def test_histogram_rows_sum_to_one(backend):
    features = torch.randn(77, 5)
    dictionary = fierce_ext.uniform_dictionary(5, bins=9, heads=3)
    for estimator in ("gumbel_hard", "gumbel_soft", "softmax"):
        p = fierce_ext.histogram(features, dictionary, estimator=estimator, seed=0,
                                 backend=backend)
        assert p.shape == (3, 9) and bool((p >= 0).all())
        torch.testing.assert_close(p.sum(dim=1), torch.ones(3), rtol=1e-6, atol=1e-6)


def test_uniform_dictionary():
    a = fierce_ext.uniform_dictionary(4, bins=6, heads=2, low=0.0, high=1.0, seed=5)
    b = fierce_ext.uniform_dictionary(4, bins=6, heads=2, low=0.0, high=1.0, seed=5)
    c = fierce_ext.uniform_dictionary(4, bins=6, heads=2, low=0.0, high=1.0, seed=6)
    assert a.shape == (2, 4, 6) and torch.equal(a, b) and not torch.equal(a, c)
    assert bool((a >= 0).all()) and bool((a < 1).all())
    d = fierce_ext.uniform_dictionary(3, dtype=torch.float64)
    assert d.dtype == torch.float64 and d.shape == (1, 3, 100)
    assert bool((d >= -1).all()) and bool((d < 1).all())


def test_uniform_dictionary_on_huge_ranges_does_not_overflow():
    # high - low overflows for these ranges (the atoms were all Inf or NaN): every atom must be
    # finite and in [low, high].
    for low, high, dtype in [(-3e38, 3e38, torch.float32), (-1e300, 1e300, torch.float64),
                             (-1.7e308, 1.79e308, torch.float64), (-6e4, 6e4, torch.float16)]:
        atoms = fierce_ext.uniform_dictionary(3, 50, 2, low=low, high=high, seed=1, dtype=dtype)
        assert atoms.dtype == dtype and bool(atoms.isfinite().all()), (low, high, dtype)
        assert bool((atoms >= low).all()) and bool((atoms <= high).all())
        assert bool((atoms < 0).any()) and bool((atoms > 0).any())
    centres = fierce_ext.bin_dictionary(5, -1e308, 1e308, dtype=torch.float64)
    assert centres.flatten().tolist() == [-1e308, -5e307, 0.0, 5e307, 1e308]
    # The usual ranges keep their atoms: 2u - 1 and u of the seeded float32 draw, exactly.
    u = torch.rand(2, 4, 6, generator=torch.Generator().manual_seed(5))
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(fierce_ext.uniform_dictionary(4, 6, 2, seed=5, dtype=dtype),
                           (2 * u - 1).to(dtype))
        assert torch.equal(fierce_ext.uniform_dictionary(4, 6, 2, 0.0, 1.0, seed=5, dtype=dtype),
                           u.to(dtype))


def test_bin_dictionary():
    centres = fierce_ext.bin_dictionary(100, 1, 100)
    assert centres.shape == (1, 1, 100)
    assert torch.equal(centres.flatten(), torch.arange(1, 101, dtype=centres.dtype))
    assert fierce_ext.bin_dictionary(5, 0.0, 1.0, heads=3).shape == (3, 1, 5)


def test_age_setting_distance_on_bins(backend):
    # D = 1 features against bins at 1..100 with "distance": a feature at 42.0 with softmax and
    # a small tau puts (almost) all its mass on bin 42.
    features = torch.full((5, 1), 42.0, dtype=torch.float64)
    p = fierce_ext.histogram(features, fierce_ext.bin_dictionary(100, 1, 100,
                                                                 dtype=torch.float64),
                             similarity="distance", estimator="softmax", tau=0.05,
                             backend=backend)
    assert p.argmax().item() == 41 and p[0, 41].item() > 1 - 1e-6


def test_module_to_float64_and_max_entropy():
    module = fierce_ext.FeatureEntropy(3, bins=16).to(torch.float64)
    assert module.dictionary.dtype == torch.float64 and module.max_entropy == 4.0
    assert "bins=16" in repr(module)


def test_available_backends():
    status = fierce_ext.available_backends("cpu")
    assert status["reference"].available and status["torch"].available
    for name, entry in status.items():
        assert isinstance(entry.reason, str) and entry.reason
    assert not status["cuda"].available  # the CUDA extension never runs on CPU tensors


def test_cli_report():
    out = subprocess.run([sys.executable, "-m", "fierce_ext"], capture_output=True, text=True,
                         timeout=120, check=True, cwd=REPO, env=_env_with_repo()).stdout
    assert "fierce_ext" in out and "torch" in out and "reference" in out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dictionary_changed_in_place_is_seen(backend):
    # The backends memoise the dictionary's projection per version: an in-place update
    # (here under no_grad, as an optimiser would do it) must not leave a stale projection.
    status = fierce_ext.available_backends("cpu")[backend]
    if not status.available:  # triton: only in the interpreter (conftest sets it without a GPU)
        pytest.skip(f"{backend} cannot run on this CPU: {status.reason}")
    torch.manual_seed(0)
    features = torch.randn(40, 6, dtype=torch.float64)
    dictionary = fierce_ext.uniform_dictionary(6, 12, 2, dtype=torch.float64)
    kwargs = dict(similarity="cosine", estimator="softmax", backend=backend)
    before = fierce_ext.histogram(features, dictionary, **kwargs)
    with torch.no_grad():
        dictionary.mul_(-1.0)
    after = fierce_ext.histogram(features, dictionary, **kwargs)
    assert not torch.allclose(before, after)
    expected = fierce_ext.histogram(features, dictionary.clone(), **kwargs)
    torch.testing.assert_close(after, expected, rtol=0, atol=0)


def test_derived_forms_do_not_keep_a_dictionary_alive():
    import gc
    import weakref

    from fierce_ext import dictionary as dictionary_module

    dictionary = fierce_ext.uniform_dictionary(5, 7)
    built = []
    form = dictionary_module.derived(dictionary, "test", lambda: built.append(1) or "form")
    assert form == "form"
    assert dictionary_module.derived(dictionary, "test", lambda: "other") == "form"
    assert built == [1]
    reference = weakref.ref(dictionary)
    del dictionary
    gc.collect()
    assert reference() is None
    with torch.inference_mode():
        frozen = fierce_ext.uniform_dictionary(5, 7)
    assert dictionary_module.derived(frozen, "test", lambda: "a") == "a"
    assert dictionary_module.derived(frozen, "test", lambda: "b") == "b"  # never memoised
