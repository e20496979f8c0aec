"""Neuron reports: every number equals the tables, per-token colours agree with the model at the
marked tokens, corpus text is escaped in every format, and the static site works in a real
browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import actscope
from actscope.jobs.cli import app
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.queries.pages import HookPages
from actscope.queries.report import export, md_text, render_html, render_markdown
from actscope.storage.store import PAD, TEXT, Store
from tests.conftest import corpus_documents, write_job
from tests.reference import activations

# Pages, sites and exports of a whole job: end to end, not the fast tier.
pytestmark = pytest.mark.slow

DENSE, RERUN = "blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("reports")
    # The hostile documents (markup, quotes, control characters) first, so the job reads them.
    docs = corpus_documents()
    hostile = [d for d in docs if "<" in d]
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n".join(hostile + [d for d in docs if d not in hostile]) + "\n")
    path = write_job(
        root, "job", tiny_model, root / "corpus", hooks=[DENSE, RERUN], dense=[DENSE], top_k=6,
        samples_per_band=2, band_sample_rate=0.5, coactivation={"stride": 2},
    )
    spec = load_job(path)
    run_job(spec, use_ray=False)
    s = Store.open(spec.store)
    data = s.read_tokens(0, s.n_seq, ("tokens", "kinds"))
    ref = activations(str(tiny_model), spec.hooks, data["tokens"], data["kinds"] != PAD)
    return spec, ref


def _hostile_neuron(spec, hook: str) -> int:
    """A neuron whose page quotes the sequence holding the <script> document."""
    with actscope.connect(spec.store) as c:
        rows = c.sql(
            """SELECT e.neuron FROM (SELECT neuron, seq_id FROM top_examples WHERE hook = ?
                                      UNION ALL SELECT neuron, seq_id FROM band_samples WHERE hook = ?) e
               WHERE e.seq_id IN (SELECT t.seq_id FROM tokens t JOIN vocab v USING (token_id) GROUP BY t.seq_id
                                  HAVING string_agg(v.token, '' ORDER BY t.pos) LIKE '%<script>alert%')
               ORDER BY e.neuron LIMIT 1""",
            [hook, hook],
        ).rows
    assert rows, "no page quotes the hostile sequence; the test corpus changed?"
    return rows[0][0]


@pytest.mark.parametrize("hook", [DENSE, RERUN])
def test_document_numbers_equal_the_tables(store, hook):
    spec, _ = store
    with actscope.connect(spec.store) as c:
        pages = HookPages(c, hook, [0, 5, 17])
        for n in (0, 5, 17):
            doc = pages.document(n)
            stats = c.sql("SELECT * FROM neuron_stats WHERE hook = ? AND neuron = ?", [hook, n]).records()[0]
            for key, value in doc["stats"].items():
                assert value == (None if stats[key] != stats[key] else stats[key]), key
            for table in ("top_examples", "bottom_examples"):
                rows = c.sql(f"SELECT rank, activation, seq_id, pos FROM {table} WHERE hook = ? AND neuron = ? ORDER BY rank", [hook, n]).rows
                assert [(e["rank"], e["activation"], e["seq_id"], e["pos"]) for e in doc[table]] == [
                    (r, float(np.float32(a)), s, p) for r, a, s, p in rows
                ]
            bands = c.sql("SELECT band, rank, activation, seq_id, pos FROM band_samples WHERE hook = ? AND neuron = ? ORDER BY band DESC, rank", [hook, n]).rows
            assert [(e["band"], e["rank"], e["activation"], e["seq_id"], e["pos"]) for e in doc["band_samples"]] == [
                (b, r, float(np.float32(a)), s, p) for b, r, a, s, p in bands
            ]
            hist = c.sql("SELECT count FROM histograms WHERE hook = ? AND neuron = ? ORDER BY bin", [hook, n]).rows
            assert [b["count"] for b in doc["histogram"]] == [r[0] for r in hist]
            assert sum(b["count"] for b in doc["histogram"]) == doc["stats"]["count"]
            tokens = c.sql("SELECT token_id, mean_activation, count FROM token_stats WHERE hook = ? AND neuron = ? ORDER BY rank", [hook, n]).rows
            assert [(t["token_id"], t["mean_activation"], t["count"]) for t in doc["top_tokens"]] == tokens
            effects = c.sql("SELECT token_id, effect FROM logit_effects WHERE hook = ? AND neuron = ? AND direction = 'promote' ORDER BY rank", [hook, n]).rows
            assert [(t["token_id"], t["effect"]) for t in doc["logit_effects"]["promote"]] == [(i, float(np.float32(e))) for i, e in effects]
            partners = c.coact(hook, n, k=100).records()
            assert [(p["hook"], p["neuron"], p["n_both"]) for p in doc["coactivation"]["pearson"]] == [
                (p["hook"], p["neuron"], p["n_both"]) for p in partners
            ]
            json.dumps(doc, allow_nan=False)  # valid JSON: no NaN or infinity


@pytest.mark.parametrize("hook", [DENSE, RERUN])
def test_token_colours_are_the_models_activations(store, hook):
    """Per-token values equal a plain transformers forward (to the rounding of the page, or the
    float16 of the dense store); at marked tokens they are the cached values exactly."""
    spec, ref = store
    with actscope.connect(spec.store) as c:
        pages = HookPages(c, hook, list(range(0, 256, 15)))
        assert pages.source.source == ("dense" if hook == DENSE else "recomputed")
        for n in pages.neurons:
            doc = pages.document(int(n))
            for ex in doc["top_examples"] + doc["bottom_examples"] + doc["band_samples"]:
                seq = doc["sequences"][str(ex["seq_id"])]
                a = seq["start"]
                truth = ref[hook][ex["seq_id"], a : a + len(seq["values"]), n]
                tol = float(2e-3 * np.abs(ref[hook][..., n]).max() + 1e-4)
                np.testing.assert_allclose(seq["values"], truth, atol=tol)
                assert seq["values"][ex["pos"] - a] == pytest.approx(ex["activation"], abs=tol)
                assert abs(ex["activation"] - ref[hook][ex["seq_id"], ex["pos"], n]) < 1e-5


def test_a_changed_dense_array_is_refused(store, tmp_path):
    """Per-token values that disagree with the cached ones are an error, not a wrong page."""
    spec, _ = store
    copy = tmp_path / "copy.zarr"
    shutil.copytree(spec.store, copy)
    dense = Store.open(str(copy), writable=True).dense(DENSE)
    dense[...] = dense[...] * 2
    result = CliRunner().invoke(app, ["report", str(copy), DENSE, "3", "--out", str(tmp_path / "n.json")])
    assert result.exit_code == 2
    assert "disagree with the cached" in result.output


def test_corpus_text_is_escaped_in_every_format(store, tmp_path):
    spec, _ = store
    n = _hostile_neuron(spec, DENSE)
    with actscope.connect(spec.store) as c:
        doc = HookPages(c, DENSE, [n]).document(n)
    text = "".join("".join(s["tokens"]) for s in doc["sequences"].values())
    assert "<script>alert" in text  # the page does quote the hostile text
    html = render_html(doc)
    assert "<script>alert" not in html and "\x07" not in html.split('id="neuron-data">')[0]
    assert html.count("<script") == 3  # the two data blocks and the page's own script
    data = html.split('id="neuron-data">')[1].split("</script>")[0]
    assert json.loads(data) == json.loads(json.dumps(doc))  # the embedded JSON is intact
    md = render_markdown(doc, window=1000)  # whole sequences
    assert "<script>" not in md and "\x07" not in md and "\x1b" not in md and "&lt;script&gt;" in md
    assert md_text("a*b_[c](d)<e>") == r"a\*b\_\[c\]\(d\)&lt;e&gt;"


def test_report_command_writes_each_format(store, tmp_path):
    spec, _ = store
    runner = CliRunner()
    for name in ("n.html", "n.json", "n.md"):
        result = runner.invoke(app, ["report", spec.store, RERUN, "7", "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "n.json").read_text())
    assert doc["hook"] == RERUN and doc["neuron"] == 7 and doc["format"] == "actscope.neuron/1"
    assert "neuron 7" in (tmp_path / "n.html").read_text() and "## Top examples" in (tmp_path / "n.md").read_text()
    result = runner.invoke(app, ["report", spec.store, RERUN, "7", "--out", str(tmp_path / "np.json"), "--format", "neuronpedia"])
    assert result.exit_code == 0, result.output
    one = json.loads((tmp_path / "np.json").read_text())  # a batch of one feature
    assert [f["feature_index"] for f in one["features"]] == [7] and one["layer"] == 1
    top = one["features"][0]["activations"][0]
    assert top["values"][top["qualifying_token_index"]] == doc["top_examples"][0]["activation"] == doc["stats"]["max"]
    for args, message in (
        (["report", spec.store, RERUN, "7", "--out", str(tmp_path / "n.txt")], "cannot tell the format"),
        (["report", spec.store, RERUN, "9999", "--out", str(tmp_path / "n.html")], "out of range"),
        (["report", spec.store, "blocks.9.mlp.hook_post", "1", "--out", str(tmp_path / "n.html")], "recorded hooks"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_probe_gives_the_models_activations_on_new_text(store, tiny_model):
    spec, _ = store
    from transformers import AutoTokenizer

    text = "Return the <b>number</b> of items\tin a list."
    result = CliRunner().invoke(app, ["probe", spec.store, RERUN, "3", text, "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    ref = activations(str(tiny_model), [RERUN], np.array([ids]), np.ones((1, len(ids))))[RERUN][0, :, 3]
    assert [r["token_id"] for r in rows] == ids
    np.testing.assert_allclose([r["activation"] for r in rows], ref, atol=1e-5)
    shown = CliRunner().invoke(app, ["probe", spec.store, RERUN, "3", text])
    assert shown.exit_code == 0 and "number" in shown.output and "max" in shown.output
    table = CliRunner().invoke(app, ["probe", spec.store, RERUN, "3", text, "--format", "table"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "activation" in table.output and len(table.output.splitlines()) >= len(ids)
    from actscope.jobs.cli import (
        _shade,  # the text's colour is set with the background: readable on dark and light terminals
    )

    assert _shade(0.0, -1, 1) == "black on rgb(255,255,255)" and _shade(1.0, -1, 1).startswith("white on")


def test_export_writes_a_page_per_neuron(store, tmp_path):
    spec, _ = store
    with actscope.connect(spec.store) as c:
        summary = export(c, str(tmp_path / "site"), [RERUN])
        assert summary["hooks"][RERUN]["neurons"] == 256
        np_summary = export(c, str(tmp_path / "np"), [DENSE], fmt="neuronpedia")
    assert len(list((tmp_path / "site" / RERUN).glob("*.html"))) == 257
    assert np_summary["files"] == 2
    batch = json.loads((tmp_path / "np" / DENSE / "batch-1.json").read_text())
    assert [f["feature_index"] for f in batch["features"]] == list(range(128, 256))


# -- Neuronpedia batches, loaded by SAEDashboard's own dataclasses -----------------------------

# Every key SAEDashboard's acceptance test (tests/acceptance/test_neuronpedia_runner_output.py)
# asserts in a batch, a feature and an activation.
BATCH_KEYS = {"model_id", "layer", "sae_set", "features"}
FEATURE_KEYS = {
    "feature_index", "activations", "neg_str", "neg_values", "pos_str", "pos_values", "frac_nonzero",
    "freq_hist_data_bar_heights", "freq_hist_data_bar_values", "logits_hist_data_bar_heights",
    "logits_hist_data_bar_values", "n_prompts_total", "n_tokens_in_prompt", "dataset", "neuron_alignment_indices",
    "neuron_alignment_values", "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_l1",
    "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "decoder_weights_dist",
}
ACTIVATION_KEYS = {"tokens", "values", "bin_min", "bin_max", "bin_contains", "dfa_values", "dfa_maxValue", "dfa_targetIndex"}


def _dashboard():
    """SAEDashboard's dataclasses (PyPI sae-dashboard, installed without its dependencies: the
    module imports only numpy)."""
    return pytest.importorskip("sae_dashboard.neuronpedia.neuronpedia_dashboard", reason="pip install --no-deps sae-dashboard")


@pytest.fixture(scope="module")
def neuronpedia(store, tmp_path_factory):
    spec, _ = store
    out = tmp_path_factory.mktemp("np") / "export"
    with actscope.connect(spec.store) as c:
        summary = export(c, str(out), [DENSE, RERUN], fmt="neuronpedia")
    return out, summary


def test_neuronpedia_batches_load_in_saedashboard(store, neuronpedia):
    dashboard = _dashboard()
    spec, _ = store
    out, summary = neuronpedia
    assert summary["files"] == 4
    for hook, layer in ((DENSE, 0), (RERUN, 1)):
        files = sorted((out / hook).glob("batch-*.json"))
        assert [f.name for f in files] == ["batch-0.json", "batch-1.json"]
        indices = []
        for f in files:
            raw = json.loads(f.read_text())
            assert BATCH_KEYS <= raw.keys() and "sae_id_suffix" in raw  # the importer reads it
            batch = dashboard.NeuronpediaDashboardBatch(**raw)  # unmodified: an unknown key is a TypeError
            assert batch.layer == layer and isinstance(raw["layer"], int)
            assert batch.model_id and batch.sae_set == "mlp-post" and batch.sae_id_suffix is None
            for feature, fraw in zip(batch.features, raw["features"]):
                assert FEATURE_KEYS <= fraw.keys()
                assert feature.n_tokens_in_prompt == spec.context_length and feature.n_prompts_total > 0
                assert len(fraw["freq_hist_data_bar_values"]) == len(fraw["freq_hist_data_bar_heights"])
                for a in fraw["activations"]:
                    assert ACTIVATION_KEYS <= a.keys()
                indices.append(feature.feature_index)
        assert indices == list(range(256))


def test_neuronpedia_numbers_are_the_stores(store, neuronpedia, tiny_model):
    """Each group's bounds and share, each snippet's marked value, and the frequency histogram,
    against the tables and a plain forward of the model."""
    spec, _ = store
    out, _ = neuronpedia
    s = Store.open(spec.store)
    data = s.read_tokens(0, s.n_seq, ("tokens", "kinds"))
    ref = activations(str(tiny_model), [RERUN], data["tokens"], data["kinds"] != PAD)[RERUN]
    counted = (data["kinds"] == TEXT).reshape(-1)
    x = ref.reshape(-1, ref.shape[-1])[counted].astype(np.float64)
    features = json.loads((out / RERUN / "batch-0.json").read_text())["features"]
    with actscope.connect(spec.store) as c:
        vocab = dict(c.internal("SELECT token_id, token FROM vocab").rows)
        for f in features[:24]:
            n = f["feature_index"]
            values = x[:, n]
            top = c.internal("SELECT activation, seq_id, pos FROM top_examples WHERE hook = ? AND neuron = ? ORDER BY rank", [RERUN, n]).rows
            bottom = c.internal("SELECT activation FROM bottom_examples WHERE hook = ? AND neuron = ? ORDER BY rank", [RERUN, n]).rows
            groups = f["activations"]
            head, tail = groups[: len(top)], groups[len(groups) - len(bottom):]
            for a, (value, seq, pos) in zip(head, top):
                assert (a["bin_min"], a["bin_contains"]) == (-1, -1) and a["bin_max"] == pytest.approx(values.max(), abs=1e-5)
                assert a["values"][a["qualifying_token_index"]] == value  # the cached value, exactly
                first = pos - a["qualifying_token_index"]
                assert a["tokens"] == [vocab[int(t)] for t in data["tokens"][seq, first : first + len(a["tokens"])]]
                assert len(a["tokens"]) <= 2 * 12 + 1
            for a in groups[len(top) : len(groups) - len(bottom)]:  # band samples: an interval and its exact share
                lo, hi = a["bin_min"], a["bin_max"]
                share = ((values >= lo) & (values <= hi)).mean()  # a few tokens at an edge may differ in float32
                assert abs(a["bin_contains"] - share) <= 3 / len(values)
                assert lo <= a["values"][a["qualifying_token_index"]] <= hi
            for a in tail:
                assert a["bin_min"] == pytest.approx(values.min(), abs=1e-5) and a["bin_contains"] == len(bottom) / len(values)
            positive = values[values > 0]
            heights = np.asarray(f["freq_hist_data_bar_heights"])
            assert heights.sum() == len(positive)  # exact: every token above 0, once
            if len(positive):
                centres = np.asarray(f["freq_hist_data_bar_values"])
                width = centres[1] - centres[0] if len(centres) > 1 else 0
                mean = (heights * centres).sum() / heights.sum()
                # Each count moves within one of our bins (12.5 % of its value, or the near-zero
                # bin's 2**-8), then to a bar's centre (half a bar).
                assert abs(mean - positive.mean()) <= 0.125 * positive.mean() + 2**-8 + width / 2
                assert centres[-1] + width / 2 == pytest.approx(positive.max(), rel=1e-4)


# -- neuron-explainer records, loaded by its own dataclasses --------------------------------------

def test_neuron_records_round_trip_through_neuron_explainer(store, tmp_path):
    """Every exported record loads as neuron-explainer's NeuronRecord (PyPI neuron-explainer),
    with the cached value at each example's token, exactly, and moments and quantiles from the
    tables."""
    pytest.importorskip("neuron_explainer.activations.activations", reason="pip install --no-deps neuron-explainer")
    from neuron_explainer.activations.activations import ActivationRecord, NeuronRecord
    from neuron_explainer.fast_dataclasses import dumps, loads

    spec, _ = store
    with actscope.connect(spec.store) as c:
        export(c, str(tmp_path / "records"), [RERUN], fmt="neuron-record")
        stats = {r[0]: r[1:] for r in c.internal(
            "SELECT neuron, mean, std, skew, kurtosis, p50, p90, p99 FROM neuron_stats WHERE hook = ?", [RERUN]).rows}
        top = c.internal("SELECT neuron, activation FROM top_examples WHERE hook = ? ORDER BY neuron, rank", [RERUN]).rows
    files = sorted((tmp_path / "records" / RERUN).glob("*.json"), key=lambda f: int(f.stem))
    assert len(files) == 256
    for f in files[:32]:
        record = loads(f.read_bytes())
        assert isinstance(record, NeuronRecord) and record.neuron_id.layer_index == 1
        n = record.neuron_id.neuron_index
        assert n == int(f.stem)
        mean, std, skew, kurtosis, p50, p90, p99 = stats[n]
        assert (record.mean, record.skewness, record.kurtosis) == (mean, skew, kurtosis)
        assert record.variance == pytest.approx(std * std, rel=1e-12)
        assert record.quantile_boundaries[:3] == pytest.approx([p50, p90, p99], rel=1e-9, abs=1e-12)
        assert len(record.random_sample_by_quantile) == len(record.quantile_boundaries) + 1
        for r, v in zip(record.most_positive_activation_records, [v for m, v in top if m == n]):
            assert v in r.activations  # the example's token, exact
        groups = [record.most_positive_activation_records, record.random_sample, *record.random_sample_by_quantile]
        assert all(isinstance(r, ActivationRecord) and len(r.tokens) == len(r.activations) <= 25 for g in groups for r in g)
        assert record.max_activation == max(v for m, v in top if m == n)  # the cached top value itself
        assert loads(dumps(record)) == record
    assert len(record.random_sample) == spec.random_samples


# -- the dense arrays, read by the array ecosystem ------------------------------------------------

def test_dense_activations_open_in_xarray_and_zarr(store):
    """``acts/<hook>`` and the token arrays carry named dimensions: xarray reads them as they are
    (no actscope code), and zarr alone reads the same numbers."""
    xr = pytest.importorskip("xarray")
    import zarr

    spec, _ = store
    acts = xr.open_zarr(spec.store, group="acts", consolidated=False)
    assert acts[DENSE].dims == ("seq", "pos", "neuron") and acts[DENSE].dtype == np.float16
    plain = zarr.open_array(f"{spec.store}/acts/{DENSE}", mode="r")
    assert acts[DENSE].shape == plain.shape
    np.testing.assert_array_equal(acts[DENSE][3:5, :, 10:20].values, plain[3:5, :, 10:20])
    tokens = xr.open_zarr(spec.store, consolidated=False)
    assert {name: tokens[name].dims for name in ("tokens", "kinds")} == {"tokens": ("seq", "pos"), "kinds": ("seq", "pos")}
    # A neuron's activation on its top example, read through xarray, is the table's (fp16).
    with actscope.connect(spec.store) as c:
        value, seq, pos = c.internal("SELECT activation, seq_id, pos FROM top_examples WHERE hook = ? AND neuron = 5 AND rank = 1", [DENSE]).rows[0]
    assert float(acts[DENSE].sel(neuron=5).isel(seq=seq, pos=pos)) == pytest.approx(value, rel=2e-3, abs=1e-3)


# -- in a real browser -----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on this machine (.ci/run installs Debian's chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, url: str):
    page = browser.new_page()
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: problems.append(f"network: {r.url}") if not r.url.startswith(("file:", "data:", "about:")) else None)
    page.goto(url)
    return page, problems


def test_site_in_a_real_browser(store, browser, tmp_path):
    spec, _ = store
    site = tmp_path / "site"
    result = CliRunner().invoke(app, ["export", spec.store, "--out", str(site)])
    assert result.exit_code == 0, result.output

    page, problems = _open(browser, (site / "index.html").as_uri())
    page.click(f"text={DENSE}")
    page.wait_for_selector("#neurons tbody tr")
    assert page.locator("#neurons tbody tr").count() == 256
    page.click("th[data-sort=max]")
    assert page.get_attribute("th[data-sort=max]", "aria-sort") == "descending"
    shown = [float(x) for x in page.locator("#neurons tbody tr td:nth-child(2)").all_inner_texts()]
    assert shown == sorted(shown, reverse=True)
    with actscope.connect(spec.store) as c:
        best = c.sql("SELECT neuron FROM neuron_stats WHERE hook = ? ORDER BY max DESC, neuron LIMIT 1", [DENSE]).rows[0][0]
        top = c.sql("SELECT activation, seq_id, pos FROM top_examples WHERE hook = ? AND neuron = ? ORDER BY rank", [DENSE, best]).rows
    assert page.locator("#neurons tbody tr td:first-child").first.inner_text() == str(best)
    page.click("th[data-sort=max]")
    assert page.get_attribute("th[data-sort=max]", "aria-sort") == "ascending"
    page.fill("#filter", str(best))
    assert page.locator("#neurons tbody tr").count() == 1
    page.click(f"#neurons tbody a >> text={best}")

    page.wait_for_selector(".example")
    examples = page.locator("h2:has-text('Top examples') ~ .example")
    assert page.locator(".example").count() >= len(top)
    marked = [float(v) for v in page.locator(".tok.max").evaluate_all("els => els.map(e => e.dataset.value)")[: len(top)]]
    assert marked == [float(np.float32(a)) for a, _, _ in top]  # the colour at the mark is the cached value
    first = examples.first
    window = first.locator(".tok").count()
    if first.locator("button.full").count():
        first.locator("button.full").click()
        assert first.locator(".tok").count() > window
    page.click("text=random")
    page.wait_for_selector(".example")
    page.screenshot(path=str(tmp_path / "neuron.png"), full_page=False)
    page.close()
    assert not problems, problems

    n = _hostile_neuron(spec, DENSE)
    page, problems = _open(browser, (site / DENSE / f"{n}.html").as_uri())
    page.wait_for_selector(".example")
    for button in page.locator("button.full").all():
        button.click()
    text = page.inner_text("#page")
    with actscope.connect(spec.store) as c:
        quoted = "".join("".join(s["tokens"]) for s in HookPages(c, DENSE, [n]).document(n)["sequences"].values())
    assert "<script>alert" in text, text[text.find('script') - 200:][:400]
    for control in ("\x07", "\x1b", "\x7f"):
        if control in quoted:
            assert f"\\x{ord(control):02x}" in text
    assert page.evaluate("document.querySelectorAll('script').length") == 3 and page.locator("b").filter(has_text="bold").count() == 0
    page.close()
    assert not problems, problems


def test_page_folds_overlapping_examples_and_states_its_samples(store, browser, tmp_path):
    """What a reader sees at a glance (issue 27): top examples whose windows overlap are one card
    outlining each of them and labelled with all their ranks (none lost), a run of equal bottom
    examples is one card and a count, a linear histogram stands beside the octave one, and the
    co-activation section says how many tokens it is over."""
    spec, _ = store
    with actscope.connect(spec.store) as c:
        window = HookPages(c, DENSE, [0]).document(0)["window"]
        n = c.sql(
            """SELECT a.neuron FROM top_examples a JOIN top_examples b USING (hook, neuron, seq_id)
               WHERE a.hook = ? AND a.rank < b.rank AND abs(a.pos - b.pos) <= ? ORDER BY a.neuron LIMIT 1""",
            [DENSE, 2 * window],
        ).rows[0][0]
        doc = HookPages(c, DENSE, [n]).document(n)
    out = tmp_path / f"{n}.html"
    result = CliRunner().invoke(app, ["report", spec.store, DENSE, str(n), "--out", str(out), "-k", "6"])
    assert result.exit_code == 0, result.output
    page, problems = _open(browser, out.as_uri())
    page.wait_for_selector(".example")
    top = page.evaluate(
        """() => { const out = []; let h = [...document.querySelectorAll('h2')].find(e => e.textContent === 'Top examples');
                   for (let e = h.nextElementSibling; e && e.tagName !== 'H2'; e = e.nextElementSibling)
                     if (e.classList.contains('example')) out.push([e.querySelector('.meta').innerText, e.querySelectorAll('.tok.max').length]);
                   return out; }"""
    )
    ranks = sorted(int(r) for label, _ in top for r in re.search(r"tops? ([\d, ]+) ·", label).group(1).split(","))
    assert ranks == [e["rank"] for e in doc["top_examples"]] and len(top) < len(ranks)
    assert sum(marks for _, marks in top) == len(ranks)  # every folded example outlined
    bottoms = [e["activation"] for e in doc["bottom_examples"]]
    if len(set(bottoms)) < len(bottoms):
        assert "more at this activation" in page.inner_text("#page")
    assert page.locator("svg.histogram.linear").count() == (1 if doc["stats"]["max"] > 0 else 0)
    assert f"over {doc['coactivation_tokens']:,} tokens" in page.inner_text("#page")
    page.close()
    assert not problems, problems


def test_neuron_page_renders_inline_in_a_notebook(store, browser):
    """``catalog.neuron(hook, n)`` in Jupyter: the output cell is ``_repr_html_``, a sandboxed
    frame holding the page, which runs its scripts and shows the hostile corpus text as text."""
    spec, _ = store
    n = _hostile_neuron(spec, DENSE)
    with actscope.connect(spec.store) as c:
        neuron = c.neuron(DENSE, n)
    assert neuron.document["neuron"] == n and f"neuron {n}" in repr(neuron) and "## Top examples" in neuron.markdown()
    page = browser.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.set_content(f"<!doctype html><html><body><div class='output'>{neuron._repr_html_()}</div></body></html>")
    assert page.locator("iframe").get_attribute("sandbox") == "allow-scripts"
    frame = page.frame_locator("iframe")
    frame.locator(".example").first.wait_for()
    assert frame.locator("h2:has-text('Top examples') ~ .example").count() >= 1
    for button in frame.locator("button.full").all():
        button.click()
    assert "<script>alert" in frame.locator("#page").inner_text()
    assert page.evaluate("document.querySelectorAll('script').length") == 0  # nothing runs in the notebook itself
    page.close()
    assert not problems, problems
