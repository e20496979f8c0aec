"""User SQL in a child process with hard limits.

DuckDB's ``memory_limit`` bounds its buffer manager, not every allocation: ``SELECT
length(list(range(300000000)))`` ran 74 s and reached 14.7 GB resident under a 1 GB limit, and
its interrupt is not seen until the operator ends. So user SQL runs in a child process whose data
segment is capped (``RLIMIT_DATA``: the same query fails at once there), and whose wall clock is
the parent's: past the deadline the child is killed and a fresh one serves the next query. The
child opens the same locked-down connection as the parent (``queries.catalog.lockdown``), fetches
at most ``max_rows`` rows and ``max_bytes`` bytes, and sends them back.

The child is started on the first user query of a catalog (0.2-0.3 s) and reused after that;
actscope's own queries (``top``, ``coact``, pages) run in the parent, where their SQL is known.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
from dataclasses import dataclass

from storage.errors import QueryError


@dataclass(frozen=True)
class Limits:
    """What one user query may use (the README's query section quotes these numbers)."""

    timeout: float = 60.0  # seconds, connection to the last row received
    max_rows: int = 100_000  # rows returned; a larger result is refused, or cut where the caller asks
    max_bytes: int = 256 << 20  # bytes of result (Arrow's count) returned
    memory: int = 2 << 30  # the child's data segment (RLIMIT_DATA)
    duckdb_memory: int = 1 << 30  # DuckDB's own buffer manager (spills to the temp folder past it)
    temp: int = 1 << 30  # bytes DuckDB may spill into its private temp folder
    threads: int = 2

    MAX_TIMEOUT = 3600.0
    MAX_ROWS = 10_000_000

    def __post_init__(self):
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not (0 < timeout <= self.MAX_TIMEOUT):
            raise QueryError(f"timeout: give a number of seconds above 0 and at most {self.MAX_TIMEOUT:g}; got {timeout!r}.")
        rows = self.max_rows
        if isinstance(rows, bool) or not isinstance(rows, int) or not (0 < rows <= self.MAX_ROWS):
            raise QueryError(f"max_rows: give a whole number above 0 and at most {self.MAX_ROWS:,}; got {rows!r}.")


@dataclass(frozen=True)
class Fetched:
    columns: list[str]
    rows: list[tuple]
    truncated: bool


class Sandbox:
    """One child process running user SQL over a store's index files."""

    def __init__(self, files: dict[str, str], limits: Limits):
        self.files, self.limits = files, limits
        self._process = self._conn = None

    def run(self, query: str, params: list | None) -> Fetched:
        self._start()
        try:
            self._conn.send((query, list(params or [])))
        except (BrokenPipeError, OSError):
            self.close()
            raise QueryError("The query process stopped unexpectedly; run the query again.") from None
        if not self._conn.poll(self.limits.timeout):
            self.close()  # killed: DuckDB does not always see an interrupt inside one large operator
            raise QueryError(f"The query ran past {self.limits.timeout:g} s and was stopped.")
        try:
            kind, *payload = self._conn.recv()
        except (EOFError, OSError):
            self.close()
            raise QueryError(_memory_message(self.limits)) from None
        if kind == "error":
            name, message = payload
            if name == "OutOfMemoryException" or name == "MemoryError":
                raise QueryError(_memory_message(self.limits))
            if name == "PermissionException":
                raise QueryError(f"Refused: the query may only read this store's tables. ({message})")
            raise QueryError(message)
        return Fetched(*payload)

    def _start(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        self.close()
        context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        parent, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self.files, self.limits), daemon=True, name="actscope-sql")
        self._process.start()
        child.close()
        self._conn = parent

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(timeout=0.5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = None


def _memory_message(limits: Limits) -> str:
    return (
        f"The query needed more memory than the query layer allows ({limits.memory >> 20:,} MiB) and was stopped. "
        "Aggregate or filter before building large lists or strings, or add a LIMIT."
    )


def _serve(conn, files: dict[str, str], limits: Limits) -> None:
    """The child: cap the data segment, open the locked-down connection, answer queries."""
    import duckdb

    from queries.catalog import lockdown

    if hasattr(resource, "RLIMIT_DATA"):
        resource.setrlimit(resource.RLIMIT_DATA, (limits.memory, limits.memory))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    con, temp = lockdown(files, limits)
    try:
        while True:
            message = conn.recv()
            if message is None:
                return
            query, params = message
            try:
                conn.send(("ok", *_fetch(con, query, params, limits)))
            except duckdb.Error as err:
                conn.send(("error", type(err).__name__, _first_line(err)))
            except MemoryError:
                conn.send(("error", "MemoryError", ""))
            except Exception as err:  # noqa: BLE001 - e.g. a type Arrow cannot carry: the query fails, the process stays
                conn.send(("error", type(err).__name__, f"the result cannot be returned ({_first_line(err)})"))
    except (EOFError, KeyboardInterrupt):
        return
    finally:
        con.close()
        temp.cleanup()


def _fetch(con, query: str, params: list, limits: Limits):
    relation = con.sql(query, params=params or None)
    columns = list(relation.columns)
    reader = relation.to_arrow_reader(1024)
    rows: list[tuple] = []
    size, truncated = 0, False
    for batch in reader:
        size += batch.nbytes
        values = [column.to_pylist() for column in batch.columns]
        rows.extend(zip(*values, strict=True) if values else [() for _ in range(batch.num_rows)])
        if len(rows) > limits.max_rows or size > limits.max_bytes:
            truncated = True
            break
    return columns, rows[: limits.max_rows], truncated


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0][:500]
