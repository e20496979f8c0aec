"""SQL over a store: a locked-down DuckDB connection with the index's tables as views.

The connection can read the store's own index files and nothing else: the exact table files are
its only allowed paths, external access is off (no other files, no network, no ATTACH, no
INSTALL/LOAD), Python replacement scans are off, DuckDB spills only into a private temp folder
of bounded size, and the configuration is locked. User SQL must be one statement whose whole
parse tree is a query (``json_serialize_sql``: a COPY or INSERT inside a CTE is found, EXPLAIN
ANALYZE is refused), and it runs in a child process with a capped data segment and a hard
deadline (``queries.sandbox``), returning at most a bounded number of rows and bytes.
"""

from __future__ import annotations

import html
import json
import os
import threading
from typing import Any, Self

import duckdb
import fsspec
import pyarrow as pa

from actscope.queries.sandbox import Limits, Sandbox, lockdown
from actscope.storage.errors import QueryError, StoreDamaged, StoreError, first_line
from actscope.storage.store import PAD, Store, storage_options
from actscope.storage.tables import TABLES

REPR_ROWS = 50  # rows a notebook shows of a Result



#: Query nodes a user's statement may contain anywhere in its parse tree (CTE bodies included).
_QUERY_NODES = {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}


def index_cache() -> str:
    """Where the tables of stores on object storage are cached: ``$ACTSCOPE_CACHE/index``, else
    ``$XDG_CACHE_HOME/actscope/index`` (``~/.cache``); one copy per table file queried."""
    root = os.environ.get("ACTSCOPE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "actscope")
    return os.path.join(root, "index")


class Result:
    """A query's answer: ``columns`` and ``rows`` (tuples), and the same as Arrow, pandas or
    polars. A user query arrives from the sandbox as Arrow IPC and stays Arrow: ``arrow()`` is
    that table itself, ``pl()`` shares its buffers, ``df()`` converts once; ``rows`` are built
    the first time they are read."""

    def __init__(self, columns: list[str], rows: list[tuple] | None = None, truncated: bool = False, *,
                 table: pa.Table | None = None):
        self.columns, self.truncated = list(columns), truncated  # truncated: more rows (or bytes) than the limits allow
        self._rows, self._table = rows, table

    @classmethod
    def of(cls, table: pa.Table, truncated: bool = False) -> Result:
        return cls(table.column_names, truncated=truncated, table=table)

    @property
    def rows(self) -> list[tuple[Any, ...]]:
        if self._rows is None:
            try:
                columns = [column.to_pylist() for column in self._table.columns]
            except (pa.ArrowException, ValueError, OverflowError) as err:
                raise QueryError(f"the result cannot be made Python values ({first_line(err)}); use .arrow()") from None
            self._rows = list(zip(*columns)) if columns else [() for _ in range(self._table.num_rows)]
        return self._rows

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]

    def arrow(self) -> pa.Table:
        """A ``pyarrow.Table`` (no copy for a user query's result)."""
        if self._table is None:
            self._table = pa.table({name: [row[i] for row in self._rows] for i, name in enumerate(self.columns)})
        return self._table

    def df(self):
        """A pandas ``DataFrame`` (pandas' own conversion from Arrow)."""
        return self.arrow().to_pandas()

    def pl(self):
        """A polars ``DataFrame`` over the same Arrow buffers (``pip install polars``)."""
        try:
            import polars
        except ImportError:
            raise QueryError("Result.pl() needs polars: pip install polars") from None
        return polars.from_arrow(self.arrow())

    def __len__(self) -> int:
        return len(self._table) if self._rows is None else len(self._rows)

    def __eq__(self, other) -> bool:
        return isinstance(other, Result) and (self.columns, self.rows, self.truncated) == (other.columns, other.rows, other.truncated)

    def __repr__(self) -> str:
        more = ", truncated" if self.truncated else ""
        return f"Result({len(self)} rows x {len(self.columns)} columns: {', '.join(self.columns)}{more})"

    def _repr_html_(self) -> str:
        """The first rows as an HTML table, for notebooks (every value escaped)."""
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in self.columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in self.rows[:REPR_ROWS]
        )
        more = f"<p>{len(self):,} rows; the first {REPR_ROWS} shown.</p>" if len(self) > REPR_ROWS else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


