"""SAE latents as units: every format and architecture encodes as SAELens's and Sparsify's formulas
say (against an independent numpy encoder), a planted SAE's latents are the hook's halves, bad SAE
entries are refused by name, and queries, reports and exports address a latent like a neuron.
The statistics of latents are checked against brute force where the neurons' are
(``test_reference.py``, ``test_statistics.py``), whose jobs carry SAEs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import actscope
from actscope.jobs.cli import app
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.pipeline.nonzero import NonZeros
from actscope.pipeline.sae import Encoder, read_config
from actscope.storage.errors import JobSpecError
from actscope.storage.spec import SAESpec
from actscope.storage.store import PAD, TEXT, Store
from tests.reference import activations, brute_top_k
from tests.saes import encode, write_sae

CASES = [  # (layout, architecture, extra)
    ("saelens6", "standard", {}),
    ("saelens6", "jumprelu", {}),
    ("saelens6", "jumprelu", {"log_threshold": True}),
    ("saelens6", "gated", {}),
    ("saelens6", "topk", {"k": 7}),
    ("saelens6", "standard", {"normalize": "constant_norm_rescale"}),
    ("saelens6", "standard", {"normalize": "layer_norm"}),
    ("saelens6", "standard", {"apply_b_dec_to_input": False}),
    ("saelens5", "standard", {}),
    ("saelens5", "topk", {"k": 5}),
    ("saelens5", "standard", {"normalize": "expected_average_only_in"}),
    ("sparsify", "topk", {"k": 9}),
    ("saelens6", "abstopk", {"k": 6}),
    ("saelens6", "transcoder", {"d_out": 24, "hook_out": "blocks.1.hook_mlp_out"}),
    ("saelens6", "skip_transcoder", {"d_out": 24, "skip": True}),
    ("saelens6", "jumprelu_transcoder", {"d_out": 24}),
    ("saelens6", "jumprelu_skip_transcoder", {"d_out": 24, "skip": True, "normalize": "layer_norm"}),
    ("sparsify", "topk", {"k": 9, "d_out": 24, "skip": True}),
]


@pytest.mark.parametrize(("layout", "architecture", "extra"), CASES, ids=lambda c: str(c))
def test_encoders_follow_the_formulas(tmp_path, layout, architecture, extra):
    folder = write_sae(tmp_path / "sae", d_in=16, d_sae=48, architecture=architecture, layout=layout, seed=3, **extra)
    scaling = 1.7 if extra.get("normalize") == "expected_average_only_in" else None
    entry = SAESpec(name="s", path=str(folder), hook="blocks.1.hook_resid_post", scaling_factor=scaling)
    info = read_config(entry)
    assert (info.architecture, info.d_in, info.d_sae) == (architecture, 16, 48)
    assert (info.transcoder, info.d_out, info.skip) == ("d_out" in extra, extra.get("d_out", 16), extra.get("skip", False))
    assert info.hook_out == extra.get("hook_out")
    x = np.random.default_rng(1).normal(0, 1, (300, 16)).astype(np.float32)
    got = Encoder(info, torch.device("cpu")).encode(torch.from_numpy(x)).numpy()
    ref = encode(folder, x, scaling_factor=scaling)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert 0.02 < (ref != 0).mean() < 0.9  # the SAE is neither dead nor dense on this input
    if architecture == "abstopk":
        assert (ref < 0).any() and ((ref != 0).sum(-1) == extra["k"]).all()  # signed, k a token
    latents, handed = Encoder(info, torch.device("cpu")).encode_with_nonzeros(torch.from_numpy(x))
    if info.encoder in ("topk", "abstopk"):  # the entries it chose, handed over, are those a scan finds
        scanned = NonZeros.of(latents, None)
        for field in ("rows", "units", "values"):
            torch.testing.assert_close(getattr(handed, field), getattr(scanned, field), rtol=0, atol=0)
        assert (handed.n, handed.width) == (scanned.n, scanned.width)
    else:
        assert handed is None
    if info.encoder in ("standard", "jumprelu", "gated"):
        folded = Encoder(read_config(entry.model_copy(update={"fold_w_dec_norm": True})), torch.device("cpu"))
        np.testing.assert_allclose(folded.encode(torch.from_numpy(x)).numpy(), encode(folder, x, fold=True, scaling_factor=scaling), atol=1e-4)


def test_sae_entries_that_cannot_work_are_refused_by_name(tmp_path):
    good = write_sae(tmp_path / "good", d_in=16, d_sae=32)
    cases = []
    (tmp_path / "empty").mkdir()
    cases.append((SAESpec(name="a", path=str(tmp_path / "empty")), "no cfg.json"))
    cases.append((SAESpec(name="a", path=str(tmp_path / "missing")), "not a folder"))
    temporal = write_sae(tmp_path / "temporal", d_in=16, d_sae=32)
    cfg = json.loads((temporal / "cfg.json").read_text())
    (temporal / "cfg.json").write_text(json.dumps({**cfg, "architecture": "temporal"}))
    cases.append((SAESpec(name="a", path=str(temporal)), "temporal SAEs read more than one token"))
    odd = write_sae(tmp_path / "odd", d_in=16, d_sae=32)
    (odd / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matching_pursuit"}))
    cases.append((SAESpec(name="a", path=str(odd)), "not supported; supported: standard, jumprelu, gated, topk"))
    scaled = write_sae(tmp_path / "scaled", d_in=16, d_sae=32, layout="saelens5", normalize="expected_average_only_in")
    cases.append((SAESpec(name="a", path=str(scaled)), "give it as scaling_factor"))
    sparse = write_sae(tmp_path / "sparse", d_in=16, d_sae=32, layout="sparsify", k=4)
    cases.append((SAESpec(name="a", path=str(sparse)), "give the TransformerLens hook as hook:"))
    topk = write_sae(tmp_path / "topk", d_in=16, d_sae=32, architecture="topk", k=4)
    cases.append((SAESpec(name="a", path=str(topk), fold_w_dec_norm=True), "fold_w_dec_norm would change"))
    cases.append((SAESpec(name="a", path=str(good), hook_out="blocks.1.hook_mlp_out"), "hook_out names a transcoder's output hook"))
    clt = write_sae(tmp_path / "clt", d_in=16, d_sae=32)
    (clt / "cfg.json").write_text(json.dumps({**cfg, "architecture": "clt"}))
    cases.append((SAESpec(name="a", path=str(clt)), "cross-layer transcoders"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "cfg.json").write_text("{not json")
    (tmp_path / "junk" / "sae_weights.safetensors").write_bytes(b"\x00" * 64)
    cases.append((SAESpec(name="a", path=str(tmp_path / "junk")), "cfg.json is not JSON"))
    deep = write_sae(tmp_path / "deep", d_in=16, d_sae=32)
    (deep / "cfg.json").write_text("[" * 200_000 + "]" * 200_000)
    cases.append((SAESpec(name="a", path=str(deep)), "nested too deeply"))
    boolean = write_sae(tmp_path / "bool-k", d_in=16, d_sae=32, architecture="topk", k=4)
    (boolean / "cfg.json").write_text((boolean / "cfg.json").read_text().replace('"k": 4', '"k": true'))
    cases.append((SAESpec(name="a", path=str(boolean)), "needs k, a whole number"))
    rng = np.random.default_rng(0)
    w = {"W_enc": rng.normal(size=(16, 32)).astype(np.float32), "b_enc": np.zeros(32, np.float32),
         "W_dec": rng.normal(size=(32, 16)).astype(np.float32), "b_dec": np.zeros(16, np.float32)}
    damaged = {
        "nan": ({"W_enc": np.where(np.eye(16, 32) > 0, np.nan, w["W_enc"]).astype(np.float32)}, "W_enc holds NaN or infinite"),
        "inf-threshold": ({"threshold": np.full(32, np.inf, np.float32)}, "threshold holds NaN or infinite"),
        "flat": ({"W_enc": w["W_enc"].ravel()}, "W_enc has shape (512,); expected a matrix"),
        "cube": ({"W_enc": w["W_enc"][None]}, "W_enc has shape (1, 16, 32); expected a matrix"),
        "no-latents": ({"W_enc": np.zeros((16, 0), np.float32)}, "expected a matrix with both sides at least 1"),
        "short-bias": ({"b_enc": np.zeros(31, np.float32)}, "b_enc has shape (31,); expected (32,)"),
        "threshold-2d": ({"threshold": np.zeros((32, 1), np.float32)}, "threshold has shape (32, 1); expected (32,)"),
    }
    for name, (changes, message) in damaged.items():
        architecture = "jumprelu" if "threshold" in name else "standard"
        extra = {"threshold": np.zeros(32, np.float32)} if architecture == "jumprelu" else {}
        folder = write_sae(tmp_path / name, d_in=16, d_sae=32, architecture=architecture, weights={**w, **extra, **changes})
        cases.append((SAESpec(name="a", path=str(folder)), message))
    for entry, message in cases:
        with pytest.raises(JobSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
            read_config(entry)
    assert read_config(SAESpec(name="a", path=str(good))).hook == "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def planted(tmp_path_factory, tiny_model, corpus_dir):
    """An SAE whose latents are the hook's positive and negative parts, [relu(x), relu(-x)]:
    every latent's statistics follow from the neuron's by hand."""
    from tests.conftest import write_job

    root = tmp_path_factory.mktemp("planted")
    eye = np.eye(64, dtype=np.float32)
    weights = {"W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(128, np.float32),
               "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(64, np.float32)}
    folder = write_sae(root / "halves", d_in=64, d_sae=128, weights=weights)
    hook = "blocks.1.hook_resid_post"
    path = write_job(root, "job", tiny_model, corpus_dir, dataset={"max_tokens": 1500}, hooks=[hook], dense=["halves"],
                     top_k=5, saes=[{"name": "halves", "path": str(folder)}], coactivation={"hooks": [hook, "halves"]})
    spec = load_job(path)
    run_job(spec, use_ray=False)
    return spec


def test_a_planted_sae_gives_the_hooks_halves(planted, tiny_model):
    spec = planted
    hook = "blocks.1.hook_resid_post"
    store = Store.open(spec.store)
    data = store.read_tokens(0, store.n_seq)
    x = activations(str(tiny_model), [hook], data["tokens"], data["kinds"] != PAD)[hook]
    counted = data["kinds"] == TEXT
    assert store.model.hook_widths["halves"] == 128
    assert store.model.saes["halves"]["architecture"] == "standard"
    with actscope.connect(spec.store) as c:
        top = c.sql("SELECT neuron, rank, activation FROM top_examples WHERE hook = 'halves' ORDER BY neuron, rank").rows
        neuron_top = c.sql(f"SELECT neuron, rank, activation FROM top_examples WHERE hook = '{hook}' ORDER BY neuron, rank").rows
        neuron_bottom = c.sql(f"SELECT neuron, rank, activation FROM bottom_examples WHERE hook = '{hook}' ORDER BY neuron, rank").rows
        stats = dict(c.sql("SELECT neuron, frac_active FROM neuron_stats WHERE hook = 'halves'").rows)
        pairs = c.sql("SELECT neuron_a, neuron_b, pearson FROM coactivation WHERE hook_a = 'halves' AND hook_b = ? AND ranking = 'pearson' AND rank = 1", [hook]).rows
    latent = {(n, r): v for n, r, v in top}
    for n, r, v in neuron_top:
        if v > 0:
            assert latent[(n, r)] == pytest.approx(v, abs=1e-6)  # latent n is relu(x_n): the same top
    for n, r, v in neuron_bottom:
        if v < 0:
            assert latent[(64 + n, r)] == pytest.approx(-v, abs=1e-6)  # latent 64+n is relu(-x_n)
    flat = x.reshape(-1, 64)[counted.reshape(-1)]
    np.testing.assert_allclose([stats[n] for n in range(64)], (flat > 0).mean(0), atol=2e-3)
    ref_values, _ = brute_top_k(np.maximum(x, 0), counted, 5)
    np.testing.assert_allclose([latent[(n, 1)] for n in range(64)], ref_values[0], atol=1e-5)
    # Co-activation between a latent and the neurons of its hook: relu(x_n) correlates most with x_n.
    assert sum(a == b for a, b, _ in pairs if a < 64) >= 60


def test_latents_named_in_dense_are_stored_sparse(planted, tiny_model):
    """``dense: [halves]`` keeps the latents as CSR rows per shard (float16 values), equal to the
    hook's halves at every token, and pages read them instead of recomputing."""
    from actscope.queries.activations import TokenActivations

    spec, hook = planted, "blocks.1.hook_resid_post"
    store = Store.open(spec.store)
    data = store.read_tokens(0, store.n_seq)
    x = activations(str(tiny_model), [hook], data["tokens"], data["kinds"] != PAD)[hook]
    halves = np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], -1)
    real = (data["kinds"] != PAD).reshape(-1)
    assert "acts" not in store.group or "halves" not in store.group["acts"]  # no N-wide array
    stored = []
    for shard in range(store.n_shards):
        rows = store.read_latents("halves", shard)
        n = len(rows["indptr"]) - 1
        block = np.zeros((n, 128), np.float32)
        block[np.repeat(np.arange(n), np.diff(rows["indptr"])), rows["index"]] = rows["value"]
        assert rows["value"].dtype == np.float16 and (rows["value"] != 0).all()
        stored.append(block)
    stored = np.concatenate(stored)
    np.testing.assert_allclose(stored[real], halves.reshape(-1, 128)[real], atol=2e-3, rtol=1e-3)  # float16 storage
    source = TokenActivations(store, "halves")
    assert source.source == "dense"
    seqs = np.array([0, 1, store.n_seq - 1])
    np.testing.assert_array_equal(source.gather(seqs, np.array([3, 70, 127])), stored.reshape(store.n_seq, -1, 128)[seqs, :, [3, 70, 127]])
    with actscope.connect(spec.store) as c:
        assert c.neuron("halves", 3).document["top_examples"]  # the page's values agree with the tables


