"""Bad input raises ValueError/TypeError naming the argument; NaN/Inf never become a number."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import fierce_ext
from oracle import ESTIMATORS, SIMILARITIES

F = torch.randn(8, 5)
W = torch.rand(2, 5, 7)
with warnings.catch_warnings():  # torch calls both layouts beta / prototype
    warnings.simplefilter("ignore", UserWarning)
    F_CSR, F_NESTED = F.to_sparse_csr(), torch.nested.nested_tensor([F, F[:3]])


def _entropy(**kwargs):
    args = dict(features=F, dictionary=W, seed=0)
    args.update(kwargs)
    features = args.pop("features")
    return fierce_ext.entropy(features, **args)


def _histogram(**kwargs):
    args = dict(features=F, dictionary=W, seed=0)
    args.update(kwargs)
    features, dictionary = args.pop("features"), args.pop("dictionary")
    return fierce_ext.histogram(features, dictionary, **args)


CALLS = {"entropy": _entropy, "histogram": _histogram}

# (case id, keyword arguments, exception type, a word the message must contain)
BAD_INPUTS = [
    ("features-1d", dict(features=torch.randn(5)), ValueError, "features"),
    ("features-3d", dict(features=torch.randn(2, 8, 5)), ValueError, "features"),
    ("features-not-tensor", dict(features=[[1.0, 2.0]]), TypeError, "features"),
    ("features-int", dict(features=torch.ones(8, 5, dtype=torch.int64)), TypeError, "features"),
    ("features-bool", dict(features=torch.ones(8, 5, dtype=torch.bool)), TypeError, "features"),
    ("features-sparse", dict(features=F.to_sparse()), TypeError, "features must be a dense"),
    ("features-sparse-csr", dict(features=F_CSR), TypeError, "features must be a dense"),
    ("features-nested", dict(features=F_NESTED), TypeError, "features must be a dense"),
    ("batch-0", dict(features=torch.randn(0, 5)), ValueError, "features"),
    ("dim-0", dict(features=torch.randn(8, 0), dictionary=torch.rand(2, 0, 7)), ValueError,
     "features"),
    ("dictionary-2d", dict(dictionary=torch.rand(5, 7)), ValueError, "dictionary"),
    ("dictionary-4d", dict(dictionary=torch.rand(1, 2, 5, 7)), ValueError, "dictionary"),
    ("dictionary-dim-mismatch", dict(dictionary=torch.rand(2, 4, 7)), ValueError, "dictionary"),
    ("dictionary-int", dict(dictionary=torch.ones(2, 5, 7, dtype=torch.int32)), TypeError,
     "dictionary"),
    ("dictionary-not-tensor", dict(dictionary=[[[1.0]]]), TypeError, "dictionary"),
    ("dictionary-sparse", dict(dictionary=W.to_sparse()), TypeError, "dictionary must be a dense"),
    ("dictionary-requires-grad", dict(dictionary=torch.rand(2, 5, 7, requires_grad=True)),
     ValueError, "detach"),
    ("dictionary-zero-heads", dict(dictionary=torch.rand(0, 5, 7)), ValueError, "dictionary"),
    ("dictionary-zero-bins", dict(dictionary=torch.rand(2, 5, 0)), ValueError, "dictionary"),
    ("devices-differ", dict(features=torch.randn(8, 5, device="meta")), ValueError, "device"),
    ("tau-0", dict(tau=0.0), ValueError, "tau"),
    ("tau-negative", dict(tau=-1.0), ValueError, "tau"),
    ("tau-inf", dict(tau=math.inf), ValueError, "tau"),
    ("tau-nan", dict(tau=math.nan), ValueError, "tau"),
    ("tau-str", dict(tau="1.0"), TypeError, "tau"),
    ("tau-tensor", dict(tau=torch.tensor(1.0)), TypeError, "tau"),
    ("similarity", dict(similarity="euclid"), ValueError, "similarity"),
    ("estimator", dict(estimator="gumbel"), ValueError, "estimator"),
    ("backend-unknown", dict(backend="numpy"), ValueError, "backend"),
    ("backend-not-str", dict(backend=1), TypeError, "backend"),
    ("seed-negative", dict(seed=-1), ValueError, "seed"),
    ("seed-too-large", dict(seed=2**63), ValueError, "seed"),
    ("seed-float", dict(seed=1.5), TypeError, "seed"),
    ("seed-integral-float", dict(seed=3.0), TypeError, "seed"),
    ("seed-tensor", dict(seed=torch.tensor(3)), TypeError, "seed"),
    ("seed-bool", dict(seed=True), TypeError, "seed"),
    ("seed-numpy-bool", dict(seed=np.bool_(True)), TypeError, "seed"),
]


@pytest.mark.parametrize("call", CALLS)
@pytest.mark.parametrize("case, kwargs, error, word", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(call, case, kwargs, error, word):
    with pytest.raises(error, match=word):
        CALLS[call](**kwargs)


@pytest.mark.parametrize("kwargs, word", [
    (dict(reduction="sum"), "reduction"),
    (dict(dictionary=None, bins=0), "bins"),
    (dict(dictionary=None, heads=0), "heads"),
    (dict(dictionary=None, bins=2.5), "bins"),
    # A given dictionary (here 2 heads x 7 bins) fixes bins and heads: no silent override.
    (dict(bins=100), "bins=100 does not match the dictionary's 7 bins"),
    (dict(heads=1), "heads=1 does not match the dictionary's 2 heads"),
])
def test_bad_entropy_only_input(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        _entropy(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(bins=100.0), dict(heads=1.0)])
def test_float_size_refused_when_its_dictionary_is_cached(kwargs):
    # The default dictionary's cache takes 100.0 and 100 for one key: a float must be refused
    # before it gets there, also once the int's entry exists.
    _entropy(dictionary=None, bins=100, heads=1)
    with pytest.raises(TypeError, match=f"{next(iter(kwargs))} must be an int"):
        _entropy(dictionary=None, **kwargs)


def test_bad_row_offset():
    with pytest.raises(ValueError, match="row_offset"):
        _histogram(row_offset=-1)
    with pytest.raises(TypeError, match="row_offset"):
        _histogram(row_offset=2.0)


@pytest.mark.parametrize("row_offset", [2**63, 2**64, 2**70])
def test_row_offset_past_int64_refused(row_offset):
    with pytest.raises(ValueError, match="row_offset"):
        _histogram(row_offset=row_offset)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_row_offset_bounded_by_the_noise_counter(estimator):
    # The counter ((row_offset + b) * C + h) * ceil(K / 4) + k // 4 must stay below 2^63 (int64
    # in the torch form and the op schemas): W has 2 heads and 7 bins, 4 counters per row, so
    # row_offset + 8 rows may reach 2^61 and no more, whatever the estimator.
    limit = 2**63 // 4
    for row_offset in (limit - 7, 2**62, 2**63 - 1):
        with pytest.raises(ValueError, match=r"row_offset \+ batch rows must be at most "
                                             f"{limit}"):
            _histogram(row_offset=row_offset, estimator=estimator)
    # At the limit every backend draws the same noise (the last counter is 2^63 - 1).
    last = _histogram(row_offset=limit - 8, estimator=estimator)
    assert last.isfinite().all()
    torch.testing.assert_close(last, _histogram(row_offset=limit - 8, estimator=estimator,
                                                backend="reference"))


def test_numpy_scalars_are_accepted_as_python_numbers():
    # Seeds, sizes and rates often come out of numpy (schedules, configs, np.random): numpy's
    # integer and floating scalars act as the Python ints and floats of the same value.
    python = dict(seed=3, tau=0.5, bins=10, heads=2, dictionary=None)
    numpy = dict(seed=np.int64(3), tau=np.float32(0.5), bins=np.int32(10), heads=np.uint8(2),
                 dictionary=None)
    torch.testing.assert_close(_entropy(**numpy), _entropy(**python), rtol=0, atol=0)
    torch.testing.assert_close(_histogram(row_offset=np.int64(4), tau=np.float32(0.25)),
                               _histogram(row_offset=4, tau=0.25), rtol=0, atol=0)
    module = fierce_ext.FeatureEntropy(np.int64(5), bins=np.int16(7), heads=np.int64(2),
                                       tau=np.float64(0.5))
    assert (module.bins, module.heads, type(module.tau)) == (7, 2, float)
    torch.testing.assert_close(module(F, seed=np.int64(1)), _entropy(seed=1, tau=0.5,
                               dictionary=fierce_ext.uniform_dictionary(5, 7, 2)), rtol=0, atol=0)
    assert type(fierce_ext.FIERCELoss(5, lam=np.float32(0.25)).lam) is float
    torch.testing.assert_close(
        fierce_ext.uniform_dictionary(np.int64(3), np.int32(4), np.int8(2), low=np.float32(-0.5),
                                      high=np.int64(2), seed=np.uint16(7)),
        fierce_ext.uniform_dictionary(3, 4, 2, low=-0.5, high=2, seed=7), rtol=0, atol=0)
    torch.testing.assert_close(fierce_ext.bin_dictionary(np.int64(5), np.float64(0), np.int8(4)),
                               fierce_ext.bin_dictionary(5, 0.0, 4.0), rtol=0, atol=0)


def test_unavailable_backend_lists_available():
    # No CUDA device here: asking for the cuda backend on CPU tensors names what can run.
    with pytest.raises((RuntimeError, ValueError), match="available") as info:
        _histogram(backend="cuda")
    assert "torch" in str(info.value) and "cuda" in str(info.value)


@pytest.mark.parametrize("kwargs, word", [
    (dict(dim=5, bins=0), "bins"),
    (dict(dim=5, heads=0), "heads"),
    (dict(dim=0), "dim"),
    (dict(dim=5, similarity="l2"), "similarity"),
    (dict(dim=5, estimator="hard"), "estimator"),
    (dict(dim=5, tau=0.0), "tau"),
    (dict(dim=5, dictionary=torch.rand(5, 7)), "dictionary"),
    (dict(dim=5, dictionary=torch.rand(1, 4, 7)), "dim"),
    (dict(dim=5, bins=100, dictionary=torch.rand(1, 5, 7)), "bins=100 does not match"),
    (dict(dim=5, heads=2, dictionary=torch.rand(1, 5, 7)), "heads=2 does not match"),
    (dict(dim=5.0), "dim must be an int"),
    (dict(dim=5, dictionary=torch.rand(1, 5, 7).to_sparse()), "dictionary must be a dense"),
    (dict(dim=5, dictionary=torch.ones(1, 5, 7, dtype=torch.int64)), "dictionary must be a float"),
    (dict(dim=5, dictionary=[[[1.0]]]), "dictionary must be a torch.Tensor"),
    # A given dictionary is checked as forward would check it, with forward's messages.
    (dict(dim=5, dictionary=torch.rand(1, 5, 0)), "dictionary needs heads >= 1 and bins >= 1"),
    (dict(dim=5, dictionary=torch.rand(0, 5, 7)), "dictionary needs heads >= 1 and bins >= 1"),
    (dict(dim=5, dictionary=torch.rand(1, 4, 7)),
     r"dictionary dim 4 \(shape \(1, 4, 7\)\) does not match dim 5"),
    (dict(dim=0, dictionary=torch.rand(1, 0, 7)), "dim must be >= 1"),
    # Checked when the module is built, not at its first forward.
    (dict(dim=5, backend="numpy"), "backend"),
    (dict(dim=5, backend=None), "backend"),
])
def test_bad_module_arguments(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        fierce_ext.FeatureEntropy(**kwargs)


@pytest.mark.parametrize("dictionary", [torch.rand(1, 5, 0), torch.rand(0, 5, 7)],
                         ids=["zero-bins", "zero-heads"])
def test_module_refuses_a_dictionary_forward_would_refuse(dictionary):
    # At construction, not at the first forward (nor as .max_entropy's "math domain error"),
    # and in the words forward uses.
    with pytest.raises(ValueError) as at_forward:
        _entropy(dictionary=dictionary)
    with pytest.raises(ValueError) as at_construction:
        fierce_ext.FeatureEntropy(5, dictionary=dictionary)
    assert str(at_construction.value) == str(at_forward.value)


@pytest.mark.parametrize("lam", [math.nan, math.inf, "1", None])
def test_bad_lambda(lam):
    with pytest.raises((ValueError, TypeError), match="lam"):
        fierce_ext.FIERCELoss(5, lam=lam)


@pytest.mark.parametrize("kwargs, word", [
    (dict(dim=0), "dim"), (dict(dim=3, bins=0), "bins"), (dict(dim=3, heads=0), "heads"),
    (dict(dim=3, low=1.0, high=1.0), "low"), (dict(dim=3.0), "dim"),
    (dict(dim=3, dtype=torch.int32), "dtype"), (dict(dim=3, dtype=torch.complex64), "dtype"),
    (dict(dim=3, low=-math.inf), "low"), (dict(dim=3, high=math.nan), "high"),
    (dict(dim=3, low="0"), "low"),
    # seed: an int in [0, 2**63) or None, as for entropy's seed.
    (dict(dim=3, seed=-1), r"seed must be in \[0, 2\*\*63\)"),
    (dict(dim=3, seed=2**63), r"seed must be in \[0, 2\*\*63\)"),
    (dict(dim=3, seed=2**64), r"seed must be in \[0, 2\*\*63\)"),
    (dict(dim=3, seed=True), "seed"),
    # low and high must be finite, and distinct, in the dictionary's dtype.
    (dict(dim=3, low=-1e39), "low=-1e\\+39 is not representable in torch.float32"),
    (dict(dim=3, low=0.0, high=1e39), "high=1e\\+39 is not representable in torch.float32"),
    (dict(dim=3, low=0.0, high=7e4, dtype=torch.float16), "high=70000.0 is not representable"),
    (dict(dim=3, low=-4e38, high=0.0, dtype=torch.bfloat16), "low"),
    (dict(dim=3, low=1.0, high=1.0 + 1e-10), "round to the same torch.float32 value"),
])
def test_bad_uniform_dictionary(kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        fierce_ext.uniform_dictionary(**kwargs)


@pytest.mark.parametrize("args, kwargs, word", [
    ((0, 1.0, 2.0), {}, "bins"), ((5, 2.0, 1.0), {}, "low"), ((5, 0.0, math.inf), {}, "high"),
    ((5, 0.0, 1.0), dict(dtype=torch.int64), "dtype"),
    ((5, 0.0, 1e39), {}, "high=1e\\+39 is not representable"),
    ((5, -7e4, 0.0), dict(dtype=torch.float16), "low"),
])
def test_bad_bin_dictionary(args, kwargs, word):
    with pytest.raises((ValueError, TypeError), match=word):
        fierce_ext.bin_dictionary(*args, **kwargs)


def test_one_bin_dictionary_sits_at_low():
    assert fierce_ext.bin_dictionary(1, 3.0, 3.0).flatten().tolist() == [3.0]


def test_bad_histogram_entropy():
    with pytest.raises(ValueError, match="histogram"):
        fierce_ext.histogram_entropy(torch.rand(7))
    with pytest.raises(TypeError, match="histogram"):
        fierce_ext.histogram_entropy(torch.ones(1, 10, dtype=torch.long))
    with pytest.raises(TypeError, match="histogram"):
        fierce_ext.histogram_entropy([[0.5, 0.5]])
    with pytest.raises(ValueError, match="reduction"):
        fierce_ext.histogram_entropy(torch.rand(2, 7), reduction="max")
    with pytest.raises(TypeError, match="histogram must be a dense"):
        fierce_ext.histogram_entropy(torch.rand(2, 7).to_sparse())


# ------------------------------------------------------------------------------ NaN and Inf

NON_FINITE = pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf],
                                     ids=["nan", "inf", "-inf"])


def _poisoned(bad, dtype):
    # One poisoned element among 20 rows; the dictionary has both signs in every head.
    features = torch.randn(20, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    features[7, 2] = bad
    dictionary = torch.rand(2, 4, 6, dtype=dtype, generator=torch.Generator().manual_seed(1))
    return features, dictionary * 2 - 1


@NON_FINITE
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_non_finite_features_give_nan_entropy(backend, bad, similarity, estimator, dtype):
    # A plausible-looking finite entropy would silently train on garbage: it must be NaN.
    features, dictionary = _poisoned(bad, dtype)
    kwargs = dict(similarity=similarity, estimator=estimator, seed=3, backend=backend)
    h = fierce_ext.entropy(features, dictionary, reduction="none", **kwargs)
    assert bool(torch.isnan(h).all()), h
    assert torch.isnan(fierce_ext.entropy(features, dictionary, **kwargs))


@NON_FINITE
@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_non_finite_features_poison_whole_histogram(backend, bad, similarity, estimator):
    # The backend contract (fierce_ext/backends/__init__.py): a row whose logits are
    # not all finite makes the WHOLE histogram NaN, so that anything computed from p (an
    # all-reduce, a KL to uniform, a single bin) cannot come out finite.
    features, dictionary = _poisoned(bad, torch.float64)
    p = fierce_ext.histogram(features, dictionary, similarity=similarity, estimator=estimator,
                             seed=3, backend=backend)
    assert bool(torch.isnan(p).all()), p


def test_bad_device_for_available_backends():
    with pytest.raises(ValueError, match="device"):
        fierce_ext.available_backends("nodevice")


# ------------------------------------------------------------------- zero and huge feature rows

def test_zero_feature_row_gradient_is_that_of_normalize(backend):
    # README / dictionary.NORM_EPS: a zero row's cosines are 0 and its gradient is exactly that
    # of F.normalize(r, dim=1) @ (w / |w|) (norm clamped at 1e-12): finite, ~1e12 x sum delta v.
    features = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    features[2] = 0.0
    features.requires_grad_()
    dictionary = fierce_ext.uniform_dictionary(4, 6, 2, dtype=torch.float64)
    weights = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    p = fierce_ext.histogram(features, dictionary, estimator="softmax", backend=backend)
    (grad,) = torch.autograd.grad((p * weights).sum(), features)
    unit = dictionary / dictionary.norm(dim=1, keepdim=True)
    s = torch.einsum("bd,hdk->bhk", torch.nn.functional.normalize(features, dim=1), unit)
    (expected,) = torch.autograd.grad((torch.softmax(s, -1).mean(0) * weights).sum(), features)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=0)
    assert grad[2].isfinite().all() and grad[2].abs().max() > 1e9


@pytest.mark.parametrize("magnitude", [1e20, 1e30, 1e37])
def test_huge_float32_rows_keep_their_cosines(backend, magnitude):
    # A float32 row (or atom) whose norm exceeds ~1.8e19 squared to Inf: every cosine became 0
    # and the histogram uniform. Cosine is scale invariant: the histogram of the scaled float32
    # features (and atoms) must be the float64 one of the unscaled.
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    dictionary = fierce_ext.uniform_dictionary(4, 5, 2, dtype=torch.float64)
    options = dict(estimator="softmax", backend=backend)
    expected = fierce_ext.histogram(features, dictionary, **options)
    for scaled_features, scaled_dictionary in [(features * magnitude, dictionary),
                                               (features, dictionary * magnitude)]:
        p = fierce_ext.histogram(scaled_features.float(), scaled_dictionary.float(), **options)
        torch.testing.assert_close(p, expected.float(), rtol=1e-5, atol=1e-6)


def test_huge_float32_rows_reference_gradient():
    # The reference backend's gradient of such rows too: (r / |r|) / |r|, not r / |r|^2.
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    dictionary = fierce_ext.uniform_dictionary(4, 5, 2, dtype=torch.float64)
    grads = []
    for rows, atoms in [(features, dictionary), (features.float() * 1e25, dictionary.float())]:
        rows = rows.clone().requires_grad_()
        value = fierce_ext.entropy(rows, atoms, estimator="softmax", backend="reference")
        (grad,) = torch.autograd.grad(value, rows)
        grads.append(grad)
    torch.testing.assert_close(grads[1].double() * 1e25, grads[0], rtol=1e-4, atol=1e-6)
