"""User SQL in a child process with hard limits.

DuckDB's ``memory_limit`` bounds its buffer manager, not every allocation: ``SELECT
length(list(range(300000000)))`` ran 74 s and reached 14.7 GB resident under a 1 GB limit, and
its interrupt is not seen until the operator ends. So user SQL runs in a child process whose data
segment is capped (``RLIMIT_DATA``: the same query fails at once there), and whose wall clock is
the parent's: past the deadline the child is killed and a fresh one serves the next query. The
child opens the same locked-down connection as the parent (``lockdown`` below), fetches
at most ``max_rows`` rows and ``max_bytes`` bytes, and sends them back.

The child is a bare ``python -c`` that imports DuckDB alone (0.1 s, not the parent's modules: a
``multiprocessing`` spawn re-imports the parent's ``__main__``, 2 s for a script that imports
torch), receives the lockdown statements and then queries as pickled frames on its stdin, and
answers on its stdout. It is started on the first user query of a catalog and reused after that;
actscope's own queries (``top``, ``coact``, pages) run in the parent, where their SQL is known.
"""

from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import duckdb
import pyarrow as pa

from actscope.storage.errors import QueryError


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
    table: pa.Table  # read from the child's Arrow IPC stream, over the received bytes (no copy)
    truncated: bool


class Sandbox:
    """One child process running user SQL over a store's index files."""

    def __init__(self, files: dict[str, str], limits: Limits):
        self.files, self.limits = files, limits
        self._process: subprocess.Popen | None = None
        self._temp = None

    def run(self, query: str, params: list | None) -> Fetched:
        self._start()
        try:
            _send(self._process.stdin, (query, list(params or [])))
        except (BrokenPipeError, OSError):
            self.close()
            raise QueryError("The query process stopped unexpectedly; run the query again.") from None
        ready, _, _ = select.select([self._process.stdout], [], [], self.limits.timeout)
        if not ready:
            self.close()  # killed: DuckDB does not always see an interrupt inside one large operator
            raise QueryError(f"The query ran past {self.limits.timeout:g} s and was stopped.")
        try:
            kind, *payload = _receive(self._process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            self.close()
            raise QueryError(_memory_message(self.limits)) from None
        if kind == "error":
            name, message = payload
            if name in ("OutOfMemoryException", "MemoryError"):
                raise QueryError(_memory_message(self.limits))
            if name == "PermissionException":
                raise QueryError(f"Refused: the query may only read this store's tables. ({message})")
            if name == "SetupError":
                self.close()
            raise QueryError(message)
        data, truncated = payload
        return Fetched(pa.ipc.open_stream(pa.py_buffer(data)).read_all(), truncated)

    def _start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            return
        self.close()
        self._temp = tempfile.TemporaryDirectory(prefix="actscope-duckdb-")
        self._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        setup = {"sql": lockdown_statements(self.files, self._temp.name, self.limits), "limits": asdict(self.limits)}
        _send(self._process.stdin, setup)

    def close(self) -> None:
        if self._process is not None:
            try:
                _send(self._process.stdin, None)
                self._process.stdin.close()
                self._process.wait(timeout=0.5)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
            self._process.stdout.close()
            self._process = None
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None


def _memory_message(limits: Limits) -> str:
    return (
        f"The query needed more memory than the query layer allows ({limits.memory >> 20:,} MiB) and was stopped. "
        "Aggregate or filter before building large lists or strings, or add a LIMIT."
    )


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    header = stream.read(8)
    if len(header) < 8:
        raise EOFError
    (size,) = struct.unpack("<Q", header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


# The child: DuckDB alone, frames on its stdin and stdout (anything printed goes to stderr).
_CHILD = r"""
import os, pickle, resource, struct, sys
out = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)
inp = sys.stdin.buffer

def receive():
    header = inp.read(8)
    if len(header) < 8:
        sys.exit(0)
    return pickle.loads(inp.read(struct.unpack("<Q", header)[0]))

def send(message):
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    out.write(struct.pack("<Q", len(data)) + data)
    out.flush()

def first_line(err):
    return (str(err).strip().splitlines() or [""])[0][:500]

setup = receive()
limits = setup["limits"]
import duckdb
import pyarrow as pa
if hasattr(resource, "RLIMIT_DATA"):
    resource.setrlimit(resource.RLIMIT_DATA, (limits["memory"], limits["memory"]))
con = duckdb.connect(":memory:", config={"python_enable_replacements": False})
failed = None
try:
    for statement in setup["sql"]:
        con.execute(statement)
except duckdb.Error as err:
    failed = first_line(err)
while True:
    message = receive()
    if message is None:
        break
    if failed is not None:
        send(("error", "SetupError", failed))
        continue
    query, params = message
    reader = None
    try:
        reader = con.sql(query, params=params or None).to_arrow_reader(1024)
        batches, n, size, truncated = [], 0, 0, False
        for batch in reader:
            batches.append(batch)
            n, size = n + batch.num_rows, size + batch.nbytes
            if n > limits["max_rows"] or size > limits["max_bytes"]:
                truncated = True
                break
        table = pa.Table.from_batches(batches, schema=reader.schema).slice(0, limits["max_rows"])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        send(("ok", sink.getvalue().to_pybytes(), truncated))
    except duckdb.Error as err:
        send(("error", type(err).__name__, first_line(err)))
    except MemoryError:
        send(("error", "MemoryError", ""))
    except Exception as err:
        send(("error", type(err).__name__, "the result cannot be returned (" + first_line(err) + ")"))
    finally:
        if reader is not None:
            reader.close()  # a cut result is not drained: closed, or the next query finds it open
"""


# -- the locked-down connection: the catalog's (actscope's own SQL) and the child's (user SQL) --

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


def lockdown(files: dict[str, str], limits: Limits) -> tuple[duckdb.DuckDBPyConnection, tempfile.TemporaryDirectory]:
    """An in-memory connection with a view per table file, allowed to read exactly those files,
    spilling only into a private temp folder (returned: the caller removes it), its memory,
    threads and temp space bounded and its configuration locked."""
    temp = tempfile.TemporaryDirectory(prefix="actscope-duckdb-")
    con = duckdb.connect(":memory:", config={"python_enable_replacements": False})
    try:
        for statement in lockdown_statements(files, temp.name, limits):
            con.execute(statement)
        for table in files:  # a truncated or foreign file fails here, not in a user's query
            con.execute(f"SELECT * FROM {table} LIMIT 0").fetchall()
    except BaseException:
        con.close()
        temp.cleanup()
        raise
    return con, temp


def lockdown_statements(files: dict[str, str], temp: str, limits: Limits) -> list[str]:
    """The SQL that sets a fresh connection up and locks it (the sandbox runs the same)."""
    return [
        *(f"CREATE VIEW {table} AS SELECT * FROM read_parquet({_literal(path)})" for table, path in files.items()),
        _MACROS,
        f"SET temp_directory = {_literal(temp)}",
        f"SET max_temp_directory_size = '{limits.temp}B'",
        f"SET memory_limit = '{limits.duckdb_memory}B'",
        f"SET threads = {int(limits.threads)}",
        f"SET allowed_paths = [{', '.join(_literal(p) for p in files.values())}]",
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ]


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
