"""Every user mistake gets a clear message (exit 2, no traceback) and leaves an existing store
byte-identical."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from actscope.jobs.cli import app
from tests.conftest import tree_digest

runner = CliRunner()


@pytest.fixture(scope="module")
def existing(tmp_path_factory, tiny_model, corpus_dir):
    """A finished store, and a function writing job files that target it."""
    root = tmp_path_factory.mktemp("existing")
    store = root / "store.zarr"
    base = {
        "model": str(tiny_model),
        "dataset": {"path": "text", "data_files": [str(corpus_dir / "*.txt")], "max_tokens": 1500},
        "context_length": 32,
        "hooks": ["blocks.0.mlp.hook_post"],
        "top_k": 4,
        "store": str(store),
    }

    def job(name: str, text: str | None = None, **changes) -> str:
        path = root / f"{name}.yaml"
        if text is None:
            data = {**base, **changes}
            text = yaml.safe_dump({k: v for k, v in data.items() if v is not None})
        path.write_text(text)
        return str(path)

    result = runner.invoke(app, ["run", job("good"), "--local"])
    assert result.exit_code == 0, result.output
    return store, job


def _fails(args, *needles):
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())
    for needle in needles:
        assert needle in text, f"{needle!r} not in: {text}"
    return text


@pytest.mark.parametrize(
    "name, changes, needles",
    [
        ("wrong-hook", {"hooks": ["blocks.0.mlp.hook_pots"]}, ["blocks.0.mlp.hook_pots is not a hook", "Did you mean: blocks.0.mlp.hook_post"]),
        ("hook-out-of-range", {"hooks": ["blocks.7.mlp.hook_post"]}, ["not a hook", "2 blocks (0..1)"]),
        ("missing-model", {"model": "/nonexistent/model-dir"}, ["/nonexistent/model-dir does not exist"]),
        ("unknown-key", {"top_kk": 3}, ["top_kk: unknown key", "valid keys here"]),
        ("unknown-dataset-key", {"dataset": {"path": "text", "files": ["x"]}}, ["dataset.files: unknown key"]),
        ("zero-context", {"context_length": 0}, ["context_length", "greater than 0"]),
        ("negative-top-k", {"top_k": -3}, ["top_k", "greater than 0"]),
        ("zero-shard", {"shard_size": 0}, ["shard_size", "greater than 0"]),
        ("zero-max-tokens", {"dataset": {"path": "text", "max_tokens": 0}}, ["dataset.max_tokens", "greater than 0"]),
        ("wrong-type", {"hooks": "blocks.0.mlp.hook_post"}, ["hooks", "valid list"]),
        ("missing-store", {"store": None}, ["store: required field is missing"]),
        ("dense-not-hooked", {"dense": ["blocks.1.mlp.hook_post"]}, ["dense lists hooks that are not in hooks"]),
        ("pattern-hook", {"hooks": ["blocks.0.attn.hook_pattern"]}, ["not one vector per token"]),
        ("different-job", {"top_k": 5}, ["holds a different job", "top_k", "--overwrite"]),
        ("different-corpus", {"dataset": {"path": "text", "data_files": ["{corpus}/a.txt"], "max_tokens": 1500}}, ["different job", "dataset"]),
    ],
)
def test_bad_job_is_refused_and_store_untouched(existing, corpus_dir, name, changes, needles):
    store, job = existing
    if "dataset" in changes:
        dataset = dict(changes["dataset"])
        dataset["data_files"] = [f.format(corpus=corpus_dir) for f in dataset.get("data_files", [])] or None
        changes = {"dataset": {k: v for k, v in dataset.items() if v is not None}}
    before = tree_digest(store)
    _fails(["run", job(name, **changes), "--local"], *needles)
    assert tree_digest(store) == before


def test_malformed_yaml(existing):
    store, job = existing
    before = tree_digest(store)
    _fails(["run", job("malformed", text="model: x\nhooks: [a, b\nstore: y\n"), "--local"], "malformed YAML at line")
    _fails(["run", job("not-a-mapping", text="- just\n- a list\n")], "expected a mapping")
    _fails(["run", "/nonexistent/job.yaml"], "no such job file")
    assert tree_digest(store) == before


def test_empty_corpus(existing, tmp_path):
    store, job = existing
    (tmp_path / "empty.txt").write_text("\n\n\n")
    before = tree_digest(store)
    _fails(["run", job("empty", dataset={"path": "text", "data_files": [str(tmp_path / "empty.txt")]}), "--local"], "no tokens")
    _fails(["run", job("nofiles", dataset={"path": "text", "data_files": [str(tmp_path / "none-*.txt")]}), "--local"], "dataset")
    _fails(["run", job("badcol", dataset={"path": "text", "data_files": [str(tmp_path / "empty.txt")], "text_column": "body"}), "--local"])
    assert tree_digest(store) == before


def test_a_failed_new_run_leaves_nothing_behind(existing, tmp_path):
    _, job = existing
    target = tmp_path / "never.zarr"
    _fails(["run", job("new-wrong-hook", hooks=["blocks.0.nope"], store=str(target)), "--local"], "not a hook")
    assert not target.exists()


def test_not_an_actscope_store_is_never_overwritten(existing, tmp_path):
    _, job = existing
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    (precious / "data.txt").write_text("keep me")
    _fails(["run", job("precious", store=str(precious)), "--local", "--overwrite"], "not an actscope store")
    assert (precious / "data.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    "sql, needle",
    [
        ("CREATE TABLE t AS SELECT 1", "Only SELECT"),
        ("INSERT INTO top_examples SELECT * FROM top_examples", "Only SELECT"),
        ("COPY (SELECT 1) TO '/tmp/actscope-leak.csv'", "Only SELECT"),
        ("SELECT * FROM read_csv('/etc/passwd')", "Refused"),
        ("SELECT * FROM read_text('/etc/hostname')", "Refused"),
        ("ATTACH '/tmp/actscope-other.db'", "Only SELECT"),
        ("INSTALL httpfs", "Only SELECT"),
        ("LOAD httpfs", "Only SELECT"),
        ("SET enable_external_access = true", "Only SELECT"),
        ("SELECT 1; DROP VIEW tokens", "One statement at a time"),
        ("SELECT * FROM nowhere", "nowhere"),
    ],
)
def test_sql_is_read_only_and_locked_down(existing, sql, needle):
    store, _ = existing
    before = tree_digest(store)
    _fails(["query", str(store), sql], needle)
    assert tree_digest(store) == before


def test_neuron_and_hook_out_of_range(existing):
    store, _ = existing
    _fails(["top", str(store), "blocks.0.mlp.hook_post", "256"], "out of range", "256 neurons (0..255)")
    _fails(["top", str(store), "blocks.0.mlp.hook_post", "--", "-1"], "out of range")
    _fails(["top", str(store), "blocks.1.mlp.hook_post", "3"], "was not recorded", "blocks.0.mlp.hook_post")
    _fails(["status", "/nonexistent/store.zarr"], "No actscope store")


def test_hooks_lists_recordable_hook_names(tiny_model):
    result = runner.invoke(app, ["hooks", str(tiny_model), "--every"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    names = result.output.split()
    assert "blocks.1.mlp.hook_post" in names and "blocks.0.hook_resid_post" in names
    assert not any(n.endswith("hook_pattern") for n in names)
    # One line a kind of hook across its blocks, with its width, the usual choices first.
    lines = runner.invoke(app, ["hooks", str(tiny_model)], env={"COLUMNS": "200"}).output.splitlines()
    assert lines[1].split() == ["blocks.{0..1}.mlp.hook_post", "256"] and lines[2].split() == ["blocks.{0..1}.hook_resid_post", "64"]
    only = runner.invoke(app, ["hooks", str(tiny_model), "--filter", "*mlp.hook_pre"], env={"COLUMNS": "200"}).output.split()
    assert "blocks.{0..1}.mlp.hook_pre" in only and "blocks.{0..1}.mlp.hook_post" not in only
    _fails(["hooks", "/nonexistent/model"], "does not exist")


def test_cheap_mistakes_are_refused_before_the_model_loads(existing, tmp_path, monkeypatch):
    """A misspelt key, a corpus that matches no file, a store that is a folder of the user's
    files and a hook past the model's layers (from its config.json) are refused with exit 2
    without loading the model (seconds; these take milliseconds), in the dry run too."""
    from actscope.jobs import plan as plan_module

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(plan_module, "load_tokenizer", never)
    monkeypatch.setattr(plan_module, "load_job_model", never)
    monkeypatch.setattr(plan_module, "load_skeleton", never)
    _, job = existing
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    for changes, needle in [
        ({"topk": 3}, "topk: unknown key; did you mean top_k?"),
        ({"dataset": {"path": "text", "data_files": [str(tmp_path / "nowhere" / "*.txt")]}}, "matches no file"),
        ({"store": str(tmp_path / "mine")}, "not an actscope store and not empty"),
        ({"hooks": ["blocks.7.mlp.hook_post"]}, "the model has 2 blocks (0..1)"),
    ]:
        for extra in ([], ["--dry-run"]):
            _fails(["run", job("cheap", **changes), "--local", *extra], needle)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
