"""Generated inputs: any job file gets a clean refusal (exit 2, no traceback) or a plan, and any
SQL a result or a QueryError, with the store unchanged."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import actscope
from actscope.jobs.cli import app
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.storage.errors import QueryError
from tests.conftest import tree_digest, write_job

runner = CliRunner()

ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", ".", "/", "..", "~", "[/b]", "[bold red]x[/]", "\x00", "\udcff", "a" * 5000, "1e9", "auto", "cuda",
                     "blocks.0.mlp.hook_post", "blocks.9.mlp.hook_post", "text", "json", "*.txt", "http://127.0.0.1:9/x"]),
    st.lists(st.integers(min_value=-3, max_value=3), max_size=3),
    st.dictionaries(st.sampled_from(["path", "x", "blocks.0.mlp.hook_post", "stride"]), st.integers(-2, 2), max_size=2),
)
FIELDS = ["model", "dataset", "context_length", "hooks", "dense", "top_k", "store", "workers", "shard_size", "batch_size",
          "device", "dtype", "thresholds", "include_special_tokens", "statistics", "examples", "samples_per_band",
          "band_sample_rate", "random_samples", "seed", "top_tokens", "min_token_count", "top_logits", "coactivation",
          "unknown_field"]


@st.composite
def job_texts(draw, base: dict) -> str:
    job = dict(base)
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=4, unique=True)):
        if draw(st.booleans()) and field in job:
            del job[field]
        else:
            job[field] = draw(ODD_VALUES)
    if field_of_dataset := draw(st.sampled_from([None, "path", "max_tokens", "text_column", "data_files", "split", "bogus"])):
        job["dataset"] = {**(job.get("dataset") if isinstance(job.get("dataset"), dict) else {}), field_of_dataset: draw(ODD_VALUES)}
    shape = draw(st.sampled_from(["mapping", "mapping", "mapping", "list", "scalar", "garbage"]))
    if shape == "list":
        return yaml.safe_dump([job])
    if shape == "scalar":
        return yaml.safe_dump(draw(ODD_VALUES))
    text = yaml.safe_dump(job, allow_unicode=True)
    if shape == "garbage":
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.sampled_from(["{", "[", ": :", "&a x", "*a", "\t", "- - -", "!!python/object:os.system ls"])) + text[cut:]
    return text


@pytest.mark.slow
def test_generated_job_files_are_refused_cleanly_or_planned(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("generated-jobs")
    base = yaml.safe_load(write_job(root, "base", tiny_model, corpus_dir, dense=[]).read_text())
    job_path = root / "job.yaml"

    @given(job_texts(base))
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    def check(text: str):
        job_path.write_text(text, errors="surrogateescape")
        result = runner.invoke(app, ["run", str(job_path), "--dry-run", "--local"])
        assert result.exit_code in (0, 2), result.output
        assert "Traceback" not in result.output
        assert not any(p.suffix == ".zarr" for p in root.iterdir())

    check()


SQL_PIECES = st.sampled_from([
    "SELECT", "*", "1", "'x'", "FROM", "top_examples", "tokens", "vocab", "WHERE", "rank", "<", "=", "3", ",", "(", ")",
    "WITH", "x", "AS", "COPY", "TO", "'/tmp/actscope-leak.parquet'", "INSERT", "INTO", "VALUES", "DELETE", "UPDATE", "SET",
    "EXPLAIN", "ANALYZE", ";", "UNION", "ALL", "read_text", "glob", "read_parquet", "'/etc/passwd'", "ATTACH", "PRAGMA",
    "CALL", "range", "list", "LIMIT", "GROUP", "BY", "ORDER", "neuron", "hook", "count", "--", "/*", "*/", "\x00", "[/b]",
    "json_serialize_sql", "getenv", "'HOME'", "current_setting", "'threads'", "DESCRIBE", "SUMMARIZE", "SHOW", "TABLES",
])


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("generated-sql")
    spec = load_job(write_job(root, "s", tiny_model, corpus_dir, dataset={"max_tokens": 1500}, hooks=["blocks.0.mlp.hook_post"], dense=[], top_k=3))
    run_job(spec, use_ray=False)
    return spec.store


def test_generated_sql_is_answered_or_refused(small_store):
    before = tree_digest(small_store)
    with actscope.connect(small_store, timeout=3) as catalog:

        @given(st.lists(SQL_PIECES, min_size=1, max_size=12))
        @settings(max_examples=100, deadline=None, database=None)
        def check(pieces):
            try:
                result = catalog.sql(" ".join(pieces))
            except QueryError as err:
                assert str(err)
            else:
                assert len(result.rows) <= 100_000

        check()
    assert tree_digest(small_store) == before
