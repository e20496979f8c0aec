"""The device top-k and its merge: exact, tie-broken by token index, independent of splitting."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actscope.pipeline.topk import RunningTopK, merge_topk, ordered_bits, unordered_bits
from tests.reference import brute_top_k


def _acts(draw, n_tokens, width):
    # Small integers make ties common, as ReLU zeros do in real models; then some signs and zeros.
    values = draw(st.lists(st.integers(-3, 3), min_size=n_tokens * width, max_size=n_tokens * width))
    return np.asarray(values, dtype=np.float32).reshape(n_tokens, width) * np.float32(0.5)


@st.composite
def problems(draw):
    n_tokens = draw(st.integers(1, 40))
    width = draw(st.integers(1, 5))
    acts = _acts(draw, n_tokens, width)
    counted = np.asarray(draw(st.lists(st.booleans(), min_size=n_tokens, max_size=n_tokens)))
    k = draw(st.integers(1, 8))
    cuts = sorted(draw(st.lists(st.integers(1, max(n_tokens - 1, 1)), max_size=4, unique=True)))
    return acts, counted, k, [c for c in cuts if c < n_tokens]


def _shard_topk(acts, counted, k, first, largest, batch):
    top = RunningTopK(k, acts.shape[1], torch.device("cpu"), largest=largest)
    for b0 in range(0, len(acts), batch):
        top.update(torch.from_numpy(acts[b0:b0 + batch]), b0, torch.from_numpy(counted[b0:b0 + batch]))
    values, index = top.result()
    return values, np.where(index >= 0, index + first, -1)


@settings(max_examples=150, deadline=None)
@given(problems(), st.booleans(), st.integers(1, 40))
def test_split_merge_equals_brute_force(problem, largest, batch):
    acts, counted, k, cuts = problem
    bounds = [0, *cuts, len(acts)]
    parts = [
        _shard_topk(acts[a:b], counted[a:b], k, a, largest, batch) for a, b in itertools.pairwise(bounds)
    ]
    rng = np.random.default_rng(len(cuts))
    parts = [parts[i] for i in rng.permutation(len(parts))]  # merge order must not matter
    values, index = merge_topk(parts, k, largest=largest)
    ref_values, ref_index = brute_top_k(acts, counted, k, largest=largest)
    n = ref_values.shape[0]
    np.testing.assert_array_equal(values[:n], ref_values)
    np.testing.assert_array_equal(index[:n], ref_index)
    assert (index[n:] == -1).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.sampled_from([1, 3, 8]))
def test_a_sparse_first_batch_keeps_the_first_tied_tokens(seed, largest, k):
    """SAE latents are 0 almost everywhere: on a first batch the bound is 0 and nearly every token
    ties at it; only the first k counted tied tokens are kept, and the result is still exact."""
    rng = np.random.default_rng(seed)
    acts = ((rng.random((400, 12)) < 0.03) * rng.choice([0.5, 1.0, 2.0], (400, 12))).astype(np.float32)
    acts[:, 0] = 0.0  # a dead latent
    counted = rng.random(400) < 0.9
    values, index = _shard_topk(acts, counted, k, 0, largest, 400)
    ref_values, ref_index = brute_top_k(acts, counted, k, largest=largest)
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(index, ref_index)


def test_ordered_bits_is_monotonic_and_invertible():
    x = np.array([-np.inf, -3e38, -1.5, -1e-40, -0.0, 0.0, 1e-40, 2.0, 3e38, np.inf], dtype=np.float32)
    keys = ordered_bits(torch.from_numpy(x)).numpy()
    assert (np.diff(keys) >= 0).all()
    assert keys[4] == keys[5]  # -0.0 and 0.0 are one value
    back = unordered_bits(ordered_bits(torch.from_numpy(x))).numpy()
    np.testing.assert_array_equal(back, x + np.float32(0.0))


def test_bottom_k_finds_the_most_negative():
    acts = torch.tensor([[0.0], [-2.0], [1.0], [-2.0], [-5.0]])
    top = RunningTopK(3, 1, torch.device("cpu"), largest=False)
    top.update(acts, 0, torch.ones(5, dtype=torch.bool))
    values, index = top.result()
    assert values[:, 0].tolist() == [-5.0, -2.0, -2.0]
    assert index[:, 0].tolist() == [4, 1, 3]


@settings(max_examples=80, deadline=None)
@given(problems(), st.integers(1, 7))
def test_moments_merge_over_any_split_equals_numpy(problem, batch):
    from actscope.pipeline.moments import RunningMoments, describe, merge_moments

    acts, counted, _, cuts = problem
    acts = acts + np.float32(100.0)  # a large mean: raw power sums would lose the kurtosis
    bounds = [0, *cuts, len(acts)]
    parts = []
    for a, b in itertools.pairwise(bounds):
        moments = RunningMoments(acts.shape[1], torch.device("cpu"), threshold=100.0)
        for b0 in range(a, b, batch):
            b1 = min(b0 + batch, b)
            moments.update(torch.from_numpy(acts[b0:b1]), b0, torch.from_numpy(counted[b0:b1]))
        parts.append(moments.result())
    got = describe(merge_moments(parts))
    x = acts[counted].astype(np.float64)
    assert (got["count"] == len(x)).all()
    if len(x) == 0:
        return
    # Batch sums are float32 (then float64 across batches): agreement to float32 precision.
    _assert_moments(got, x, 100.0, mean=1e-7, std=1e-5, shape=1e-4)


def _assert_moments(got: dict, x: np.ndarray, threshold: float, *, mean: float, std: float, shape: float) -> None:
    """``describe``'s statistics against numpy's over ``x`` [tokens, units] (float64), to the
    relative ``mean``, absolute ``std`` and ``shape`` (skew, kurtosis) tolerances given."""
    np.testing.assert_allclose(got["mean"], x.mean(0), rtol=mean, atol=mean)
    np.testing.assert_allclose(got["std"], x.std(0), atol=std)
    np.testing.assert_array_equal(got["min"], x.min(0).astype(np.float32))
    np.testing.assert_array_equal(got["max"], x.max(0).astype(np.float32))
    np.testing.assert_array_equal(got["frac_active"], (x > threshold).mean(0))
    spread = x.std(0) > 1e-6
    if spread.any():
        centred = x[:, spread] - x[:, spread].mean(0)
        m2, m3, m4 = (centred**2).mean(0), (centred**3).mean(0), (centred**4).mean(0)
        np.testing.assert_allclose(got["skew"][spread], m3 / m2**1.5, rtol=shape, atol=shape)
        np.testing.assert_allclose(got["kurtosis"][spread], m4 / m2**2 - 3, rtol=shape, atol=shape)


def test_histogram_bins_at_their_edges():
    from actscope.pipeline.histogram import N_BINS, ZERO, bin_edges, bin_index

    lo, hi = bin_edges()
    assert len(lo) == len(hi) == N_BINS and (lo < hi).all() and (hi[:-1] == lo[1:]).all()
    values = torch.tensor([0.0, -0.0, 2.0**-9, -(2.0**-9), 2.0**-8, -(2.0**-8), 1.0, 1.125, 1.124, -1.0, 1e9, -1e9])
    index = bin_index(values).numpy()
    assert index[:4].tolist() == [ZERO] * 4
    for v, b in zip(values.numpy(), index):
        assert lo[b] <= v <= hi[b] and (v < hi[b] or v < 0), (v, b, lo[b], hi[b])
    assert index[-2] == N_BINS - 1 and index[-1] == 0
    assert index[6] + 1 == index[7] == index[8] + 1  # 1.0 and 1.125 bound one eighth of an octave


@settings(max_examples=80, deadline=None)
@given(problems(), st.integers(1, 7), st.sampled_from([0.0, -0.75, 0.5]))
def test_moments_and_histogram_from_non_zeros_equal_numpy(problem, batch, threshold):
    """An SAE site's moments and histogram come from each batch's non-zero entries and a count of
    its zeros (``pipeline.nonzero``): the same statistics as numpy's over the counted tokens."""
    from actscope.pipeline.histogram import RunningHistogram, bin_index
    from actscope.pipeline.moments import RunningMoments, describe
    from actscope.pipeline.nonzero import NonZeros

    acts, counted, _, _ = problem
    width = acts.shape[1]
    moments = RunningMoments(width, torch.device("cpu"), threshold=threshold)
    hist = RunningHistogram(width, torch.device("cpu"))
    for b0 in range(0, len(acts), batch):
        nz = NonZeros.of(torch.from_numpy(acts[b0:b0 + batch]), torch.from_numpy(counted[b0:b0 + batch]))
        moments.update_nonzero(nz)
        hist.update_nonzero(nz)
    got = describe(moments.result())
    x = acts[counted].astype(np.float64)
    assert (got["count"] == len(x)).all()
    expected = np.zeros((width, 257), dtype=np.int64)
    for unit in range(width):
        np.add.at(expected[unit], bin_index(torch.from_numpy(acts[counted][:, unit])).numpy(), 1)
    np.testing.assert_array_equal(hist.result()["hist"], expected)
    if len(x) == 0:
        return
    _assert_moments(got, x, threshold, mean=1e-12, std=1e-9, shape=1e-6)  # float64 sums throughout


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.booleans(), st.sampled_from([1, 3, 8]), st.sampled_from([7, 50, 400]), st.booleans())
def test_later_batches_rank_candidates_from_the_non_zeros(seed, largest, k, batch, signed):
    """After the first batch, a sparse site's candidates come from its non-zero entries, unless a
    zero could still enter (fewer than k tokens so far, or a k-th value beyond zero): exact
    either way, signed latents included."""
    from actscope.pipeline.nonzero import NonZeros

    rng = np.random.default_rng(seed)
    acts = (rng.random((400, 12)) < 0.04) * rng.choice([0.5, 1.0, 2.0], (400, 12)) * (rng.choice([-1, 1], (400, 12)) if signed else 1)
    acts = acts.astype(np.float32)
    acts[:, 0] = 0.0
    counted = rng.random(400) < 0.9
    top = RunningTopK(k, 12, torch.device("cpu"), largest=largest)
    for b0 in range(0, 400, batch):
        x, c = torch.from_numpy(acts[b0:b0 + batch]), torch.from_numpy(counted[b0:b0 + batch])
        top.update(x, b0, c, NonZeros.of(x, c))
    values, index = top.result()
    ref_values, ref_index = brute_top_k(acts, counted, k, largest=largest)
    np.testing.assert_array_equal(values, ref_values)
    np.testing.assert_array_equal(index, ref_index)
