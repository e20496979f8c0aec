"""Neuron reports: every number equals the tables, per-token colours agree with the model at the
marked tokens, corpus text is escaped in every format, and the static site works in a real
browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import actscope
from actscope.jobs.cli import app
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.queries.pages import HookPages
from actscope.queries.report import export, md_text, neuronpedia_feature, render_html, render_markdown
from actscope.storage.store import PAD, Store
from tests.conftest import corpus_documents, write_job
from tests.reference import activations

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
    feature = json.loads((tmp_path / "np.json").read_text())["features"][0]
    assert feature == json.loads(json.dumps(neuronpedia_feature(doc)))
    assert len(feature["freq_hist_data_bar_values"]) == len(feature["freq_hist_data_bar_heights"])
    top = feature["activations"][0]
    assert top["values"][top["qualifying_token_index"]] == doc["top_examples"][0]["activation"] == feature["maxActApprox"]
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


@pytest.mark.slow
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
