"""The SQL layer answers from the store: context windows, formats, the Python API."""

from __future__ import annotations

import itertools
import json

import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

import actscope
from actscope.jobs.cli import app
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.storage.store import PAD, Store
from tests.conftest import write_job


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("queries")
    path = write_job(
        root, "s", tiny_model, corpus_dir, dataset={"max_tokens": 3000}, hooks=["blocks.1.mlp.hook_post"], dense=[], top_k=5
    )
    spec = load_job(path)
    run_job(spec, use_ray=False)
    return spec


def test_top_context_is_the_decoded_window(finished, tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    store = Store.open(finished.store)
    data = store.read_tokens(0, store.n_seq)
    with actscope.connect(finished.store) as catalog:
        rows = catalog.top("blocks.1.mlp.hook_post", 7, k=5, window=3).records()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(a["activation"] >= b["activation"] for a, b in itertools.pairwise(rows))
    for row in rows:
        seq, pos = row["seq_id"], row["pos"]
        lo, hi = max(pos - 3, 0), pos + 4
        ids = [t for t, kind in zip(data["tokens"][seq, lo:hi], data["kinds"][seq, lo:hi]) if kind != PAD]
        assert row["before"] + row["token"] + row["after"] == tokenizer.decode(ids)


@pytest.mark.parametrize("which", ["tiny_model", "minilm"])
def test_vocab_tokens_concatenate_into_the_text(which, request):
    """Byte-level BPE and WordPiece alike: a run of `vocab.token` reads as the decoded text."""
    from actscope.pipeline.index import running_text

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(which))
    text = "the parser returns a new object, and raises ValueError otherwise"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = running_text(tokenizer)
    joined = "".join(tokens[i] for i in ids)
    assert joined.strip() == tokenizer.decode(ids, clean_up_tokenization_spaces=False).strip()


def test_query_formats(finished):
    runner = CliRunner()
    sql = "SELECT hook, count(*) AS n FROM top_examples GROUP BY hook"
    as_json = runner.invoke(app, ["query", finished.store, sql, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output) == [{"hook": "blocks.1.mlp.hook_post", "n": 5 * 256}]
    as_csv = runner.invoke(app, ["query", finished.store, sql, "-f", "csv"])
    assert as_csv.output.splitlines() == ["hook,n", "blocks.1.mlp.hook_post,1280"]
    top = runner.invoke(app, ["top", finished.store, "blocks.1.mlp.hook_post", "3", "-k", "2", "-f", "json"])
    assert [r["rank"] for r in json.loads(top.output)] == [1, 2]
    status = runner.invoke(app, ["status", finished.store], env={"COLUMNS": "200"})
    assert "complete" in status.output and "256 neurons" in status.output
    assert "tokens" in status.output and "on disk" in status.output and "top, bottom, histogram" in status.output


def test_tables_have_the_contract_columns(finished):
    with actscope.connect(finished.store) as catalog:
        def columns(table):
            return [r[0] for r in catalog.sql(f"DESCRIBE {table}").rows]

        assert columns("tokens")[:4] == ["seq_id", "pos", "token_id", "doc_id"]
        assert columns("vocab")[:2] == ["token_id", "token"]
        assert columns("top_examples") == ["hook", "neuron", "rank", "activation", "seq_id", "pos"]


def test_incomplete_store_is_not_queried(make_job):
    spec = load_job(make_job("incomplete"))
    from actscope.jobs import runner

    model = runner.plan(spec).model
    Store.create(spec.store, spec=spec, fingerprint=model.fingerprint, model=model)
    with pytest.raises(Exception, match="has not finished"):
        actscope.connect(spec.store)


def test_every_table_and_column_is_documented_in_the_tables_page(finished):
    from pathlib import Path

    from actscope.queries.catalog import TABLES

    readme = (Path(__file__).parent.parent / "docs" / "tables.md").read_text()
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines() if line.startswith("| `")}
    with actscope.connect(finished.store) as catalog:
        for table in TABLES:
            assert table in rows, f"docs/tables.md documents no table {table}"
            for column in catalog.sql(f"SELECT * FROM {table} LIMIT 0").columns:
                assert f"`{column}`" in rows[table], f"docs/tables.md: the {table} row lacks {column}"


