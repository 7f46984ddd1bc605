"""The shared Gumbel noise rule (fierce_ext/noise.py): Philox known answers, an independent numpy
implementation compared bit for bit, the uniform's range, row_offset consistency, statistics."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fierce_ext
from fierce_ext import noise
from oracle import numpy_gumbel, numpy_philox4x32_10, numpy_random_words, numpy_uniform

# Random123's known-answer vectors for philox4x32_10 (kat_vectors): counter, key -> output.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in counter]
    got = tuple(int(x) for x in noise.philox4x32_10(*words, *key))
    assert got == expected, [f"{x:08x}" for x in got]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_numpy_philox_known_answers(counter, key, expected):
    # The independent implementation is itself pinned to Random123 before it judges anything.
    got = numpy_philox4x32_10(np.array(counter, dtype=np.uint32), key)
    assert tuple(int(x) for x in got) == expected


@settings(max_examples=40)
@given(seed=st.one_of(st.integers(0, 2**32), st.integers(0, 2**63 - 1)),
       rows=st.integers(1, 9), heads=st.integers(1, 4), bins=st.integers(1, 13),
       row_offset=st.one_of(st.integers(0, 1000), st.integers(2**32 - 20, 2**32 + 20),
                            st.integers(0, 2**40)))
def test_words_match_numpy_bit_for_bit(seed, rows, heads, bins, row_offset):
    # row_offset near 2^32 / C / Q pushes the counter across its 32-bit word boundary.
    got = noise.random_words(seed, rows, heads, bins, row_offset)
    assert got.dtype == torch.int64 and got.shape == (rows, heads, bins)
    expected = numpy_random_words(seed, rows, heads, bins, row_offset)
    np.testing.assert_array_equal(got.numpy(), expected.astype(np.int64))


def test_cpu_blocks_and_torch_form_match_numpy():
    # The CPU draws CPU_BLOCK counters at a time with the paired numpy rounds; other devices use
    # the four-word torch form. Both against the oracle, across block boundaries.
    seed, rows, heads, bins, offset = 2**40 + 99, 601, 3, 37, 2**31 + 5  # 18030 counters
    expected = numpy_random_words(seed, rows, heads, bins, offset).astype(np.int64)
    assert rows * heads * -(-bins // 4) > 2 * noise.CPU_BLOCK
    np.testing.assert_array_equal(noise.random_words(seed, rows, heads, bins, offset).numpy(),
                                  expected)
    quads = -(-bins // 4)
    torch_words = noise._words_torch(offset * heads * quads, rows * heads * quads,
                                     (seed & noise.MASK32, seed >> 32), "cpu")
    np.testing.assert_array_equal(
        torch_words.view(rows, heads, quads * 4)[:, :, :bins].numpy(), expected)


def test_counter_crosses_32_bits():
    # One head, 4 bins -> one counter per row: rows 2^32-2 .. 2^32+1 straddle the boundary, and
    # must not repeat the words of rows 0 .. 3 (a 32-bit counter would wrap onto them).
    high = noise.random_words(7, 4, 1, 4, row_offset=2**32 - 2)
    np.testing.assert_array_equal(high.numpy(), numpy_random_words(7, 4, 1, 4, 2**32 - 2))
    low = noise.random_words(7, 4, 1, 4, row_offset=0)
    assert not torch.equal(high[2:], low[:2])


def test_counter_limit_is_2_to_the_63():
    # The last rows whose counters stay below 2^63 draw the rule's words in every form (numpy,
    # the torch form of other devices, the compiled op); one row more is refused, not wrapped.
    seed, heads, bins = 11, 3, 10  # 3 counters per (row, head): 9 per row
    rows = 4
    offset = 2**63 // 9 - rows
    assert (offset + rows) * heads * 3 - 1 < 2**63 <= (offset + rows + 1) * heads * 3 - 1
    expected = numpy_random_words(seed, rows, heads, bins, offset).astype(np.int64)
    np.testing.assert_array_equal(noise.random_words(seed, rows, heads, bins, offset).numpy(),
                                  expected)
    words = noise._words_torch(offset * heads * 3, rows * heads * 3, (seed, 0), "cpu")
    np.testing.assert_array_equal(words.view(rows, heads, 12)[:, :, :bins].numpy(), expected)
    np.testing.assert_array_equal(
        noise.uniform_noise(seed, rows, heads, bins, offset, dtype=torch.float64).numpy(),
        numpy_uniform(expected))
    for call in (noise.random_words, noise.uniform_noise, noise.gumbel_noise):
        with pytest.raises(ValueError, match="row_offset"):
            call(seed, rows, heads, bins, offset + 1)


def test_seed_high_word_matters():
    # The key is (seed lo32, seed hi32): seeds equal in their low 32 bits must differ.
    a = noise.random_words(5, 3, 2, 8)
    b = noise.random_words(5 + 2**32, 3, 2, 8)
    assert not torch.equal(a, b)
    np.testing.assert_array_equal(b.numpy(), numpy_random_words(5 + 2**32, 3, 2, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gumbel_matches_numpy(dtype):
    seed, shape = 123456789012345, (37, 3, 29)
    got = noise.gumbel_noise(seed, *shape, row_offset=11, dtype=dtype)
    assert got.dtype == dtype and got.shape == shape
    expected = numpy_gumbel(seed, *shape, row_offset=11)
    # u is exact in both; -log(-log u) differs by math-library rounding only.
    tol = dict(rtol=1e-14, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.numpy().astype(np.float64), expected, **tol)
    u = noise.uniform_from_words(noise.random_words(seed, *shape, row_offset=11), dtype)
    np.testing.assert_array_equal(u.numpy().astype(np.float64),
                                  numpy_uniform(numpy_random_words(seed, *shape, 11)))


def _compiled_uniform():
    op = noise.compiled_uniform()
    if op is None:  # .ci/run checks that its install has the op, so CI never skips this
        pytest.skip("fierce_ext._C (the compiled CPU noise op) is not built here")
    return op


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), rows=st.integers(1, 9), heads=st.integers(1, 4),
       bins=st.integers(1, 13), dtype=st.sampled_from([torch.float32, torch.float64]),
       row_offset=st.one_of(st.integers(0, 1000), st.integers(2**32 - 20, 2**32 + 20),
                            st.integers(0, 2**40)))
def test_compiled_uniform_matches_numpy_bit_for_bit(seed, rows, heads, bins, dtype, row_offset):
    _compiled_uniform()
    got = noise.uniform_noise(seed, rows, heads, bins, row_offset, dtype=dtype)
    assert got.dtype == dtype and got.shape == (rows, heads, bins) and got.is_contiguous()
    expected = numpy_uniform(numpy_random_words(seed, rows, heads, bins, row_offset))
    np.testing.assert_array_equal(got.numpy().astype(np.float64), expected)


def test_uniform_noise_without_the_compiled_op(monkeypatch):
    # An install without fierce_ext._C draws the same bits in numpy, and says so once.
    monkeypatch.setattr(noise, "_compiled_uniform", None)
    monkeypatch.setattr(noise, "_warned_numpy_noise", False)
    with pytest.warns(RuntimeWarning, match="draws the CPU noise in numpy"):
        got = noise.uniform_noise(77, 5, 2, 9, 3, dtype=torch.float64)
    np.testing.assert_array_equal(got.numpy(), numpy_uniform(numpy_random_words(77, 5, 2, 9, 3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        noise.uniform_noise(77, 5, 2, 9, 3)


def test_compiled_uniform_split_over_threads():
    # Large enough for torch's parallel_for to split the (row, head) pairs over threads: every
    # task must write exactly its own rows.
    _compiled_uniform()
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))
    try:
        got = noise.uniform_noise(2**40 + 7, 3001, 3, 37, 2**31 - 5, dtype=torch.float64)
    finally:
        torch.set_num_threads(previous)
    words = numpy_random_words(2**40 + 7, 3001, 3, 37, 2**31 - 5)
    np.testing.assert_array_equal(got.numpy(), numpy_uniform(words))


def test_compiled_uniform_rejects_bad_arguments():
    op = _compiled_uniform()
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(torch.empty(2, 1, 3, dtype=torch.float16), 0, 0)
    with pytest.raises(RuntimeError, match="contiguous"):
        op(torch.empty(3, 1, 2).transpose(0, 2), 0, 0)
    with pytest.raises(RuntimeError, match="rows, heads, bins"):
        op(torch.empty(2, 3), 0, 0)
    with pytest.raises(RuntimeError, match="seed"):
        op(torch.empty(2, 1, 3), -1, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_strictly_inside_unit_interval(dtype):
    # The extreme words 0 and 2^32-1 map to 2^-24 and 1 - 2^-24, never 0 or 1: g stays finite.
    extremes = torch.tensor([0, 511, 512, 2**31, 2**32 - 1], dtype=torch.int64)
    u = noise.uniform_from_words(extremes, dtype)
    assert u[0].item() == 2.0**-24 and u[-1].item() == 1 - 2.0**-24
    assert bool(((u > 0) & (u < 1)).all())
    g = -torch.log(-torch.log(u))
    assert bool(torch.isfinite(g).all())
    drawn = noise.uniform_noise(1, 500, 2, 64, dtype=dtype)
    assert bool(((drawn > 0) & (drawn < 1)).all())
    assert bool(torch.isfinite(noise.gumbel_noise(1, 500, 2, 64, dtype=dtype)).all())


@settings(max_examples=25)
@given(seed=st.integers(0, 2**63 - 1), rows=st.integers(2, 40), heads=st.integers(1, 3),
       bins=st.integers(1, 11), data=st.data())
def test_row_offset_slices_the_full_batch(seed, rows, heads, bins, data):
    start = data.draw(st.integers(0, rows - 1))
    stop = data.draw(st.integers(start + 1, rows))
    full = noise.gumbel_noise(seed, rows, heads, bins, dtype=torch.float64)
    part = noise.gumbel_noise(seed, stop - start, heads, bins, row_offset=start,
                              dtype=torch.float64)
    assert torch.equal(part, full[start:stop])


def test_gumbel_statistics():
    # Standard Gumbel: mean = Euler-Mascheroni gamma, std = pi / sqrt(6). n = 1.2M draws.
    g = noise.gumbel_noise(2024, 1000, 3, 400, dtype=torch.float64).flatten()
    n = g.numel()
    std = math.pi / math.sqrt(6)
    assert abs(g.mean().item() - 0.5772156649015329) < 5 * std / math.sqrt(n)
    # The sample variance of a Gumbel has sd sqrt((mu4 - sigma^4) / n), kurtosis 5.4.
    var_sd = std**2 * math.sqrt((5.4 - 1) / n)
    assert abs(g.var().item() - std**2) < 5 * var_sd
    # P(g <= 0) = exp(-1) for a standard Gumbel: a check on the shape, not just two moments.
    frac = (g <= 0).double().mean().item()
    p0 = math.exp(-1)
    assert abs(frac - p0) < 5 * math.sqrt(p0 * (1 - p0) / n)


def test_words_look_uniform_and_independent_across_bins():
    # Each of the 32 bits is set half the time, and neighbouring bins (words of one Philox call,
    # and of consecutive counters) are uncorrelated.
    words = noise.random_words(99, 1024, 2, 64)
    bits = torch.stack([(words >> i) & 1 for i in range(32)]).double()
    n = words.numel()
    assert (bits.mean(dim=(1, 2, 3)) - 0.5).abs().max().item() < 5 * 0.5 / math.sqrt(n)
    u = noise.uniform_from_words(words, torch.float64)
    a, b = u[..., :-1].flatten(), u[..., 1:].flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(a.numel())


def test_draw_seed_follows_torch_manual_seed():
    torch.manual_seed(3)
    a = int(noise.draw_seed())
    torch.manual_seed(3)
    b = int(noise.draw_seed())
    c = int(noise.draw_seed())
    assert a == b and a != c
    assert 0 <= a < noise.SEED_LIMIT



@pytest.mark.parametrize("estimator", ["softmax", "gumbel_hard"])
def test_seed_none_draws_only_where_there_is_noise(estimator):
    # softmax has no noise: adding the term must not move torch's generator (dropout, shuffling
    # and every later draw would change); the Gumbel estimators draw one seed per call.
    features = torch.randn(6, 4)
    state = torch.get_rng_state()
    fierce_ext.entropy(features, bins=5, estimator=estimator)
    fierce_ext.histogram(features, fierce_ext.uniform_dictionary(4, 5), estimator=estimator)
    assert torch.equal(torch.get_rng_state(), state) == (estimator == "softmax")
