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
from tests.saes import encode, write_sae

# Whole jobs and merges at width against brute force: the exactness tier, not the fast one.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def coact_run(tmp_path_factory, tiny_model, corpus_dir):
    """Three hooks and two SAEs on the residual stream (signed abstopk latents, jumprelu latents
    with a threshold): dense pairs, latent x neuron pairs and sparse latent pairs in one job."""
    root = tmp_path_factory.mktemp("coact-run")
    hooks = ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"]
    path = write_job(
        root, "job", tiny_model, corpus_dir, dataset={"max_tokens": 4000}, hooks=hooks, dense=[],
        shard_size=8, batch_size=5, statistics=["coactivation"],
        saes=[{"name": "abs", "path": str(write_sae(root / "abs", d_in=64, d_sae=96, architecture="abstopk", k=8, seed=4))},
              {"name": "jump", "path": str(write_sae(root / "jump", d_in=64, d_sae=128, architecture="jumprelu", seed=1))}],
        thresholds={"blocks.1.hook_resid_post": 0.5, "jump": 0.05},
        coactivation={"stride": 2, "partners": 4, "pairs": "all", "hooks": [*hooks, "abs", "jump"]},
    )
    spec = load_job(path)
    run_job(spec, use_ray=False)
    store = Store.open(spec.store)
    data = store.read_tokens(0, store.n_seq)
    ref = activations(str(tiny_model), spec.hooks, data["tokens"], data["kinds"] != PAD)
    for sae in spec.saes:  # the latents, encoded by the formulas from the plain forward's activations
        ref[sae.name] = encode(sae.path, ref["blocks.1.hook_resid_post"]).astype(np.float32)
    return spec, data, ref


