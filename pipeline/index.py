"""Write the job's results as Parquet tables under ``<store>/index/``.

Tables (contract, see README): ``tokens``, ``vocab``, ``top_examples``, ``bottom_examples``,
``neuron_stats``, ``histograms``. Rows are sorted by their
natural key with row groups of 32k rows, so DuckDB reads one neuron's rows from a few groups.
"""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.histogram import bin_edges, quantiles
from pipeline.moments import describe
from storage.store import Store

ROW_GROUP = 32768


def write_table(store: Store, name: str, table: pa.Table) -> None:
    fs, path = fsspec.core.url_to_fs(store.table_url(name))
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f, row_group_size=ROW_GROUP, compression="zstd")


def tokens_table(store: Store) -> pa.Table:
    n_seq, ctx = store.n_seq, store.spec.context_length
    data = store.read_tokens(0, n_seq, ("tokens", "doc_ids", "doc_pos", "kinds"))
    return pa.table(
        {
            "seq_id": np.repeat(np.arange(n_seq, dtype=np.int64), ctx),
            "pos": np.tile(np.arange(ctx, dtype=np.int32), n_seq),
            "token_id": data["tokens"].reshape(-1),
            "doc_id": data["doc_ids"].reshape(-1),
            "doc_pos": data["doc_pos"].reshape(-1),
            "kind": pa.DictionaryArray.from_arrays(
                pa.array(data["kinds"].reshape(-1).astype(np.int8)), ["text", "special", "pad"]
            ),
        }
    )


def running_text(tokenizer) -> list[str]:
    """Each token's text as it appears inside running text, leading space included, so that a
    window's tokens concatenate into readable text. Decoding a token alone loses that space for
    WordPiece ("##" pieces glue, whole words do not) and SentencePiece; decoding it after an
    anchor token and removing the anchor's text keeps it, for every tokenizer family."""
    ids = list(range(len(tokenizer)))
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    alone = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    if not anchor:
        return alone
    prefix = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    paired = tokenizer.batch_decode([anchor + [i] for i in ids], clean_up_tokenization_spaces=False)
    return [p[len(prefix):] if p.startswith(prefix) else a for p, a in zip(paired, alone)]


def vocab_table(tokenizer) -> pa.Table:
    ids = list(range(len(tokenizer)))
    return pa.table(
        {
            "token_id": pa.array(ids, pa.int32()),
            "token": running_text(tokenizer),
            "piece": tokenizer.convert_ids_to_tokens(ids),
        }
    )


def examples_table(merged: dict[str, dict[str, np.ndarray]], ctx: int, prefix: str) -> pa.Table:
    """One row per (hook, neuron, rank) that has an example; rank 1 is the most extreme."""
    columns = {k: [] for k in ("hook", "neuron", "rank", "activation", "seq_id", "pos")}
    for hook in sorted(merged):
        values, index = merged[hook][f"{prefix}_values"], merged[hook][f"{prefix}_index"]
        k, width = values.shape
        rank, neuron = np.nonzero(index >= 0)
        order = np.lexsort((rank, neuron))
        rank, neuron = rank[order], neuron[order]
        token = index[rank, neuron]
        columns["hook"].append(np.full(len(rank), hook, dtype=object))
        columns["neuron"].append(neuron.astype(np.int32))
        columns["rank"].append((rank + 1).astype(np.int16))
        columns["activation"].append(values[rank, neuron].astype(np.float32))
        columns["seq_id"].append(token // ctx)
        columns["pos"].append((token % ctx).astype(np.int32))
    table = {name: np.concatenate(parts) for name, parts in columns.items()}
    table["hook"] = pa.array(table["hook"], pa.string()).dictionary_encode()
    return pa.table(table)


QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def histogram_table(merged: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """The non-empty bins of every neuron: hook, neuron, bin, lo, hi, count."""
    lo, hi = bin_edges()

    def rows(hook, stats):
        neuron, b = np.nonzero(stats["hist"])
        return {"neuron": neuron.astype(np.int32), "bin": b.astype(np.int16), "lo": lo[b], "hi": hi[b], "count": stats["hist"][neuron, b]}

    return _per_hook(merged, rows)


def stats_table(merged: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """One row per neuron: moments, range, density, and quantiles read from the histogram."""

    def rows(hook, stats):
        described = describe(stats)
        columns = {"neuron": np.arange(len(described["mean"]), dtype=np.int32)}
        columns.update({name: described[name] for name in ("count", "mean", "std", "min", "max", "frac_active", "skew", "kurtosis")})
        qs = quantiles(stats["hist"], tuple(QUANTILES.values()), stats["min"], stats["max"])
        columns.update(zip(QUANTILES, qs))
        return columns

    return _per_hook(merged, rows)


def _per_hook(merged: dict[str, dict[str, np.ndarray]], rows) -> pa.Table:
    """One table over every hook: ``rows(hook, stats)`` gives a hook's columns; a dictionary-
    encoded ``hook`` column goes first, hooks in sorted order."""
    parts = []
    for hook in sorted(merged):
        columns = rows(hook, merged[hook])
        n = len(next(iter(columns.values())))
        parts.append(pa.table({"hook": pa.array([hook] * n).dictionary_encode(), **columns}))
    return pa.concat_tables(parts).unify_dictionaries().combine_chunks()


def build_index(store: Store, merged: dict[str, dict[str, np.ndarray]], tokenizer) -> None:
    ctx = store.spec.context_length
    write_table(store, "tokens", tokens_table(store))
    write_table(store, "vocab", vocab_table(tokenizer))
    write_table(store, "top_examples", examples_table(merged, ctx, "top"))
    write_table(store, "bottom_examples", examples_table(merged, ctx, "bottom"))
    write_table(store, "neuron_stats", stats_table(merged))
    write_table(store, "histograms", histogram_table(merged))
