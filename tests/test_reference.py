"""The pipeline's results against ground truth computed directly with ``transformers`` + numpy."""

from __future__ import annotations

import numpy as np
import pytest

from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.queries import connect
from actscope.storage.store import PAD, TEXT, Store
from tests.conftest import write_job
from tests.reference import activations, assert_same_top_k, brute_top_k
from tests.saes import encode, write_sae

# Whole jobs against brute force: the exactness tier, not the fast one.
pytestmark = pytest.mark.slow


def _top_from_tables(store_url: str, hook: str, width: int, k: int, ctx: int):
    """The top_examples table as [k, width] arrays of values and token indices."""
    with connect(store_url) as catalog:
        rows = catalog.sql(
            "SELECT neuron, rank, activation, seq_id * ? + pos FROM top_examples WHERE hook = ? ORDER BY neuron, rank",
            [ctx, hook],
        ).rows
    values = np.full((k, width), np.nan, dtype=np.float32)
    index = np.full((k, width), -1, dtype=np.int64)
    for neuron, rank, value, token in rows:
        values[rank - 1, neuron], index[rank - 1, neuron] = value, token
    return values, index


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("gpt2-run")
    path = write_job(
        root, "job", tiny_model, corpus_dir,
        dataset={"max_tokens": 5000},
        hooks=["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post", "blocks.1.mlp.hook_post"],
        dense=["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"],
        top_k=6, shard_size=8,
        batch_size=5,  # batches never cross a shard, and need not divide it
        # SAE latents are units like neurons: every check below covers them too.
        saes=[{"name": "res-jumprelu", "path": str(write_sae(root / "jumprelu", d_in=64, d_sae=128, architecture="jumprelu", seed=1))},
              {"name": "mlp-topk", "hook": "blocks.0.mlp.hook_post",
               "path": str(write_sae(root / "sparsify", d_in=256, d_sae=192, layout="sparsify", k=12, seed=2))},
              {"name": "res-abstopk", "path": str(write_sae(root / "abstopk", d_in=64, d_sae=96, architecture="abstopk", k=8, seed=4))}],
    )
    spec = load_job(path)
    run_job(spec, use_ray=False)
    store = Store.open(spec.store)
    data = store.read_tokens(0, store.n_seq)
    ref = activations(str(tiny_model), spec.hooks, data["tokens"], data["kinds"] != PAD)
    for sae in spec.saes:  # the latents, encoded by the formulas from the plain forward's activations
        hook = sae.hook or "blocks.1.hook_resid_post"
        ref[sae.name] = encode(sae.path, ref[hook]).astype(np.float32)
    return spec, store, data, ref


def test_top_k_of_every_neuron_equals_brute_force(gpt2_run):
    spec, store, data, ref = gpt2_run
    counted = data["kinds"] == TEXT
    for hook in spec.sites:
        width = store.model.hook_widths[hook]
        values, index = _top_from_tables(spec.store, hook, width, spec.top_k, spec.context_length)
        ref_values, _ = brute_top_k(ref[hook], counted, spec.top_k)
        assert_same_top_k(values, index, ref[hook], ref_values)


def test_special_tokens_and_padding_are_never_examples(gpt2_run):
    spec, _store, data, _ = gpt2_run
    with connect(spec.store) as catalog:
        kinds = catalog.sql(
            "SELECT DISTINCT t.kind FROM top_examples e JOIN tokens t USING (seq_id, pos)"
        ).rows
    assert kinds == [("text",)]
    assert (data["kinds"] == PAD).any(), "the corpus should end in a padded sequence"


def test_dense_arrays_equal_a_direct_forward_pass(gpt2_run):
    spec, store, data, ref = gpt2_run
    real = data["kinds"] != PAD
    for hook in spec.dense:
        dense = store.dense(hook)[...].astype(np.float32)
        assert dense.shape == ref[hook].shape
        np.testing.assert_allclose(dense[real], ref[hook][real], atol=2e-3, rtol=1e-3)  # fp16 storage