def test_latents_are_addressed_like_neurons(planted, tmp_path):
    spec = planted
    runner = CliRunner()
    result = runner.invoke(app, ["top", spec.store, "halves", "3", "-k", "3"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["status", spec.store], env={"COLUMNS": "400"})
    assert result.exit_code == 0 and "halves" in result.output and "standard" in result.output, result.output
    # [relu(x), relu(-x)] decodes to x exactly, and every non-zero x_n fires one latent.
    assert "L0 64.00, FVU 0.0000 on the first batch of" in result.output, result.output
    quality = Store.open(spec.store).sae_quality()["halves"]
    assert quality["fvu"] < 1e-10 and quality["groups"] == Store.open(spec.store).n_groups
    result = runner.invoke(app, ["top", spec.store, "halves", "128"])
    assert result.exit_code == 2 and "out of range" in result.output
    with actscope.connect(spec.store) as c:
        page = c.neuron("halves", 3)
        assert page.document["hook"] == "halves" and page.document["top_examples"]
        summary = actscope.queries.report.export(c, str(tmp_path / "np"), ["halves"], fmt="neuronpedia")
    assert summary["files"] == 1
    batch = json.loads((tmp_path / "np" / "halves" / "batch-0.json").read_text())
    assert batch["layer"] == 1 and len(batch["features"]) == 128
    # Logit effects: the decoder row through the unembedding, as for a residual-stream unit.
    with actscope.connect(spec.store) as c:
        mine = c.sql("SELECT token_id, effect FROM logit_effects WHERE hook = 'halves' AND neuron = 5 AND direction = 'promote' ORDER BY rank").rows
        unit = c.sql("SELECT token_id, effect FROM logit_effects WHERE hook = 'blocks.1.hook_resid_post' AND neuron = 5 AND direction = 'promote' ORDER BY rank").rows
    assert [t for t, _ in mine] == [t for t, _ in unit]


def test_job_files_with_bad_saes_say_which_and_why(make_job, tmp_path):
    sae = write_sae(tmp_path / "narrow", d_in=32, d_sae=64)
    transcoder = write_sae(tmp_path / "tc", d_in=64, d_sae=64, architecture="transcoder", d_out=64)
    cases = [
        ({"saes": [{"name": "s", "path": str(sae)}]}, "d_in 32"),  # the hook is 64 wide
        ({"saes": [{"name": "s", "path": str(sae), "hook": "blocks.0.hook_resid_post"}]}, "not in hooks"),
        ({"saes": [{"name": "blocks.0.mlp.hook_post", "path": str(sae)}]}, "not starting like a"),
        ({"saes": [{"name": "s", "path": str(sae)}, {"name": "s", "path": str(sae)}]}, "unique"),
        ({"saes": [{"name": "t", "path": str(transcoder), "hook_out": "blocks.1.hook_mlp_outt"}]}, "not a hook of this model"),
        ({"saes": [{"name": "t", "path": str(transcoder), "hook_out": "blocks.1.mlp.hook_post"}]}, "decoder writes 64 values"),
    ]
    for overrides, message in cases:
        job = make_job("bad", **overrides)
        result = CliRunner().invoke(app, ["run", str(job), "--local", "--dry-run"])
        assert result.exit_code == 2 and message in result.output, (overrides, result.output)
        assert "Traceback" not in result.output


def test_hooks_checks_sae_folders_against_the_model(tiny_model, tmp_path, monkeypatch):
    """``actscope hooks MODEL --sae DIR`` reads each folder, checks its hooks and widths against
    the model, and measures L0 and FVU on sample text; a folder that does not fit says why."""
    eye = np.eye(64, dtype=np.float32)
    halves = write_sae(tmp_path / "halves", d_in=64, d_sae=128, weights={
        "W_enc": np.concatenate([eye, -eye], 1), "b_enc": np.zeros(128, np.float32),
        "W_dec": np.concatenate([eye, -eye], 0), "b_dec": np.zeros(64, np.float32)})
    narrow = write_sae(tmp_path / "narrow", d_in=32, d_sae=64)
    elsewhere = write_sae(tmp_path / "elsewhere", d_in=64, d_sae=64, hook="blocks.7.hook_resid_post")
    transcoder = write_sae(tmp_path / "tc", d_in=64, d_sae=64, architecture="transcoder", d_out=64, hook_out="blocks.1.hook_mlp_out")
    args = ["hooks", str(tiny_model)]
    for folder in (halves, narrow, elsewhere, transcoder, tmp_path / "missing"):
        args += ["--sae", str(folder)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output  # every folder is said, then the refusals' exit
    lines = result.output.splitlines()
    assert "standard (saelens), d_in 64, d_sae 128, reads blocks.1.hook_resid_post" in lines[0]
    assert "fits this model" in lines[1] and "L0 64.00, FVU 0.0000" in lines[1]  # [relu(x), relu(-x)] decodes to x
    assert "blocks.1.hook_resid_post is 64 wide, the SAE's d_in is 32" in result.output
    assert "blocks.7.hook_resid_post: not a hook of" in result.output
    assert "writes blocks.1.hook_mlp_out" in result.output and "FVU not measured" not in result.output
    assert "not a folder" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["hooks", str(tiny_model), "--sae", str(halves)])
    assert result.exit_code == 0, result.output
    from actscope.pipeline import capacity

    monkeypatch.setattr(capacity, "machine_memory", lambda: 1 << 20)  # 1 MiB: a 64 x 128 SAE is too big, said before loading
    result = CliRunner().invoke(app, ["hooks", str(tiny_model), "--sae", str(halves)], env={"COLUMNS": "300"})
    assert result.exit_code == 2 and "too big to check here" in result.output, result.output
