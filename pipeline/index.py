"""The rows of the index's tables (schemas: ``storage.tables``): each hook's rows from its merged
statistics (``hook_tables``, run by the reduce's hook parts), the tokens table a block of
sequences at a time, and the vocabulary.

Tables (contract, see README): ``tokens``, ``vocab``, ``top_examples``, ``bottom_examples``,
``neuron_stats``, ``histograms``, ``band_samples``, ``random_samples``, ``token_stats``,
``logit_effects``, ``coactivation``. A statistic the job left out gives an empty table with the same columns, so
every query runs on every store. Rows are sorted by their
natural key with row groups of 32k rows, so DuckDB reads one neuron's rows from a few groups.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from actscope.pipeline import sampling
from actscope.pipeline.moments import describe
from actscope.storage.bins import bin_edges, quantiles
from actscope.storage.store import Store
from actscope.storage.tables import ROW_GROUP, SCHEMAS, TableWriter


def tokens_table(store: Store, first: int = 0, last: int | None = None) -> pa.Table:
    """Sequences [first, last) of the corpus as rows of the ``tokens`` table."""
    last = store.n_seq if last is None else last
    ctx = store.spec.context_length
    data = store.read_tokens(first, last, ("tokens", "doc_ids", "doc_pos", "kinds"))
    return pa.table(
        {
            "seq_id": np.repeat(np.arange(first, last, dtype=np.int64), ctx),
            "pos": np.tile(np.arange(ctx, dtype=np.int32), last - first),
            "token_id": data["tokens"].reshape(-1),
            "doc_id": data["doc_ids"].reshape(-1),
            "doc_pos": data["doc_pos"].reshape(-1),
            "kind": pa.DictionaryArray.from_arrays(
                pa.array(data["kinds"].reshape(-1).astype(np.int8)), ["text", "special", "pad"]
            ),
        }
    )


def write_tokens_table(store: Store, block_seqs: int | None = None) -> None:
    """The ``tokens`` table, written a block of sequences at a time (100M tokens are gigabytes:
    the table is never whole in memory)."""
    block_seqs = block_seqs or max(1, (32 * ROW_GROUP) // store.spec.context_length)
    with TableWriter(store.table_url("tokens"), "tokens") as writer:
        for first in range(0, store.n_seq, block_seqs):
            writer.write(tokens_table(store, first, min(first + block_seqs, store.n_seq)))


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


def _ranked(index: np.ndarray, ctx: int, values: np.ndarray) -> dict[str, np.ndarray]:
    """Rows of a [rank, neuron] table of token indices (-1 = empty), by neuron then rank."""
    rank, neuron = np.nonzero(index >= 0)
    order = np.lexsort((rank, neuron))
    rank, neuron = rank[order], neuron[order]
    token = index[rank, neuron]
    return {
        "neuron": neuron.astype(np.int32),
        "rank": (rank + 1).astype(np.int16),
        "activation": values[rank, neuron].astype(np.float32),
        "seq_id": token // ctx,
        "pos": (token % ctx).astype(np.int32),
    }


def examples_table(merged: dict[str, dict[str, np.ndarray]], ctx: int, prefix: str) -> pa.Table:
    """One row per (hook, neuron, rank) that has an example; rank 1 is the most extreme."""
    return _per_hook(merged, lambda hook, m: _ranked(m[f"{prefix}_index"], ctx, m[f"{prefix}_values"]), SCHEMAS["top_examples"], f"{prefix}_index")


def band_samples_table(merged: dict[str, dict[str, np.ndarray]], ctx: int) -> pa.Table:
    """The sampled examples of each (neuron, band), rank 1 first (lowest sampling priority)."""
    lo, hi = sampling.band_edges()

    def rows(hook, m):
        index, value = m["band_index"], m["band_value"]  # [bands, width, s]
        band, neuron, slot = np.nonzero(index >= 0)
        token = index[band, neuron, slot]
        return {
            "neuron": neuron.astype(np.int32), "band": band.astype(np.int16), "lo": lo[band], "hi": hi[band],
            "rank": (slot + 1).astype(np.int16), "activation": value[band, neuron, slot],
            "seq_id": token // ctx, "pos": (token % ctx).astype(np.int32),
        }

    return _per_hook(merged, rows, SCHEMAS["band_samples"], "band_index")


def random_samples_table(merged: dict[str, dict[str, np.ndarray]], ctx: int) -> pa.Table:
    """Every neuron's value on the job's random tokens (the same tokens for every neuron)."""

    def rows(hook, m):
        index = np.broadcast_to(m["random_index"][:, None], m["random_value"].shape)
        return _ranked(np.ascontiguousarray(index), ctx, m["random_value"])

    return _per_hook(merged, rows, SCHEMAS["random_samples"], "random_index")


def token_stats_table(merged: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """Each neuron's vocabulary tokens of highest mean activation, rank 1 first."""

    def rows(hook, m):
        rank, neuron = np.nonzero(m["token_top_ids"] >= 0)
        order = np.lexsort((rank, neuron))
        rank, neuron = rank[order], neuron[order]
        return {
            "neuron": neuron.astype(np.int32), "rank": (rank + 1).astype(np.int16),
            "token_id": m["token_top_ids"][rank, neuron].astype(np.int32),
            "mean_activation": m["token_top_mean"][rank, neuron], "count": m["token_top_count"][rank, neuron],
        }

    return _per_hook(merged, rows, SCHEMAS["token_stats"], "token_top_ids")