def test_top_values_are_the_dense_values_at_their_tokens(gpt2_run):
    spec, store, _data, _ = gpt2_run
    hook = spec.dense[0]
    width = store.model.hook_widths[hook]
    values, index = _top_from_tables(spec.store, hook, width, spec.top_k, spec.context_length)
    dense = store.dense(hook)[...].reshape(-1, width)
    np.testing.assert_allclose(np.take_along_axis(dense, index, 0), values.astype(np.float16), rtol=0, atol=0)


def test_encoder_model_with_cls_sep_framing(tmp_path, minilm, corpus_dir, make_job):
    """A real pretrained BERT encoder: [CLS] ... [SEP] framing, attention mask on padding."""
    path = make_job(model=minilm, hooks=["blocks.1.mlp.hook_post"], dense=[], dataset={"max_tokens": 700}, top_k=4)
    spec = load_job(path)
    run_job(spec, use_ray=False)
    store = Store.open(spec.store)
    data = store.read_tokens(0, store.n_seq)
    assert (data["tokens"][:, 0] == 101).all()  # [CLS]
    assert (data["kinds"] == PAD).any()
    ref = activations(minilm, spec.hooks, data["tokens"], data["kinds"] != PAD)
    hook = spec.hooks[0]
    values, index = _top_from_tables(spec.store, hook, 1536, spec.top_k, spec.context_length)
    ref_values, _ = brute_top_k(ref[hook], data["kinds"] == TEXT, spec.top_k)
    assert_same_top_k(values, index, ref[hook], ref_values, tol=1e-4)


def _table(store_url: str, table: str, hook: str) -> dict:
    with connect(store_url) as catalog:
        result = catalog.sql(f"SELECT * FROM {table} WHERE hook = ? ORDER BY neuron", [hook])
    return {c: np.array([r[i] for r in result.rows]) for i, c in enumerate(result.columns)}


def test_bottom_k_of_every_neuron_equals_brute_force(gpt2_run):
    spec, store, data, ref = gpt2_run
    counted = data["kinds"] == TEXT
    for hook in spec.sites:
        width = store.model.hook_widths[hook]
        with connect(spec.store) as catalog:
            rows = catalog.sql(
                "SELECT neuron, rank, activation, seq_id * ? + pos FROM bottom_examples WHERE hook = ?",
                [spec.context_length, hook],
            ).rows
        values = np.full((spec.top_k, width), np.nan, dtype=np.float32)
        index = np.full((spec.top_k, width), -1, dtype=np.int64)
        for neuron, rank, value, token in rows:
            values[rank - 1, neuron], index[rank - 1, neuron] = value, token
        ref_values, _ = brute_top_k(ref[hook], counted, spec.top_k, largest=False)
        assert_same_top_k(values, index, ref[hook], ref_values)


