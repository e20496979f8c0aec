"""Every per-shard reducer merged over random shard splits and batchings equals one brute-force
pass over all the tokens (Hypothesis): samples, token sums, per-document top-k."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actscope.pipeline.reducers import Group, HookMerge, HookStatistics
from actscope.pipeline.worker import Batch
from actscope.storage.spec import JobSpec
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
    })
    return spec, acts, counted, token_ids, docs, [c for c in cuts if c < n_tokens], draw(st.integers(1, 7))


def _merged(spec, acts, counted, token_ids, docs, cuts, batch_size):
    bounds = [0, *cuts, len(acts)]
    merge = HookMerge(spec, acts.shape[1], vocab_size=6)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    for a, b in itertools.pairwise(bounds):
        stats = HookStatistics(spec, Group("h", acts.shape[1], t(token_ids[a:b]).long(), t(counted[a:b]), offset=a))
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
    spec, acts, counted, token_ids, docs, cuts, batch_size = job
    got = _merged(spec, acts, counted, token_ids, docs, cuts, batch_size)
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
        eligible = sorted((t for t, c in zip(ids, counts) if c >= spec.min_token_count), key=lambda t: (-means[t], t))
        top = got["token_top_ids"][:, neuron] if len(got["token_top_ids"]) else np.array([])
        assert top.tolist() == eligible[: spec.top_tokens]
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
    for cuts in ([], [1], [2], [3], [1, 4], [2, 3, 5]):
        for batch_size in (1, 2, 6):
            got = _merged(spec, acts, np.ones(6, dtype=bool), token_ids, np.zeros(6, dtype=np.int64), cuts, batch_size)
            assert got["token_top_ids"][:, 0].tolist() == [0, 1], (cuts, batch_size)