def logit_effects_table(logits: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """Each neuron's most promoted and most suppressed output tokens, rank 1 strongest."""

    def rows(hook, m):
        k, width = m["promote_ids"].shape
        parts = []
        for direction in ("promote", "suppress"):
            rank, neuron = np.divmod(np.arange(k * width), width)
            parts.append({
                "neuron": neuron.astype(np.int32), "direction": np.full(k * width, direction),
                "rank": (rank + 1).astype(np.int16), "token_id": m[f"{direction}_ids"].reshape(-1),
                "effect": m[f"{direction}_values"].reshape(-1),
            })
        columns = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
        order = np.lexsort((columns["rank"], columns["direction"], columns["neuron"]))
        return {name: c[order] for name, c in columns.items()}

    return _per_hook(logits, rows, SCHEMAS["logit_effects"], "promote_ids")


QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def histogram_table(merged: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """The non-empty bins of every neuron: hook, neuron, bin, lo, hi, count."""
    lo, hi = bin_edges()

    def rows(hook, stats):
        neuron, b = np.nonzero(stats["hist"])
        return {"neuron": neuron.astype(np.int32), "bin": b.astype(np.int16), "lo": lo[b], "hi": hi[b], "count": stats["hist"][neuron, b]}

    return _per_hook(merged, rows, SCHEMAS["histograms"], "hist")


def stats_table(merged: dict[str, dict[str, np.ndarray]]) -> pa.Table:
    """One row per neuron: moments, range, density, and quantiles read from the histogram."""

    def rows(hook, stats):
        described = describe(stats)
        columns = {"neuron": np.arange(len(described["mean"]), dtype=np.int32)}
        columns.update({name: described[name] for name in ("count", "mean", "std", "min", "max", "frac_active", "skew", "kurtosis")})
        if "hist" in stats:
            qs = quantiles(stats["hist"], tuple(QUANTILES.values()), stats["min"], stats["max"])
            columns.update(zip(QUANTILES, qs))
        else:  # no histogram, no quantiles: NULL
            columns.update({name: pa.nulls(len(columns["neuron"]), pa.float64()) for name in QUANTILES})
        return columns

    return _per_hook(merged, rows, SCHEMAS["neuron_stats"])


def _per_hook(merged: dict[str, dict[str, np.ndarray]], rows, schema: pa.Schema | None = None, needs: str | None = None) -> pa.Table:
    """One table over every hook: ``rows(hook, stats)`` gives a hook's columns; a dictionary-
    encoded ``hook`` column goes first, hooks in sorted order. Hooks without the ``needs`` array
    are skipped; with none left, the table is empty with ``schema``'s columns."""
    parts = []
    for hook in sorted(merged):
        if needs is not None and needs not in merged[hook]:
            continue
        columns = rows(hook, merged[hook])
        n = len(next(iter(columns.values())))
        table = pa.table({"hook": pa.array([hook] * n).dictionary_encode(), **columns})
        parts.append(table.cast(schema) if schema is not None else table)
    if not parts:
        return schema.empty_table()
    return pa.concat_tables(parts).unify_dictionaries().combine_chunks()


def hook_tables(merged: dict[str, dict[str, np.ndarray]], ctx: int, logits: dict[str, dict[str, np.ndarray]]) -> dict[str, pa.Table]:
    """The rows of every per-hook table for the hooks in ``merged`` (the reduce gives one)."""
    return {
        "top_examples": examples_table(merged, ctx, "top"),
        "bottom_examples": examples_table(merged, ctx, "bottom"),
        "neuron_stats": stats_table(merged),
        "histograms": histogram_table(merged),
        "band_samples": band_samples_table(merged, ctx),
        "random_samples": random_samples_table(merged, ctx),
        "token_stats": token_stats_table(merged),
        "logit_effects": logit_effects_table(logits),
    }