def test_neuron_stats_equal_numpy(gpt2_run):
    from scipy import stats as sps

    spec, _store, data, ref = gpt2_run
    counted = (data["kinds"] == TEXT).reshape(-1)
    for hook in spec.sites:
        x = ref[hook].reshape(-1, ref[hook].shape[-1])[counted].astype(np.float64)
        got = _table(spec.store, "neuron_stats", hook)
        assert (got["count"] == counted.sum()).all()
        np.testing.assert_allclose(got["mean"], x.mean(0), atol=1e-6)
        np.testing.assert_allclose(got["std"], x.std(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(got["min"], x.min(0), atol=1e-5)
        np.testing.assert_allclose(got["max"], x.max(0), atol=1e-5)
        np.testing.assert_allclose(got["skew"], sps.skew(x, axis=0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got["kurtosis"], sps.kurtosis(x, axis=0), rtol=1e-4, atol=1e-4)
        active = (x > 0).mean(0)
        # An activation within float noise of the threshold may fall either side.
        near = (np.abs(x) < 1e-5).sum(0) / len(x)
        assert (np.abs(got["frac_active"] - active) <= near + 1e-12).all()


def test_dead_neurons_and_thresholds(make_job):
    """A threshold above every activation makes every neuron dead; SQL finds them."""
    spec = load_job(make_job("dead", hooks=["blocks.0.mlp.hook_post"], dense=[], thresholds={"blocks.0.mlp.hook_post": 1e9}))
    run_job(spec, use_ray=False)
    with connect(spec.store) as catalog:
        dead = catalog.sql("SELECT count(*) FROM neuron_stats WHERE frac_active = 0").rows[0][0]
    assert dead == 256


def test_histograms_and_quantiles_equal_numpy(gpt2_run):
    from actscope.storage.bins import ZERO, _magnitude_edges

    spec, _store, data, ref = gpt2_run
    counted = (data["kinds"] == TEXT).reshape(-1)
    mag = _magnitude_edges()
    for hook in spec.sites:
        x = ref[hook].reshape(-1, ref[hook].shape[-1])[counted]
        # Independent binning: search the edges (the pipeline reads float bits).
        m = np.clip(np.searchsorted(mag, np.abs(x), side="right") - 1, 0, len(mag) - 2)
        expected_bin = np.where(np.abs(x) < mag[0], ZERO, np.where(x > 0, ZERO + 1 + m, ZERO - 1 - m))
        with connect(spec.store) as catalog:
            rows = catalog.sql("SELECT neuron, bin, count FROM histograms WHERE hook = ?", [hook]).rows
        got = np.zeros((x.shape[1], 2 * ZERO + 1), dtype=np.int64)
        for neuron, b, count in rows:
            got[neuron, b] = count
        expected = np.zeros_like(got)
        np.add.at(expected, (np.broadcast_to(np.arange(x.shape[1]), x.shape), expected_bin), 1)
        assert (got.sum(1) == len(x)).all()
        # Two exact computations may differ by float noise only for values at a bin edge.
        a = np.abs(x)
        i = np.clip(np.searchsorted(mag, a), 1, len(mag) - 1)
        gap = np.minimum(np.abs(a - mag[i - 1]), np.abs(mag[i] - a))  # to the nearest bin edge
        near_edge = (gap < 1e-5 * np.maximum(a, 1e-3)).sum()
        assert np.abs(got - expected).sum() <= 2 * near_edge
        stats = _table(spec.store, "neuron_stats", hook)
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            truth = np.quantile(x, q, axis=0)
            # Within one bin: the bin's width at the true quantile (12.5 % of it, or the zero bin).
            width = np.maximum(np.abs(truth) * 0.125, 2 * mag[0]) + 1e-6
            assert (np.abs(stats[name] - truth) <= width).all(), name


def test_sae_l0_and_variance_explained_equal_numpy(gpt2_run):
    """Each SAE's L0 and FVU, measured on the first batch of every group, against the latents
    and the decoder applied in numpy to the same tokens."""
    from safetensors.numpy import load_file

    spec, store, data, ref = gpt2_run
    quality = store.sae_quality()
    for sae in spec.saes:
        info = store.model.saes[sae.name]
        name = "sae.safetensors" if info["layout"] == "sparsify" else "sae_weights.safetensors"
        w = {k: v.astype(np.float64) for k, v in load_file(f"{sae.path}/{name}").items()}
        active = tokens = sse = sst = 0.0
        for group in range(store.n_groups):
            first, last = store.group_range(group)
            seqs = slice(first, min(first + spec.batch_size, first + spec.shard_size, last))
            counted = (data["kinds"][seqs] == TEXT).reshape(-1)
            x = ref[info["hook"]][seqs].reshape(-1, info["d_in"])[counted].astype(np.float64)
            latents = ref[sae.name][seqs].reshape(-1, info["d_sae"])[counted].astype(np.float64)
            error = latents @ w["W_dec"] + w["b_dec"] - x
            active, tokens = active + (latents != 0).sum(), tokens + len(x)
            sse, sst = sse + (error**2).sum(), sst + ((x - x.mean(0)) ** 2).sum()
        got = quality[sae.name]
        assert got["groups"] == store.n_groups and got["tokens"] == tokens
        assert got["l0"] == pytest.approx(active / tokens, rel=1e-9)
        assert got["fvu"] == pytest.approx(sse / sst, rel=1e-4)
        assert 0 < got["fvu"]  # random SAEs reconstruct badly, but they do reconstruct