class Catalog:
    """The query side of a store. ``Catalog(url).sql("SELECT ...")``; see also :meth:`top`.

    ``timeout`` (seconds, at most an hour) and ``max_rows`` bound every user query, here as in
    the CLI (``Limits`` has the rest: memory, result bytes, threads, temp space)."""

    def __init__(self, store_url: str, *, timeout: float = 60.0, max_rows: int = Limits.max_rows):
        self.limits = Limits(timeout=timeout, max_rows=max_rows)
        self.timeout = self.limits.timeout
        self.store = Store.open(store_url)
        if not self.store.status.complete:
            raise StoreError(f"{store_url}: the job has not finished; run it again to complete it, then query.")
        self.model = self.store.model
        self.files = self._local_files()
        missing = [t for t in TABLES if not os.path.isfile(self.files.get(t, ""))]
        if missing:
            self.close()
            raise StoreDamaged(f"{store_url}: the index is damaged: {', '.join(missing)} missing. Run the job again into a new store.")
        try:
            self.con, self._temp = lockdown(self.files, Limits(timeout=self.limits.timeout, threads=min(4, os.cpu_count() or 1)))
        except duckdb.Error as err:
            self.close()
            raise StoreDamaged(f"{store_url}: the index is damaged and cannot be read ({first_line(err)}). Run the job again into a new store.") from None
        self._sandbox = Sandbox(self.files, self.limits)

    def _local_files(self) -> dict[str, str]:
        """Each table's file on this machine. A store on object storage (any fsspec URL) has its
        Parquet tables cached locally (``index_cache``): DuckDB reads object stores only through
        its httpfs extension, which a locked-down (and possibly offline) connection cannot load.
        The cache is fsspec's ``filecache``, which checks each file's unique key (the object's
        ETag or generation) on every connect: a changed store is downloaded again, never served
        stale, and an unchanged one costs one metadata request per table."""
        fs, path = fsspec.core.url_to_fs(self.store.index_url)
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return {table: os.path.join(path, f"{table}.parquet") for table in TABLES}
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        options = {"filecache": {"cache_storage": index_cache(), "check_files": True}, protocol: storage_options(self.store.url) or {}}
        try:
            return {table: fsspec.open_local(f"filecache::{self.store.table_url(table)}", **options) for table in TABLES}
        except FileNotFoundError:
            return {}  # reported below as a damaged index

    def close(self) -> None:
        for name in ("_sandbox", "con"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        for name in ("_temp",):
            if getattr(self, name, None) is not None:
                getattr(self, name).cleanup()
                setattr(self, name, None)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- SQL ------------------------------------------------------------------------------

    def sql(self, query: str, params: list[Any] | None = None, *, truncate: bool = False) -> Result:
        """Run one read-only query (user SQL is welcome: anything else is refused), in the
        sandbox process, under the catalog's limits. A result larger than ``max_rows`` rows (or
        256 MiB) is refused, or with ``truncate`` cut to its first rows (``Result.truncated``)."""
        self.check_query(query)
        fetched = self._sandbox.run(query, params)
        if fetched.truncated and not truncate:
            raise QueryError(
                f"The result has more than {self.limits.max_rows:,} rows (or {self.limits.max_bytes >> 20} MiB): "
                "add a LIMIT or aggregate, or connect with a larger max_rows."
            )
        return Result.of(fetched.table, fetched.truncated)

    def check_query(self, query: str) -> None:
        """Refuse anything but one statement whose whole parse tree is a query."""
        if not isinstance(query, str):
            raise QueryError("The query must be text.")
        try:
            query.encode("utf-8")
        except UnicodeEncodeError:
            raise QueryError("The query is not valid UTF-8 text.") from None
        if len(query) > 1 << 20:
            raise QueryError("The query is longer than 1 MiB.")
        statements = _parse(query)
        if len(statements) != 1:
            raise QueryError(f"One statement at a time, please; got {len(statements)}.")
        kind = statements[0].type.name
        if statements[0].type != duckdb.StatementType.SELECT:
            raise QueryError(f"Only SELECT queries are allowed (the store is read-only); this is {_article(kind)} {kind} statement.")
        # Read whole (fetchall): DuckDB 2 refuses the connection's next call while a result is open.
        tree = json.loads(self._trusted(lambda: self.con.execute("SELECT json_serialize_sql(?)", [query]).fetchall()[0][0]))
        if tree.get("error"):
            raise QueryError(f"Only SELECT queries are allowed: {tree.get('error_message', 'this statement cannot be checked')}")
        others = sorted(set(_node_types(tree)) - _QUERY_NODES)
        if others:
            names = ", ".join(t.removesuffix("_NODE").removesuffix("_QUERY").replace("_", " ") for t in others)
            raise QueryError(f"Only SELECT queries are allowed (the store is read-only); this one contains {names}.")

    def internal(self, query: str, params: list[Any] | None = None) -> Result:
        """One of actscope's own queries (never a user's text), in this process, under the time
        limit: ``top``, ``coact``, the CLI and the pages use it."""

        def fetch() -> Result:
            cursor = self.con.execute(query, params or [])
            return Result([d[0] for d in cursor.description], cursor.fetchall())

        return self._trusted(fetch)

    def arrow(self, query: str, params: list[Any] | None = None) -> pa.Table:
        """Run one of actscope's own queries and return an Arrow table (bulk reads for reports)."""
        return self._trusted(lambda: self.con.sql(query, params=params or None).to_arrow_table())

    def _trusted(self, fetch):
        """Run ``fetch()`` under the time limit, with DuckDB's errors made into QueryErrors."""
        timer = threading.Timer(self.timeout, self.con.interrupt)
        timer.start()
        try:
            return fetch()
        except duckdb.InterruptException:
            raise QueryError(f"The query ran past {self.timeout:g} s and was interrupted.") from None
        except duckdb.PermissionException as err:
            raise QueryError(f"Refused: the query may only read this store's tables. ({first_line(err)})") from None
        except duckdb.Error as err:
            raise QueryError(first_line(err)) from None
        finally:
            timer.cancel()

    # -- neuron questions -----------------------------------------------------------------

    def check_neuron(self, hook: str, neuron: int) -> None:
        widths = self.model.hook_widths
        if hook not in widths:
            raise QueryError(f"{hook} was not recorded in this store; recorded hooks: {', '.join(widths)}.")
        if not 0 <= neuron < widths[hook]:
            raise QueryError(f"neuron {neuron} is out of range: {hook} has {widths[hook]} neurons (0..{widths[hook] - 1}).")

    def neuron(self, hook: str, neuron: int, *, k: int = 20):
        """One neuron's page (:class:`actscope.queries.report.NeuronPage`): its ``document``, and
        ``html()``; in Jupyter it renders inline."""
        from actscope.queries.pages import HookPages
        from actscope.queries.report import NeuronPage

        return NeuronPage(HookPages(self, hook, [neuron], k=k).document(neuron))

    def top(self, hook: str, neuron: int, k: int = 20, window: int = 8) -> Result:
        """The k examples that most activate ``neuron``, each with ``window`` tokens either side."""
        self.check_neuron(hook, neuron)
        if k <= 0 or window < 0:
            raise QueryError("k must be positive and window non-negative.")
        k, window = min(k, 1 << 20), min(window, 1 << 20)
        examples = self.internal(
            "SELECT rank, activation, seq_id, pos FROM top_examples WHERE hook = ? AND neuron = ? AND rank <= ? ORDER BY rank",
            [hook, neuron, k],
        ).rows
        return Result(["rank", "activation", "seq_id", "pos", "before", "token", "after"], self._contexts(examples, window))

    def _contexts(self, examples: list[tuple], window: int) -> list[tuple]:
        """Each example with its window of text, from the store's token arrays: the same text as
        the ``top_with_context`` macro builds from the ``tokens`` table, without scanning it (a
        window is two small chunk reads, whatever the corpus's length)."""
        if not examples:
            return []
        ctx = self.store.spec.context_length
        seqs = sorted({int(row[2]) for row in examples})
        data = self.store.read_rows(seqs, ("tokens", "kinds"))
        where = {seq: i for i, seq in enumerate(seqs)}
        vocab = self._vocab()
        out = []
        for rank, activation, seq, pos in examples:
            row = where[int(seq)]
            lo, hi = max(pos - window, 0), min(pos + window + 1, ctx)
            ids, kinds = data["tokens"][row, lo:hi], data["kinds"][row, lo:hi]
            text = [vocab[t] if kind != PAD else "" for t, kind in zip(ids.tolist(), kinds.tolist())]
            at = pos - lo
            out.append((rank, activation, seq, pos, "".join(text[:at]), text[at], "".join(text[at + 1 :])))
        return out

    def _vocab(self) -> list[str]:
        if getattr(self, "_vocab_cache", None) is None:
            self._vocab_cache = self.arrow("SELECT token FROM vocab ORDER BY token_id").column(0).to_pylist()
        return self._vocab_cache


    def coact(self, hook: str, neuron: int, k: int = 10, ranking: str = "pearson", tokens: int = 3) -> Result:
        """The k strongest co-activation partners of ``neuron`` by ``ranking`` (pearson: by
        |correlation|; jaccard), each with its statistics and its top tokens by mean activation."""
        self.check_neuron(hook, neuron)
        if ranking not in ("pearson", "jaccard"):
            raise QueryError("ranking must be pearson or jaccard.")
        return self.internal(
            """
            SELECT c.rank, c.hook_b AS hook, c.neuron_b AS neuron, c.pearson, c.jaccard, c.p_b_given_a,
                   c.lift, c.n_both,
                   (SELECT string_agg(v.token, ' | ' ORDER BY s.rank) FROM token_stats s JOIN vocab v USING (token_id)
                    WHERE s.hook = c.hook_b AND s.neuron = c.neuron_b AND s.rank <= ?) AS top_tokens
            FROM coactivation c
            WHERE c.hook_a = ? AND c.neuron_a = ? AND c.ranking = ? AND c.rank <= ?
            ORDER BY c.rank
            """,
            [tokens, hook, neuron, ranking, k],
        )


def _node_types(tree: Any):
    """Every query node type anywhere in a ``json_serialize_sql`` tree."""
    if isinstance(tree, dict):
        kind = tree.get("type")
        if isinstance(kind, str) and kind.endswith("_NODE"):
            yield kind
        for value in tree.values():
            yield from _node_types(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _node_types(value)


def _parse(query: str) -> list:
    try:
        return duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise QueryError(first_line(err)) from None


def _article(word: str) -> str:
    return "an" if word[:1] in "AEIOU" else "a"
