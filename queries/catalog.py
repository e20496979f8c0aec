"""SQL over a store: a locked-down DuckDB connection with the index's tables as views.

The connection can read the store's own index files and nothing else: external access is off
(no other files, no network, no ATTACH, no INSTALL/LOAD), Python replacement scans are off, and
the configuration is locked. User SQL is one SELECT (or EXPLAIN) statement; anything else is
refused before it runs, and a query past its time limit is interrupted.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Self

import duckdb
import fsspec
import pyarrow as pa

from storage.errors import QueryError, StoreError
from storage.store import Store

TABLES = (
    "tokens", "vocab", "top_examples", "bottom_examples", "neuron_stats", "histograms",
    "band_samples", "random_samples", "token_stats", "logit_effects", "coactivation",
)

_MACROS = """
CREATE MACRO top_with_context(h, n, k := 20, w := 8) AS TABLE
SELECT e.rank, e.activation, e.seq_id, e.pos,
       coalesce(string_agg(v.token, '' ORDER BY t.pos) FILTER (WHERE t.pos < e.pos), '') AS before,
       any_value(v.token) FILTER (WHERE t.pos = e.pos) AS token,
       coalesce(string_agg(v.token, '' ORDER BY t.pos) FILTER (WHERE t.pos > e.pos), '') AS after
FROM top_examples e
JOIN tokens t ON t.seq_id = e.seq_id AND t.pos BETWEEN e.pos - w AND e.pos + w AND t.kind <> 'pad'
JOIN vocab v ON v.token_id = t.token_id
WHERE e.hook = h AND e.neuron = n AND e.rank <= k
GROUP BY ALL
ORDER BY e.rank;
"""

_ALLOWED = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


@dataclass(frozen=True)
class Result:
    columns: list[str]
    rows: list[tuple[Any, ...]]

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row)) for row in self.rows]


class Catalog:
    """The query side of a store. ``Catalog(url).sql("SELECT ...")``; see also :meth:`top`."""

    def __init__(self, store_url: str, *, timeout: float = 60.0):
        self.store = Store.open(store_url)
        if not self.store.status.get("complete"):
            raise StoreError(f"{store_url}: the job has not finished; run it again to complete it, then query.")
        self.timeout = timeout
        self.model = self.store.model
        self.con = self._connect()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        con = duckdb.connect(":memory:", config={"python_enable_replacements": False})
        index = self._local_index()
        for table in TABLES:
            url = os.path.join(index, f"{table}.parquet")
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_literal(url)})")
        con.execute(_MACROS)
        con.execute(f"SET allowed_directories = [{_literal(index)}]")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        return con

    def _local_index(self) -> str:
        """The index folder on this machine. A store on object storage (any fsspec URL) has its
        Parquet tables copied to a temporary folder first: DuckDB reads object stores only through
        its httpfs extension, which a locked-down (and possibly offline) connection cannot load."""
        fs, path = fsspec.core.url_to_fs(self.store.index_url)
        if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return path
        self._copy = tempfile.TemporaryDirectory(prefix="actscope-index-")
        fs.get([f"{path}/{t}.parquet" for t in TABLES], self._copy.name + "/")
        return self._copy.name

    def close(self) -> None:
        self.con.close()
        if getattr(self, "_copy", None) is not None:
            self._copy.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- SQL ------------------------------------------------------------------------------

    def sql(self, query: str, params: list[Any] | None = None) -> Result:
        """Run one read-only statement (user SQL is welcome: anything else is refused)."""
        statements = _parse(query)
        if len(statements) != 1:
            raise QueryError(f"One statement at a time, please; got {len(statements)}.")
        if statements[0].type not in _ALLOWED:
            kind = statements[0].type.name
            raise QueryError(f"Only SELECT queries are allowed (the store is read-only); this is {_article(kind)} {kind} statement.")
        def fetch() -> Result:
            cursor = self.con.execute(query, params or [])
            return Result([d[0] for d in cursor.description], cursor.fetchall())

        return self._guarded(fetch)

    def arrow(self, query: str, params: list[Any] | None = None) -> pa.Table:
        """Run one of actscope's own queries and return an Arrow table (bulk reads for reports)."""
        return self._guarded(lambda: self.con.sql(query, params=params or None).to_arrow_table())

    def _guarded(self, fetch):
        """Run ``fetch()`` under the time limit, with DuckDB's errors made into QueryErrors."""
        timer = threading.Timer(self.timeout, self.con.interrupt)
        timer.start()
        try:
            return fetch()
        except duckdb.InterruptException:
            raise QueryError(f"The query ran past {self.timeout:g} s and was interrupted.") from None
        except duckdb.PermissionException as err:
            raise QueryError(f"Refused: the query may only read this store's tables. ({_first_line(err)})") from None
        except duckdb.Error as err:
            raise QueryError(_first_line(err)) from None
        finally:
            timer.cancel()

    # -- neuron questions -----------------------------------------------------------------

    def check_neuron(self, hook: str, neuron: int) -> None:
        widths = self.model["hook_widths"]
        if hook not in widths:
            raise QueryError(f"{hook} was not recorded in this store; recorded hooks: {', '.join(widths)}.")
        if not 0 <= neuron < widths[hook]:
            raise QueryError(f"neuron {neuron} is out of range: {hook} has {widths[hook]} neurons (0..{widths[hook] - 1}).")

    def top(self, hook: str, neuron: int, k: int = 20, window: int = 8) -> Result:
        """The k examples that most activate ``neuron``, each with ``window`` tokens either side."""
        self.check_neuron(hook, neuron)
        if k <= 0 or window < 0:
            raise QueryError("k must be positive and window non-negative.")
        return self.sql("SELECT * FROM top_with_context(?, ?, k := ?, w := ?)", [hook, neuron, k, window])


    def coact(self, hook: str, neuron: int, k: int = 10, ranking: str = "pearson", tokens: int = 3) -> Result:
        """The k strongest co-activation partners of ``neuron`` by ``ranking`` (pearson: by
        |correlation|; jaccard), each with its statistics and its top tokens by mean activation."""
        self.check_neuron(hook, neuron)
        if ranking not in ("pearson", "jaccard"):
            raise QueryError("ranking must be pearson or jaccard.")
        return self.sql(
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


def _parse(query: str) -> list:
    try:
        return duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise QueryError(_first_line(err)) from None


def _article(word: str) -> str:
    return "an" if word[:1] in "AEIOU" else "a"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0]