def test_coact_command_prints_partners_with_their_top_tokens(finished):
    hook = finished.hooks[0]
    result = CliRunner().invoke(app, ["coact", finished.store, hook, "3", "-k", "4", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert all(r["hook"] == hook and r["neuron"] != 3 and r["top_tokens"] for r in rows)
    assert abs(rows[0]["pearson"]) >= abs(rows[-1]["pearson"])
    assert "partners by jaccard" in CliRunner().invoke(app, ["coact", finished.store, hook, "3", "--by", "jaccard"]).output
    table = CliRunner().invoke(app, ["coact", finished.store, hook, "3", "-k", "4"], env={"COLUMNS": "80"})
    lines = table.output.splitlines()  # 80 columns: one line a partner, its hook and numbers whole
    assert max(map(len, lines)) <= 80
    short = hook.removeprefix("blocks.").replace("hook_", "")
    assert [line.split()[:3] for line in lines if short in line] == [[str(r["rank"]), short, str(r["neuron"])] for r in rows]
    bad = CliRunner().invoke(app, ["coact", finished.store, hook, "99999"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_top_reads_the_same_windows_as_the_sql_macro(finished):
    """``top`` builds its windows from the token arrays (no scan of the tokens table); the SQL
    macro builds them from the table: the same rows, for every neuron and window."""
    with actscope.connect(finished.store) as catalog:
        for neuron in range(0, 256, 5):
            for k, window in ((5, 0), (3, 8), (5, 40)):
                fast = catalog.top("blocks.1.mlp.hook_post", neuron, k=k, window=window)
                macro = catalog.sql("SELECT * FROM top_with_context(?, ?, k := ?, w := ?)", ["blocks.1.mlp.hook_post", neuron, k, window])
                assert (fast.columns, fast.rows) == (macro.columns, macro.rows)


def test_results_convert_to_arrow_pandas_and_polars(finished):
    """A user query's result is the sandbox's Arrow table itself; pandas and polars are built
    from it; rows, records and the notebook table agree, with every value escaped."""
    polars = pytest.importorskip("polars")
    with actscope.connect(finished.store) as catalog:
        result = catalog.sql(
            "SELECT neuron, mean, frac_active, '<b>' || neuron::VARCHAR AS label FROM neuron_stats "
            "WHERE hook = ? ORDER BY neuron LIMIT 60", ["blocks.1.mlp.hook_post"])
        table = result.arrow()
        assert table is result.arrow() and table.num_rows == len(result) == 60
        assert table.column_names == result.columns == ["neuron", "mean", "frac_active", "label"]
        df, pl = result.df(), result.pl()
        assert df["neuron"].tolist() == [r[0] for r in result.rows] == pl["neuron"].to_list()
        assert df["mean"].tolist() == table.column("mean").to_pylist() == pl["mean"].to_list()
        assert result.records()[3] == dict(zip(result.columns, result.rows[3]))
        shown = result._repr_html_()
        assert "&lt;b&gt;7" in shown and "<b>" not in shown and "60 rows; the first 50 shown" in shown
        # Results built here (the catalog's own queries) convert the same way.
        top = catalog.top("blocks.1.mlp.hook_post", 7, k=5)
        assert top.df()["rank"].tolist() == [1, 2, 3, 4, 5] == top.arrow().column("rank").to_pylist()
        empty = catalog.sql("SELECT neuron FROM neuron_stats WHERE neuron < 0")
        assert (len(empty), empty.rows, empty.df().shape) == (0, [], (0, 1))
        assert isinstance(pl, polars.DataFrame) and "Result(60 rows x 4 columns" in repr(result)


def test_connect_takes_paths_and_file_urls(finished, tmp_path):
    from pathlib import Path

    for target in (Path(finished.store), Path(finished.store).resolve().as_uri()):
        with actscope.connect(target) as catalog:
            assert catalog.sql("SELECT count(*) FROM neuron_stats").rows[0][0] == 256


def test_every_catalog_call_after_every_other_on_one_connection(finished):
    """DuckDB 2 refuses a connection's next call while a result is open: every call of the
    catalog leaves none, so any order works on one catalog (the README's Python block calls
    ``sql`` then ``neuron``)."""
    import itertools

    hook = "blocks.1.mlp.hook_post"
    calls = {
        "sql": lambda c: c.sql("SELECT count(*) FROM neuron_stats").rows,
        "neuron": lambda c: c.neuron(hook, 3).document["neuron"],
        "top": lambda c: c.top(hook, 3, k=2).rows,
        "coact": lambda c: c.coact(hook, 3, k=2).rows,
    }
    with actscope.connect(finished.store) as catalog:
        first = {name: call(catalog) for name, call in calls.items()}
        for order in itertools.permutations(calls, 2):
            assert [calls[name](catalog) for name in order] == [first[name] for name in order]


def test_query_output_is_for_people(finished):
    """A table shows the first rows and says how many more there are (and how to get them); a
    query naming a hook the store does not hold says so; floats are rounded, numbers right-aligned."""
    from typer.testing import CliRunner

    from actscope.jobs.cli import TABLE_ROWS, app

    runner = CliRunner()
    result = runner.invoke(app, ["query", finished.store, "SELECT * FROM tokens"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "more rows not shown: --max-rows N shows more" in result.output, result.output
    assert result.output.count("\n") < TABLE_ROWS + 20
    csv_rows = runner.invoke(app, ["query", finished.store, "SELECT * FROM tokens", "--format", "csv"]).output.count("\n")
    assert csv_rows > TABLE_ROWS * 10
    result = runner.invoke(app, ["query", finished.store, "SELECT count(*) FROM top_examples WHERE hook = 'blocks.0.mlp.hook_post'"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "'blocks.0.mlp.hook_post' is not a hook of this store" in result.output, result.output
    result = runner.invoke(app, ["query", finished.store, "SELECT 1.0 / 3 AS third"], env={"COLUMNS": "200"})
    assert "0.333333 │" in result.output and "0.3333333333" not in result.output, result.output
