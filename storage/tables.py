"""The index's tables: their names, their schemas (declared here and nowhere else) and how they are
written.

Every table is one Parquet file, ``<store>/index/<table>.parquet``, zstd-compressed, its rows sorted
by their natural key, in row groups of ``ROW_GROUP`` rows (DuckDB reads one neuron's rows from a
few groups). A table is written in blocks by :class:`TableWriter`, which holds rows back until a
whole row group can be written: the file's row groups are the same whatever the blocks were
(the reduce writes a table from many parts, the tokens table comes a block of sequences at a
time), and no table is ever whole in memory.
"""

from __future__ import annotations

import contextlib
import os
from typing import Self

import pyarrow as pa
import pyarrow.parquet as pq

from actscope.storage.store import filesystem, local_path

ROW_GROUP = 32768

TABLES = (
    "tokens", "vocab", "top_examples", "bottom_examples", "neuron_stats", "histograms",
    "band_samples", "random_samples", "token_stats", "logit_effects", "coactivation",
)

#: The tables with one part per hook (written by the reduce's hook parts, in sorted hook order).
HOOK_TABLES = (
    "top_examples", "bottom_examples", "neuron_stats", "histograms", "band_samples", "random_samples",
    "token_stats", "logit_effects",
)

_HOOK = pa.dictionary(pa.int32(), pa.string())
_EXAMPLE = [("neuron", pa.int32()), ("rank", pa.int16()), ("activation", pa.float32()), ("seq_id", pa.int64()), ("pos", pa.int32())]
_EXAMPLES = pa.schema([("hook", _HOOK), *_EXAMPLE])
SCHEMAS = {
    "tokens": pa.schema([
        ("seq_id", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()), ("doc_id", pa.int64()), ("doc_pos", pa.int32()),
        ("kind", pa.dictionary(pa.int8(), pa.string())),
    ]),
    "vocab": pa.schema([("token_id", pa.int32()), ("token", pa.string()), ("piece", pa.string())]),
    "top_examples": _EXAMPLES,
    "bottom_examples": _EXAMPLES,
    "neuron_stats": pa.schema([
        ("hook", _HOOK), ("neuron", pa.int32()), ("count", pa.int64()), ("mean", pa.float64()), ("std", pa.float64()),
        ("min", pa.float32()), ("max", pa.float32()), ("frac_active", pa.float64()), ("skew", pa.float64()),
        ("kurtosis", pa.float64()), ("p50", pa.float64()), ("p90", pa.float64()), ("p99", pa.float64()),
    ]),
    "histograms": pa.schema([("hook", _HOOK), ("neuron", pa.int32()), ("bin", pa.int16()), ("lo", pa.float64()), ("hi", pa.float64()), ("count", pa.int64())]),
    "band_samples": pa.schema([("hook", _HOOK), ("neuron", pa.int32()), ("band", pa.int16()), ("lo", pa.float64()), ("hi", pa.float64()), *_EXAMPLE[1:]]),
    "random_samples": _EXAMPLES,
    "token_stats": pa.schema([("hook", _HOOK), ("neuron", pa.int32()), ("rank", pa.int16()), ("token_id", pa.int32()), ("mean_activation", pa.float64()), ("count", pa.int64())]),
    "logit_effects": pa.schema([("hook", _HOOK), ("neuron", pa.int32()), ("direction", pa.string()), ("rank", pa.int16()), ("token_id", pa.int32()), ("effect", pa.float32())]),
    "coactivation": pa.schema([
        ("hook_a", _HOOK), ("neuron_a", pa.int32()), ("hook_b", _HOOK), ("neuron_b", pa.int32()), ("ranking", pa.string()),
        ("rank", pa.int16()), ("pearson", pa.float32()), ("jaccard", pa.float32()), ("p_b_given_a", pa.float32()),
        ("lift", pa.float32()), ("n_both", pa.int64()),
    ]),
}
assert set(SCHEMAS) == set(TABLES)


class TableWriter:
    """Writes one table to ``url`` from blocks of rows, in the row groups of one whole write. A
    local table is written to a temporary name and renamed into place when closed: a reader never
    sees half of it, and a link at ``url`` is replaced, never written through."""

    def __init__(self, url: str, name: str):
        self.schema = SCHEMAS[name]
        fs, path = filesystem(url)
        fs.makedirs(fs._parent(path), exist_ok=True)
        self._local = local_path(url)
        if self._local is not None:
            self._tmp = os.path.join(os.path.dirname(self._local), f".{os.path.basename(self._local)}.tmp-{os.getpid()}")
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in close() or __exit__
        else:
            self._file = fs.open(path, "wb")
        self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")
        self._held: pa.Table | None = None

    def write(self, block: pa.Table) -> None:
        block = block.select(self.schema.names).cast(self.schema)
        held = block if self._held is None else pa.concat_tables([self._held, block])
        whole = held.num_rows // ROW_GROUP * ROW_GROUP
        if whole:
            self._writer.write_table(held.slice(0, whole), row_group_size=ROW_GROUP)
            held = held.slice(whole)
        self._held = held

    def close(self) -> None:
        try:
            if self._held is not None and self._held.num_rows:
                self._writer.write_table(self._held, row_group_size=ROW_GROUP)
            self._writer.close()
        finally:
            self._file.close()
        if self._local is not None:
            os.replace(self._tmp, self._local)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
            return
        self._file.close()  # a failed write leaves nothing at the table's name
        if self._local is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._tmp)


def write_table(url: str, name: str, table: pa.Table) -> None:
    with TableWriter(url, name) as writer:
        writer.write(table)


def read_table(url: str) -> pa.Table:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return pq.read_table(f)
