"""Every per-shard reducer merged over random shard splits and batchings equals one brute-force
pass over all the tokens (Hypothesis): samples, token sums, per-document top-k."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actscope.pipeline import tokenstats
from actscope.pipeline.reducers import Group, HookMerge, HookStatistics
from actscope.pipeline.worker import Batch
from actscope.storage.spec import JobSpec, SAESpec
from tests.reference import band, priority


@st.composite
def jobs(draw):
    n_tokens = draw(st.integers(1, 60))
    width = draw(st.integers(1, 4))
    # Values spread over several octaves, both signs, with exact zeros and ties.
    mags = draw(st.lists(st.sampled_from([0.0, 0.01, 0.3, 0.3, 1.0, 2.5, 7.0, 40.0]), min_size=n_tokens * width, max_size=n_tokens * width))
    signs = draw(st.lists(st.sampled_from([-1.0, 1.0, 1.0]), min_size=n_tokens * width, max_size=n_tokens * width))
    acts = (np.asarray(mags) * np.asarray(signs)).astype(np.float32).reshape(n_tokens, width)
    counted = np.asarray(draw(st.lists(st.booleans(), min_size=n_tokens, max_size=n_tokens)))
    token_ids = np.asarray(draw(st.lists(st.integers(0, 5), min_size=n_tokens, max_size=n_tokens)))
    doc_lengths = draw(st.lists(st.integers(1, 9), min_size=1, max_size=n_tokens))
    docs = np.repeat(np.arange(len(doc_lengths)), doc_lengths)[:n_tokens]
    docs = np.concatenate([docs, np.full(n_tokens - len(docs), docs[-1])])
    cuts = sorted(draw(st.lists(st.integers(1, max(n_tokens - 1, 1)), max_size=4, unique=True)))
    spec = JobSpec.from_dict({
        "model": "m", "dataset": {"path": "text"}, "hooks": ["h"], "store": "s", "top_k": draw(st.integers(1, 4)),
        "samples_per_band": draw(st.integers(1, 3)), "band_sample_rate": draw(st.sampled_from([1.0, 0.5, 0.125])), "random_samples": draw(st.integers(1, 5)),
        "seed": draw(st.integers(0, 2**32 - 1)), "top_tokens": 2, "min_token_count": draw(st.integers(1, 3)),
        "examples": draw(st.sampled_from(["token", "document"])),
        "saes": [{"name": "lat", "path": "sae", "hook": "h"}],
    })
    # "lat" is an SAE's site: its token sums are sparse (only where the unit is non-zero).
    return spec, acts, counted, token_ids, docs, [c for c in cuts if c < n_tokens], draw(st.integers(1, 7)), draw(st.sampled_from(["h", "lat"]))


def _merged(spec, acts, counted, token_ids, docs, cuts, batch_size, site="h"):
    bounds = [0, *cuts, len(acts)]
    merge = HookMerge(spec, site, acts.shape[1], vocab_size=6)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    for a, b in itertools.pairwise(bounds):
        stats = HookStatistics(spec, Group(site, acts.shape[1], t(token_ids[a:b]).long(), t(counted[a:b]), offset=a))
        for b0 in range(a, b, batch_size):
            b1 = min(b0 + batch_size, b)
            index = torch.arange(b0, b1)
            stats.update(t(acts[b0:b1]), Batch(
                first=b0 - a, counted=t(counted[b0:b1]), global_index=index, token_ids=t(token_ids[b0:b1]).long(),
                docs=t(docs[b0:b1]).long(), priority=torch.from_numpy(np.array([priority(int(i), spec.seed) for i in index], dtype=np.int64)),
            ))
        merge.add(stats.result())
    return merge.result()


@settings(max_examples=120, deadline=None)
@given(jobs())
def test_merged_reducers_equal_brute_force(job):
    spec, acts, counted, token_ids, docs, cuts, batch_size, site = job
    got = _merged(spec, acts, counted, token_ids, docs, cuts, batch_size, site)
    index = np.flatnonzero(counted)
    prio = {int(i): priority(int(i), spec.seed) for i in index}
    by_priority = sorted(index.tolist(), key=prio.__getitem__)
    # Random samples: the lowest priorities among counted tokens, with every neuron's value.
    r = got["random_index"]
    assert r[r >= 0].tolist() == by_priority[: spec.random_samples]
    np.testing.assert_array_equal(got["random_value"][r >= 0], acts[r[r >= 0]])
    for neuron in range(acts.shape[1]):
        # Band samples: per band, the lowest priorities among counted tokens in the band.
        for b in range(32):
            eligible = [i for i in by_priority if prio[i] < spec.band_sample_rate * 2**32]
            members = [i for i in eligible if band(float(acts[i, neuron])) == b][: spec.samples_per_band]
            cell = got["band_index"][b, neuron]
            assert cell[cell >= 0].tolist() == members
        # Token sums: mean activation per token id among those seen min_token_count times.
        ids, counts = np.unique(token_ids[index], return_counts=True)
        means = {t: acts[index[token_ids[index] == t], neuron].astype(np.float64).mean() for t in ids}
        fired = {t for t in ids if (acts[index[token_ids[index] == t], neuron] != 0).any()}
        eligible = sorted((t for t, c in zip(ids, counts) if c >= spec.min_token_count and (site == "h" or t in fired)), key=lambda t: (-means[t], t))
        top = got["token_top_ids"][:, neuron] if len(got["token_top_ids"]) else np.array([])
        assert top[top >= 0].tolist() == eligible[: spec.top_tokens]
        assert got["token_top_mean"][:, neuron][top >= 0].tolist() == [means[t] for t in eligible[: spec.top_tokens]]
        # Extremes: per token, or the best token of each document, ties by lower token index.
        for side, sign in (("top", 1), ("bottom", -1)):
            candidates = sorted(index.tolist(), key=lambda i: (-sign * acts[i, neuron], i))
            if spec.examples == "document":
                seen = set()
                candidates = [i for i in candidates if not (docs[i] in seen or seen.add(docs[i]))]
            picked = got[f"{side}_index"][:, neuron]
            assert picked[picked >= 0].tolist() == candidates[: spec.top_k]


def test_equal_means_tie_by_id_in_any_split():
    """Token 0 sees 0.3, -0.3, 0.3 and token 1 sees -0.01, 0.3, 0.01: both means are 0.1 exactly in
    float64, so token 0 ranks first whatever the split. A float32 sum breaks that tie by split."""
    acts = np.array([[0.3], [-0.01], [0.3], [-0.3], [0.01], [0.3]], dtype=np.float32)
    token_ids = np.array([0, 1, 1, 0, 1, 0])
    spec = JobSpec.from_dict({"model": "m", "dataset": {"path": "text"}, "hooks": ["h"], "store": "s", "top_tokens": 2, "min_token_count": 1})
    spec = spec.model_copy(update={"saes": [SAESpec(name="lat", path="sae", hook="h")]})
    for site in ("h", "lat"):
        for cuts in ([], [1], [2], [3], [1, 4], [2, 3, 5]):
            for batch_size in (1, 2, 6):
                got = _merged(spec, acts, np.ones(6, dtype=bool), token_ids, np.zeros(6, dtype=np.int64), cuts, batch_size, site)
                assert got["token_top_ids"][:, 0].tolist() == [0, 1], (site, cuts, batch_size)


def test_sparse_token_sums_fold_the_same_whenever_they_compact(monkeypatch):
    """An SAE site's (token, latent) sums are folded into one sorted run as pieces arrive; folding
    after every batch gives the same sums and ranking as folding once, and both equal the means."""
    rng = np.random.default_rng(3)
    acts = (rng.random((300, 7)) < 0.2) * rng.choice([0.5, 1.25, 3.0], (300, 7))
    acts = acts.astype(np.float32)
    token_ids = rng.integers(0, 6, 300)
    spec = JobSpec.from_dict({"model": "m", "dataset": {"path": "text"}, "hooks": ["h"], "store": "s", "top_tokens": 3, "min_token_count": 2,
                              "saes": [{"name": "lat", "path": "sae", "hook": "h"}]})
    args = (spec, acts, np.ones(300, dtype=bool), token_ids, np.zeros(300, dtype=np.int64), [50, 170], 16, "lat")
    once = _merged(*args)
    monkeypatch.setattr(tokenstats.PendingSums, "MIN_PENDING", 1)
    every = _merged(*args)
    for name in ("token_top_ids", "token_top_mean", "token_top_count"):
        np.testing.assert_array_equal(once[name], every[name])
    for unit in range(7):
        means = {t: acts[token_ids == t, unit].astype(np.float64).mean() for t in range(6) if (acts[token_ids == t, unit] != 0).any()}
        best = sorted(means, key=lambda t: (-means[t], t))[:3]
        top = once["token_top_ids"][:, unit]
        assert top[top >= 0].tolist() == best
        np.testing.assert_allclose(once["token_top_mean"][:, unit][top >= 0], [means[t] for t in best], rtol=1e-12)


def test_auto_tracks_every_token_where_their_sums_fit_and_the_most_frequent_where_not():
    """``tracked_tokens: auto`` is a function of the job, its widths and its vocabulary (never of
    a machine): every token while the neurons' sums fit ``TOKEN_SUMS_BUDGET``, else as many of
    the most frequent as fit. SAE latents (sparse sums) do not count."""
    from actscope.pipeline.capacity import TOKEN_SUMS_BUDGET, tracked_token_count
    from actscope.storage.spec import JobSpec

    def spec(**fields):
        return JobSpec.from_dict({"model": "m", "dataset": {"path": "text"}, "hooks": ["h"], "store": "/s.zarr", **fields})

    gpt2_layer, gpt2_small = {"h": 3072}, {f"h{i}": 3072 for i in range(12)}
    llama_8b = {f"h{i}": 14_336 for i in range(32)}
    assert tracked_token_count(spec(), gpt2_layer, 50_257) == 0  # 1.2 GB: every token
    assert tracked_token_count(spec(), gpt2_small, 50_257) == TOKEN_SUMS_BUDGET // (8 * 36_864) == 7_281
    assert tracked_token_count(spec(), llama_8b, 128_256) == 585
    assert tracked_token_count(spec(tracked_tokens="all"), llama_8b, 128_256) == 0
    assert tracked_token_count(spec(tracked_tokens=40), gpt2_layer, 50_257) == 40
    assert tracked_token_count(spec(tracked_tokens=60_000), gpt2_layer, 50_257) == 0  # more than the vocabulary: all
    assert tracked_token_count(spec(statistics=["bottom"]), llama_8b, 128_256) == 0


def test_auto_pairs_are_the_widest_whose_co_moments_fit():
    """``coactivation.pairs: auto``: all site pairs where their co-moments fit
    ``COACTIVATION_BUDGET``, else adjacent layers', else each hook with itself; as given otherwise."""
    from actscope.pipeline.coactivation import chosen_pairs
    from actscope.storage.spec import JobSpec

    def spec(hooks, **coactivation):
        return JobSpec.from_dict({"model": "m", "dataset": {"path": "text"}, "hooks": hooks, "store": "/s.zarr", "coactivation": coactivation})

    small = [f"blocks.{i}.mlp.hook_post" for i in range(4)]
    gpt2_small = [f"blocks.{i}.mlp.hook_post" for i in range(12)]
    llama_8b = [f"blocks.{i}.mlp.hook_post" for i in range(32)]
    assert chosen_pairs(spec(small), dict.fromkeys(small, 1024)) == "all"
    assert chosen_pairs(spec(gpt2_small), dict.fromkeys(gpt2_small, 3072)) == "adjacent"  # all: 5.5 GiB; adjacent: 1.6
    assert chosen_pairs(spec(llama_8b), dict.fromkeys(llama_8b, 14_336)) == "within"
    assert chosen_pairs(spec(gpt2_small, pairs="all"), dict.fromkeys(gpt2_small, 3072)) == "all"
