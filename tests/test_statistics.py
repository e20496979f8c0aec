"""Samples, token statistics, logit effects and per-document examples against ground truth:
a plain ``transformers`` forward (or the model's weights) and brute force in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.queries import connect
from actscope.storage.store import PAD, TEXT, Store
from tests.conftest import write_job
from tests.reference import activations, band, priority
from tests.saes import encode, write_sae

# Whole jobs against brute force: the exactness tier, not the fast one.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("stats-run")
    path = write_job(
        root, "job", tiny_model, corpus_dir,
        dataset={"max_tokens": 4000},
        hooks=["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"], dense=[],
        top_k=5, shard_size=8, batch_size=5, samples_per_band=3, random_samples=7, seed=11,
        top_tokens=4, min_token_count=3, top_logits=5, band_sample_rate=0.5,
        saes=[{"name": "res-gated", "fold_w_dec_norm": True,
               "path": str(write_sae(root / "gated", d_in=64, d_sae=48, architecture="gated", seed=5))},
              {"name": "tc", "hook": "blocks.0.mlp.hook_post",
               "path": str(write_sae(root / "tc", d_in=256, d_sae=40, architecture="jumprelu_skip_transcoder", d_out=64,
                                     hook_out="blocks.0.hook_mlp_out", skip=True, seed=6))}],
    )
    spec = load_job(path)
    run_job(spec, use_ray=False)
    store = Store.open(spec.store)
    data = store.read_tokens(0, store.n_seq, ("tokens", "kinds", "doc_ids"))
    ref = activations(str(tiny_model), spec.hooks, data["tokens"], data["kinds"] != PAD)
    ref["res-gated"] = encode(spec.saes[0].path, ref["blocks.1.hook_resid_post"], fold=True).astype(np.float32)
    ref["tc"] = encode(spec.saes[1].path, ref["blocks.0.mlp.hook_post"]).astype(np.float32)
    return spec, data, ref


def _rows(store_url: str, sql: str, *params) -> list[tuple]:
    with connect(store_url) as catalog:
        return catalog.sql(sql, list(params)).rows


def test_band_samples_are_the_lowest_priority_tokens_of_each_band(run):
    spec, data, ref = run
    ctx = spec.context_length
    counted = np.flatnonzero((data["kinds"] == TEXT).reshape(-1))
    prio = {int(i): priority(int(i), spec.seed) for i in counted}
    counted = [i for i in counted if prio[int(i)] < spec.band_sample_rate * 2**32]  # the eligible tokens
    for hook in spec.sites:
        x = ref[hook].reshape(-1, ref[hook].shape[-1])
        got = {}
        for neuron, b, rank, value, token in _rows(
            spec.store, "SELECT neuron, band, rank, activation, seq_id * ? + pos FROM band_samples WHERE hook = ?", ctx, hook
        ):
            got.setdefault((neuron, b), []).append((rank, token))
            assert abs(x[token, neuron] - value) < 1e-5
        expected, near_edge = {}, 0
        for neuron in range(x.shape[1]):
            cells = {}
            for i in counted:
                v = float(x[i, neuron])
                near_edge += v != 0 and abs(np.log2(abs(v)) - round(np.log2(abs(v)))) < 1e-5
                if (b := band(v)) >= 0:
                    cells.setdefault(b, []).append(int(i))
            for b, tokens in cells.items():
                expected[(neuron, b)] = sorted(tokens, key=lambda i: prio[i])[: spec.samples_per_band]
        got = {cell: [t for _, t in sorted(v)] for cell, v in got.items()}
        wrong = sum(got.get(c) != e for c, e in expected.items()) + len(set(got) - set(expected))
        assert wrong <= 2 * near_edge  # a value within float noise of a band edge may go either way
        assert len(expected) > (2 * x.shape[1] if hook in spec.hooks else 4)  # several bands per neuron (latents are sparse)
        assert len(got) > (2 * x.shape[1] if hook in spec.hooks else 4)


def test_random_samples_are_the_lowest_priority_tokens(run):
    spec, data, ref = run
    ctx = spec.context_length
    counted = np.flatnonzero((data["kinds"] == TEXT).reshape(-1))
    chosen = sorted(counted.tolist(), key=lambda i: priority(i, spec.seed))[: spec.random_samples]
    for hook in spec.sites:
        x = ref[hook].reshape(-1, ref[hook].shape[-1])
        rows = _rows(spec.store, "SELECT neuron, rank, activation, seq_id * ? + pos FROM random_samples WHERE hook = ? ORDER BY neuron, rank", ctx, hook)
        assert len(rows) == x.shape[1] * spec.random_samples
        for neuron, rank, value, token in rows:
            assert token == chosen[rank - 1]
            assert abs(x[token, neuron] - value) < 1e-5


def test_token_stats_equal_brute_force_means(run):
    _check_token_stats(*run)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model, corpus_dir):
    """Token sums of the 40 most frequent tokens of the first group only, over 5 groups."""
    root = tmp_path_factory.mktemp("tracked-run")
    path = write_job(root, "job", tiny_model, corpus_dir, dataset={"max_tokens": 4000}, hooks=["blocks.0.mlp.hook_post"], dense=[],
                     shard_size=8, group_shards=2, top_tokens=4, min_token_count=3, tracked_tokens=40, statistics=["tokens"])
    spec = load_job(path)
    run_job(spec, use_ray=False)
    store = Store.open(spec.store)
    data = store.read_tokens(0, store.n_seq, ("tokens", "kinds", "doc_ids"))
    return spec, data, activations(str(tiny_model), spec.hooks, data["tokens"], data["kinds"] != PAD)


def test_tracked_token_stats_are_exact_over_the_first_groups_most_frequent_tokens(tracked_run):
    """``tracked_tokens: N``: each neuron's token means are exact over the N most frequent counted
    tokens of the first group (ties by lower id), and no other token ranks; a worker whose first
    group is another one reads the same tokens (its group's partials are the same bytes); the
    plan says which form it chose."""
    from actscope.jobs.runner import dry_run
    from actscope.pipeline.worker import ShardWorker

    spec, data, ref = tracked_run
    store = Store.open(spec.store, writable=True)
    assert store.n_groups >= 3 and store.model.tracked_tokens == 40
    first = data["tokens"][: 2 * spec.shard_size][data["kinds"][: 2 * spec.shard_size] == TEXT]
    ids, counts = np.unique(first, return_counts=True)
    tracked = np.sort(ids[np.lexsort((ids, -counts))][:40])
    assert len(np.unique(data["tokens"][data["kinds"] == TEXT])) > 2 * len(tracked)  # most tokens are left out
    _check_token_stats(spec, data, ref, tracked)
    hook = spec.hooks[0]
    before = store.read_partial(2, hook)
    store.uncommit(2)
    ShardWorker(spec.store)(2)
    after = store.read_partial(2, hook)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert any("the 40 most frequent tokens of the first group" in line for line in dry_run(spec, use_ray=False))


def _check_token_stats(spec, data, ref, tracked: np.ndarray | None = None):
    """The token_stats table against brute-force means over the counted tokens (those in
    ``tracked`` only, where given)."""
    counted = (data["kinds"] == TEXT).reshape(-1)
    ids = data["tokens"].reshape(-1)[counted]
    for hook in spec.sites:
        x = ref[hook].reshape(-1, ref[hook].shape[-1])[counted].astype(np.float64)
        vocab = np.unique(ids) if tracked is None else tracked
        counts = np.array([(ids == t).sum() for t in vocab])
        means = np.stack([x[ids == t].mean(0) for t in vocab])  # [tokens, width]
        eligible = (counts >= spec.min_token_count)[:, None].repeat(x.shape[1], 1)
        if spec.sae(hook):  # a latent ranks only the tokens at which it fired
            eligible &= np.stack([(x[ids == t] != 0).any(0) for t in vocab])
        rows = _rows(spec.store, "SELECT neuron, rank, token_id, mean_activation, count FROM token_stats WHERE hook = ? ORDER BY neuron, rank", hook)
        assert len(rows) == np.minimum(eligible.sum(0), spec.top_tokens).sum()
        assert spec.sae(hook) is None or len(rows) < x.shape[1] * spec.top_tokens  # the test covers latents that fire rarely
        for neuron, rank, token, mean, count in rows:
            j = np.searchsorted(vocab, token)
            assert vocab[j] == token and counts[j] == count and eligible[j, neuron]
            assert abs(means[j, neuron] - mean) < 1e-5
            truth = np.sort(means[eligible[:, neuron], neuron])[::-1][rank - 1]
            assert abs(truth - mean) < 1e-5  # the rank-th best mean, whichever token ties


def test_logit_effects_equal_the_weights(run, tiny_model):
    from safetensors.numpy import load_file
    from transformers import GPT2LMHeadModel

    spec, _, _ = run
    model = GPT2LMHeadModel.from_pretrained(tiny_model)
    gamma = model.transformer.ln_f.weight.detach().double()
    w_u = model.lm_head.weight.detach().double().T  # [d_model, vocab]
    sites = {
        "blocks.0.mlp.hook_post": model.transformer.h[0].mlp.c_proj.weight.detach().double(),  # Conv1D: [d_mlp, d_model]
        "blocks.1.hook_resid_post": torch.eye(model.config.n_embd, dtype=torch.float64),
        # A transcoder's latent writes its decoder row into its output hook (here the MLP's output).
        "tc": torch.from_numpy(load_file(f"{spec.saes[1].path}/sae_weights.safetensors")["W_dec"]).double(),
    }
    for hook, direction in sites.items():
        centred = direction - direction.mean(1, keepdim=True)
        effect = ((centred * gamma) @ w_u).numpy()
        rows = _rows(spec.store, "SELECT neuron, direction, rank, token_id, effect FROM logit_effects WHERE hook = ?", hook)
        assert len(rows) == 2 * spec.top_logits * effect.shape[0]
        for neuron, side, rank, token, value in rows:
            order = np.argsort(-effect[neuron] if side == "promote" else effect[neuron])
            assert token == order[rank - 1]
            assert abs(effect[neuron, token] - value) < 1e-4


def test_no_logit_effects_without_a_causal_lm_head(make_job, minilm):
    spec = load_job(make_job(model=minilm, hooks=["blocks.0.mlp.hook_post"], dense=[], dataset={"max_tokens": 300}, top_k=2))
    run_job(spec, use_ray=False)
    assert _rows(spec.store, "SELECT count(*) FROM logit_effects") == [(0,)]


def test_one_example_per_document(make_job, tiny_model):
    spec = load_job(make_job("perdoc", examples="document", top_k=4, shard_size=4, batch_size=3, dense=[], statistics=["bottom"], dataset={"max_tokens": 3000}))
    run_job(spec, use_ray=False)
    store = Store.open(spec.store)
    data = store.read_tokens(0, store.n_seq, ("tokens", "kinds", "doc_ids"))
    ref = activations(str(tiny_model), spec.hooks, data["tokens"], data["kinds"] != PAD)
    counted = (data["kinds"] == TEXT).reshape(-1)
    docs = data["doc_ids"].reshape(-1)
    for table, sign in (("top_examples", 1), ("bottom_examples", -1)):
        for hook in spec.hooks:
            x = ref[hook].reshape(-1, ref[hook].shape[-1])
            rows = _rows(spec.store, f"SELECT e.neuron, e.rank, e.activation, t.doc_id FROM {table} e JOIN tokens t USING (seq_id, pos) WHERE hook = ? ORDER BY neuron, rank", hook)
            per_neuron = {}
            for neuron, rank, value, doc in rows:
                per_neuron.setdefault(neuron, []).append((value, doc))
            for neuron in range(x.shape[1]):
                best = {}
                for i in np.flatnonzero(counted):
                    best[docs[i]] = max(best.get(docs[i], -np.inf), sign * x[i, neuron])
                truth = sorted(best.values(), reverse=True)[: spec.top_k]
                got = per_neuron[neuron]
                assert len({d for _, d in got}) == len(got)  # one example per document
                np.testing.assert_allclose([sign * v for v, _ in got], truth, atol=1e-5)
                for value, doc in got:
                    assert abs(best[doc] - sign * value) < 1e-5  # the document's best token


def test_statistics_can_be_switched_off(make_job):
    spec = load_job(make_job("lean", statistics=[], dense=[]))
    run_job(spec, use_ray=False)
    for table in ("bottom_examples", "histograms", "band_samples", "random_samples", "token_stats", "logit_effects"):
        assert _rows(spec.store, f"SELECT count(*) FROM {table}") == [(0,)], table
    assert _rows(spec.store, "SELECT count(*) > 0, bool_and(p50 IS NULL) FROM neuron_stats") == [(True, True)]


def test_a_transcoders_variance_explained_is_of_its_output_hook(run):
    """A transcoder's reconstruction predicts its output hook (recorded here): ``latents W_dec +
    b_dec + x W_skip^T`` against that hook's activations, on the first batch of every group."""
    from safetensors.numpy import load_file

    spec, data, ref = run
    store = Store.open(spec.store)
    w = {k: v.astype(np.float64) for k, v in load_file(f"{spec.saes[1].path}/sae_weights.safetensors").items()}
    sse = sst = 0.0
    for group in range(store.n_groups):
        first, last = store.group_range(group)
        seqs = slice(first, min(first + spec.batch_size, first + spec.shard_size, last))
        counted = (data["kinds"][seqs] == TEXT).reshape(-1)
        x, y, latents = (ref[hook][seqs].reshape(-1, width)[counted].astype(np.float64)
                         for hook, width in (("blocks.0.mlp.hook_post", 256), ("blocks.0.hook_mlp_out", 64), ("tc", 40)))
        error = latents @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T - y
        sse, sst = sse + (error**2).sum(), sst + ((y - y.mean(0)) ** 2).sum()
    assert store.sae_quality()["tc"]["fvu"] == pytest.approx(sse / sst, rel=1e-4)
