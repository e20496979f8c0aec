"""Co-activation partners and statistics against brute force on activations taken directly from
``transformers``, and its merge over random shard splits (Hypothesis)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.pipeline.coactivation import site_pairs
from actscope.queries import connect
from actscope.storage.spec import JobSpec
from actscope.storage.store import PAD, TEXT, Store
from tests.conftest import write_job
from tests.reference import COACTIVATION_COLUMNS, activations, check_coactivation, coactivation_brute_force, priority


@pytest.fixture(scope="module")
def coact_run(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("coact-run")
    path = write_job(
        root, "job", tiny_model, corpus_dir, dataset={"max_tokens": 4000},
        hooks=["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"], dense=[],
        shard_size=8, batch_size=5, statistics=["coactivation"], thresholds={"blocks.1.hook_resid_post": 0.5},
        coactivation={"stride": 2, "partners": 4, "pairs": "all"},
    )
    spec = load_job(path)
    run_job(spec, use_ray=False)
    store = Store.open(spec.store)
    data = store.read_tokens(0, store.n_seq)
    ref = activations(str(tiny_model), spec.hooks, data["tokens"], data["kinds"] != PAD)
    return spec, data, ref


def test_partners_and_statistics_equal_brute_force(coact_run):
    spec, data, ref = coact_run
    counted = np.flatnonzero((data["kinds"] == TEXT).reshape(-1))
    chosen = [i for i in counted if priority(int(i), spec.seed) < 2**32 // spec.coactivation.stride]
    xs = [ref[h].reshape(-1, ref[h].shape[-1])[chosen] for h in spec.hooks]
    truth = coactivation_brute_force(xs, [spec.threshold(h) for h in spec.hooks])
    widths = [x.shape[1] for x in xs]
    offsets = dict(zip(spec.hooks, np.cumsum([0, *widths[:-1]])))
    allowed = np.ones((sum(widths), sum(widths)), dtype=bool)
    with connect(spec.store) as catalog:
        rows = catalog.arrow(f"SELECT {', '.join(COACTIVATION_COLUMNS)} FROM coactivation").to_pydict()
    rows = {k: np.asarray(v) for k, v in rows.items()}
    # both rankings, most neurons
    assert check_coactivation(rows, truth, offsets, allowed, spec.coactivation.partners) > sum(widths) * spec.coactivation.partners


@st.composite
def splits(draw):
    n_tokens = draw(st.integers(2, 50))
    widths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    values = [np.asarray(draw(st.lists(st.sampled_from([-1.0, 0.0, 0.0, 0.5, 1.0, 3.0, 100.0]), min_size=n_tokens * w, max_size=n_tokens * w)), dtype=np.float32).reshape(n_tokens, w) for w in widths]
    counted = np.asarray(draw(st.lists(st.booleans(), min_size=n_tokens, max_size=n_tokens)))
    cuts = sorted(draw(st.lists(st.integers(1, n_tokens - 1), max_size=4, unique=True)))
    return values, counted, cuts, draw(st.integers(1, 7)), draw(st.sampled_from(["all", "within", "adjacent"])), draw(st.sampled_from([1, 2]))


@settings(max_examples=40, deadline=None)  # each example writes and merges a real store
@given(splits())
def test_merge_over_any_split_equals_brute_force(tmp_path_factory, problem):
    """Shard partials written to a real store and merged blockwise equal one brute-force pass."""
    from actscope.pipeline.coactivation import RunningCoactivation, coactivation_table
    from actscope.pipeline.worker import Batch
    from actscope.storage.store import COACTIVATION as GROUP
    from actscope.storage.store import Store

    values, counted, cuts, batch_size, pairs, stride = problem
    hooks = [f"blocks.{i}.mlp.hook_post" for i in range(len(values))]
    widths = {h: v.shape[1] for h, v in zip(hooks, values)}
    root = tmp_path_factory.mktemp("coact-merge")
    spec = JobSpec.from_dict({
        "model": "m", "dataset": {"path": "text"}, "hooks": hooks, "store": str(root / "s.zarr"), "statistics": ["coactivation"],
        "context_length": 1, "shard_size": 1, "coactivation": {"pairs": pairs, "partners": 3, "stride": stride},
    })
    bounds = [0, *cuts, len(counted)]
    store = Store.create(spec.store, spec=spec, fingerprint="x", model={"hook_widths": widths})
    store.update_status(n_seq=len(bounds) - 1)  # one "sequence" per shard: only the shard count matters here
    for shard, (a, b) in enumerate(itertools.pairwise(bounds)):
        running = RunningCoactivation(spec, widths, torch.device("cpu"))
        for b0 in range(a, b, batch_size):
            b1 = min(b0 + batch_size, b)
            index = torch.arange(b0, b1)
            running.update({h: torch.from_numpy(v[b0:b1]) for h, v in zip(hooks, values)}, Batch(
                first=0, counted=torch.from_numpy(counted[b0:b1]), global_index=index, token_ids=index, docs=index,
                priority=torch.tensor([priority(int(i), spec.seed) for i in index], dtype=torch.int64),
            ))
        store.write_partial(shard, {GROUP: running.result()}, {})
    rows = {k: np.asarray(v) for k, v in coactivation_table(store, spec).to_pydict().items()}
    chosen = [i for i in np.flatnonzero(counted) if priority(int(i), spec.seed) < 2**32 // stride]
    truth = coactivation_brute_force([v[chosen] for v in values], [0.0] * len(values))
    offsets = dict(zip(hooks, np.cumsum([0, *[v.shape[1] for v in values[:-1]]])))
    site = np.concatenate([np.full(v.shape[1], i) for i, v in enumerate(values)])
    allowed = np.zeros((len(site), len(site)), dtype=bool)
    for i, j in site_pairs(hooks, pairs):
        allowed[np.ix_(site == i, site == j)] = allowed[np.ix_(site == j, site == i)] = True
    check_coactivation(rows, truth, offsets, allowed, 3)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 40), st.booleans())
def test_int8_products_are_exact(m, k, n, transposed):
    """The co-firing counts' product, on every shape (torch's CPU kernel is wrong when m = 1)."""
    from actscope.pipeline.coactivation import int8_products

    rng = np.random.default_rng(m * 1681 + k * 41 + n)
    a = torch.from_numpy(rng.integers(0, 2, (k, m) if transposed else (m, k), dtype=np.int8))
    b = torch.from_numpy(rng.integers(0, 2, (k, n), dtype=np.int8))
    a = a.T if transposed else a
    expected = a.numpy().astype(np.int64) @ b.numpy().astype(np.int64)
    np.testing.assert_array_equal(int8_products(a, b).numpy(), expected)