def test_partners_and_statistics_equal_brute_force(coact_run):
    spec, data, ref = coact_run
    counted = np.flatnonzero((data["kinds"] == TEXT).reshape(-1))
    chosen = [i for i in counted if priority(int(i), spec.seed) < 2**32 // spec.coactivation.stride]
    sites = spec.coactivation_hooks()
    xs = [ref[h].reshape(-1, ref[h].shape[-1])[chosen] for h in sites]
    truth = coactivation_brute_force(xs, [spec.threshold(h) for h in sites])
    widths = [x.shape[1] for x in xs]
    offsets = dict(zip(sites, np.cumsum([0, *widths[:-1]])))
    allowed = np.ones((sum(widths), sum(widths)), dtype=bool)
    with connect(spec.store) as catalog:
        rows = catalog.arrow(f"SELECT {', '.join(COACTIVATION_COLUMNS)} FROM coactivation").to_pydict()
    rows = {k: np.asarray(v) for k, v in rows.items()}
    # both rankings, most neurons
    assert check_coactivation(rows, truth, offsets, allowed, spec.coactivation.partners) > sum(widths) * spec.coactivation.partners


@st.composite
def splits(draw):
    """Sites (hooks, then SAE sites kept sparse unless their threshold is negative), their
    activations, which tokens count, and the shard cuts."""
    n_tokens = draw(st.integers(2, 50))
    widths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    latents = draw(st.lists(st.integers(1, 6), max_size=2))
    dense = st.sampled_from([-1.0, 0.0, 0.0, 0.5, 1.0, 3.0, 100.0])
    sparse = st.sampled_from([0.0, 0.0, 0.0, 0.0, -1.0, 0.5, 1.0, 3.0])
    values = [np.asarray(draw(st.lists(kind, min_size=n_tokens * w, max_size=n_tokens * w)), dtype=np.float32).reshape(n_tokens, w)
              for kind, w in [*((dense, w) for w in widths), *((sparse, w) for w in latents)]]
    thresholds = [0.0] * len(widths) + [draw(st.sampled_from([0.0, 0.0, 0.7, -0.5])) for _ in latents]
    counted = np.asarray(draw(st.lists(st.booleans(), min_size=n_tokens, max_size=n_tokens)))
    cuts = sorted(draw(st.lists(st.integers(1, n_tokens - 1), max_size=4, unique=True)))
    pairs = draw(st.sampled_from(["all", "within", "adjacent"]))
    return values, len(widths), thresholds, counted, cuts, draw(st.integers(1, 7)), pairs, draw(st.sampled_from([1, 2]))


@settings(max_examples=15, deadline=None)  # each example writes and merges a real store (1-2 s)
@given(splits())
def test_merge_over_any_split_equals_brute_force(tmp_path_factory, problem):
    """Shard partials written to a real store and merged blockwise equal one brute-force pass,
    for hooks and for SAE sites (sparse pairs, and the dense path of a negative threshold)."""
    merge_and_check(tmp_path_factory.mktemp("coact-merge"), *problem)


def test_sparse_latents_at_width_equal_brute_force(tmp_path, monkeypatch):
    """Two SAE sites 300 and 200 latents wide (5 % dense, signed, one dead latent, one that
    fires at every token) and a hook: sparse pairs of both orientations, rows in sub-blocks of a
    few candidates (``SPARSE_CELLS`` made small), partners beyond the met ones."""
    from actscope.pipeline import coactivation

    monkeypatch.setattr(coactivation, "SPARSE_CELLS", 2000)
    rng = np.random.default_rng(7)
    n = 300
    hook = rng.normal(size=(n, 6)).astype(np.float32)
    a = (rng.random((n, 300)) < 0.05) * rng.exponential(size=(n, 300))
    a[:, 3] = 0.0
    a[:, 4] = 1.0 + rng.random(n)
    b = (rng.random((n, 200)) < 0.05) * rng.normal(size=(n, 200))
    values = [hook, a.astype(np.float32), b.astype(np.float32)]
    merge_and_check(tmp_path, values, 1, [0.0, 0.0, 0.2], rng.random(n) < 0.9, [100, 220], 64, "all", 1, partners=12)


def merge_and_check(root, values, n_hooks, thresholds, counted, cuts, batch_size, pairs, stride, partners=3):
    """Accumulate ``values`` (the hooks' then the SAE sites' activations) shard by shard, write the
    partials to a real store, merge, and check the table against brute force."""
    from actscope.pipeline.coactivation import RunningCoactivation, coactivation_table
    from actscope.pipeline.worker import Batch
    from actscope.storage.store import COACTIVATION as GROUP
    from actscope.storage.store import Store

    hooks = [f"blocks.{i}.mlp.hook_post" for i in range(n_hooks)]
    saes = [{"name": f"sae{k}", "path": "x", "hook": hooks[k % n_hooks]} for k in range(len(values) - n_hooks)]
    sites = hooks + [s["name"] for s in saes]
    widths = {h: v.shape[1] for h, v in zip(sites, values)}
    spec = JobSpec.from_dict({
        "model": "m", "dataset": {"path": "text"}, "hooks": hooks, "store": str(root / "s.zarr"), "statistics": ["coactivation"],
        "context_length": 1, "shard_size": 1, "saes": saes, "thresholds": dict(zip(sites, thresholds)),
        "coactivation": {"pairs": pairs, "partners": partners, "stride": stride, "hooks": sites},
    })
    assert spec.coactivation_hooks() == sites
    bounds = [0, *cuts, len(counted)]
    store = Store.create(spec.store, spec=spec, fingerprint="x", model={"hook_widths": widths})
    store.update_status(n_seq=len(bounds) - 1)  # one "sequence" per shard: only the shard count matters here
    for shard, (a, b) in enumerate(itertools.pairwise(bounds)):
        running = RunningCoactivation(spec, widths, torch.device("cpu"))
        for b0 in range(a, b, batch_size):
            b1 = min(b0 + batch_size, b)
            index = torch.arange(b0, b1)
            running.update({h: torch.from_numpy(v[b0:b1]) for h, v in zip(sites, values)}, Batch(
                first=0, counted=torch.from_numpy(counted[b0:b1]), global_index=index, token_ids=index, docs=index,
                priority=torch.tensor([priority(int(i), spec.seed) for i in index], dtype=torch.int64),
            ))
        store.write_partial(shard, {GROUP: running.result()}, {})
    rows = {k: np.asarray(v) for k, v in coactivation_table(store, spec).to_pydict().items()}
    chosen = [i for i in np.flatnonzero(counted) if priority(int(i), spec.seed) < 2**32 // stride]
    truth = coactivation_brute_force([v[chosen] for v in values], thresholds)
    offsets = dict(zip(sites, np.cumsum([0, *[v.shape[1] for v in values[:-1]]])))
    site = np.concatenate([np.full(v.shape[1], i) for i, v in enumerate(values)])
    allowed = np.zeros((len(site), len(site)), dtype=bool)
    for i, j in site_pairs(sites, pairs):
        allowed[np.ix_(site == i, site == j)] = allowed[np.ix_(site == j, site == i)] = True
    check_coactivation(rows, truth, offsets, allowed, partners)


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


def test_latent_products_gathered_equal_the_sparse_ones():
    """The GPU's way of adding a sparse site's products (active latents gathered into a dense
    block) equals the CPU's sparse product, here on the CPU: counts identical, sums to float32
    rounding."""
    from actscope.pipeline.coactivation import _add_latent_products
    from actscope.pipeline.nonzero import NonZeros

    rng = np.random.default_rng(3)
    latents = torch.from_numpy(((rng.random((70, 200)) < 0.04) * rng.normal(0.5, 1.0, (70, 200))).astype(np.float32))
    dense = torch.from_numpy(rng.normal(size=(70, 9)).astype(np.float32))
    fired = (dense > 0.3).to(torch.int8)
    out = {}
    for gather in (False, True):
        m2, both = torch.zeros(200, 9), torch.zeros(200, 9, dtype=torch.int32)
        for _ in range(2):
            _add_latent_products(m2, both, NonZeros.of(latents, None), 0.2, dense, fired, gather=gather)
        out[gather] = m2, both
    expected = 2 * latents.double().T @ dense.double()
    for gather, (m2, both) in out.items():
        np.testing.assert_allclose(m2.numpy(), expected.numpy(), atol=1e-5, err_msg=str(gather))
        np.testing.assert_array_equal(both.numpy(), 2 * ((latents > 0.2).int().T @ fired.int()).numpy())


def test_the_plan_sizes_latent_pairs_by_the_pairs_that_can_meet():
    """A 24k-latent SAE on GPT-2 small's residual, co-activated with its hook: the latents' pairs
    are bounded by the pairs a group's co-activation tokens can make (68 bytes each; ``L0`` a
    top-k SAE's k, else ``ASSUMED_L0``), not the N x N matrix, unless a negative threshold
    makes the zeros fire (the dense path)."""
    from actscope.pipeline.capacity import ASSUMED_L0, latent_pair_entries, latents_per_token, worker_memory
    from actscope.storage.record import ModelRecord

    hook, n, w = "blocks.8.hook_resid_pre", 24_576, 768
    fields = {"model": "m", "dataset": {"path": "text"}, "hooks": [hook], "store": "s", "saes": [{"name": "sae", "path": "p", "hook": hook}],
              "coactivation": {"hooks": [hook, "sae"], "pairs": "all"}}  # the formulas of all pairs (auto narrows the dense case's)
    spec, widths, tokens = JobSpec.from_dict(fields), {hook: w, "sae": n}, 1 << 18
    parts = worker_memory(spec, widths, 50_257, 0, group_tokens=tokens).parts
    met = (tokens // 32) * ASSUMED_L0 * ASSUMED_L0
    assert latent_pair_entries(spec, widths, tokens) == (met + n) // 2
    assert parts["co-activation of latents"] == 68 * ((met + n) // 2) < 16 * n * n
    assert parts["co-activation"] == 16 * (w * w + w * n) + 16 * w * n
    l0 = latents_per_token(ModelRecord(saes={"sae": {"architecture": "topk", "k": 32}, "other": {"architecture": "jumprelu", "k": None}}))
    assert l0 == {"sae": 32}
    topk = worker_memory(spec, widths, 50_257, 0, group_tokens=tokens, l0=l0).parts
    assert topk["co-activation of latents"] == 68 * (((tokens // 32) * 32 * 32 + n) // 2)
    hook_sums = 8 * w * 50_257  # the hook's dense rows; the SAE's sparse pairs count its k, not ASSUMED_L0
    assert (topk["token sums"] - hook_sums, parts["token sums"] - hook_sums) == (2 * 16 * tokens * 32, 2 * 16 * tokens * ASSUMED_L0)
    dense = worker_memory(JobSpec.from_dict({**fields, "thresholds": {"sae": -1.0}}), widths, 50_257, 0, group_tokens=tokens).parts
    assert "co-activation of latents" not in dense and dense["co-activation"] == 16 * (w * w + w * n + n * n) + 16 * n * n


def test_a_group_redone_after_the_merge_gives_the_same_bits(coact_run, tmp_path):
    """After the reduce has merged co-activation (and dropped the groups' copies), a group redone
    (as a damaged partial is) ranks partners again from the merged co-moments: every
    co-activation value equals the first run's, bit for bit."""
    import shutil

    import pyarrow.parquet as pq
    import yaml

    spec = coact_run[0]
    copy = tmp_path / "copy.zarr"
    shutil.copytree(spec.store, copy)
    job = tmp_path / "copy.yaml"
    job.write_text(yaml.safe_dump({**spec.to_dict(), "store": str(copy)}))
    Store.open(str(copy), writable=True).uncommit(0)
    summary = run_job(load_job(job), use_ray=False)
    assert summary.shards_run > 0
    first = pq.read_table(Store.open(spec.store).table_url("coactivation")).to_pandas()
    again = pq.read_table(Store.open(str(copy)).table_url("coactivation")).to_pandas()
    assert list(again.columns) == list(first.columns) and len(again) == len(first)
    for name in first.columns:  # NaN where a neuron has no variance, in both
        a, b = first[name].to_numpy(), again[name].to_numpy()
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
