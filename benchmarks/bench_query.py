"""Query latency on a store whose index holds 100M tokens, built from a small store (no forward).

A small job runs (a random 2-layer GPT-2 with all-MiniLM-L6-v2's tokenizer over the standard
library's docstrings); its store is then grown to ``--tokens`` corpus tokens by tiling its
sequences: the Zarr token arrays and the ``tokens`` Parquet table (same schema and row groups as
the index step writes) are rewritten at that size, and every example's ``seq_id`` moves to a
random copy of its sequence, so the windows read are spread over the whole corpus and the
answers are the small store's.

Measured, side by side in one run: ``top`` (20 examples, 8 tokens of context) through the Python
API, warm (one connection, median of many neurons) and cold (a new connection each time, connect
included); the same through the ``top_with_context`` SQL macro over the tokens table; and two
README queries through ``catalog.sql`` (the sandbox process: its start is in the cold number).
Prints JSON. Usage: python benchmarks/bench_query.py [--tokens 100000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml
import zarr
from bench_export import build_model

import actscope
from actscope.jobs.demo import stdlib_docstrings
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.pipeline.index import ROW_GROUP, write_tokens_table
from actscope.storage.store import Store

HOOK = "blocks.1.mlp.hook_post"
README = {
    "dead neurons": "SELECT hook, neuron FROM neuron_stats WHERE frac_active = 0",
    "top tokens of a neuron": (
        "SELECT s.rank, v.token, s.mean_activation, s.count FROM token_stats s JOIN vocab v USING (token_id) "
        "WHERE s.hook = 'blocks.1.mlp.hook_post' AND s.neuron = 17 ORDER BY s.rank"
    ),
}


def small_store(root: Path, tokens: int) -> str:
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_docstrings()))
    job = {
        "model": build_model(root), "dataset": {"path": "json", "data_files": [str(corpus)], "max_tokens": tokens},
        "context_length": 128, "hooks": [HOOK], "top_k": 20, "store": str(root / "small.zarr"), "workers": 1,
        "statistics": ["tokens"],
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    run_job(load_job(root / "job.yaml"), use_ray=False)
    return job["store"]


def grow(small: str, big: str, n_tokens: int, seed: int = 0) -> int:
    """Copy ``small`` to ``big`` with its corpus tiled to ``n_tokens`` tokens; returns n_seq."""
    shutil.copytree(small, big)
    store = Store.open(big, writable=True)
    ctx, n_small = store.spec.context_length, store.n_seq
    n_seq = n_tokens // ctx
    base = store.read_tokens(0, n_small, tuple(Store.TOKEN_ARRAYS))
    for name, dtype in Store.TOKEN_ARRAYS.items():
        array = store.group.create_array(name, shape=(n_seq, ctx), dtype=dtype, chunks=(store.spec.shard_size, ctx),
                                         compressors=zarr.codecs.ZstdCodec(level=1), fill_value=0, overwrite=True)
        block = store.spec.shard_size * 64
        for first in range(0, n_seq, block):
            rows = np.arange(first, min(first + block, n_seq)) % n_small
            array[first : first + len(rows)] = base[name][rows]
    store.update_status(n_seq=n_seq)
    write_tokens_table(store)
    path = Path(big) / "index" / "top_examples.parquet"
    table = pq.read_table(path)
    copies = np.random.default_rng(seed).integers(0, n_seq // n_small, table.num_rows)
    seq = table.column("seq_id").to_numpy() + copies * n_small
    pq.write_table(table.set_column(table.schema.get_field_index("seq_id"), "seq_id", pa.array(seq)), path,
                   row_group_size=ROW_GROUP, compression="zstd")
    return n_seq


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def measure(store: str, width: int, repeats: int) -> dict:
    neurons = np.random.default_rng(1).integers(0, width, repeats).tolist()
    macro = "SELECT * FROM top_with_context(?, ?, k := 20, w := 8)"
    out = {}
    with actscope.connect(store) as catalog:
        catalog.top(HOOK, 0)
        catalog.sql(README["dead neurons"])
        out["top_warm_ms"] = statistics.median(timed(lambda n=n: catalog.top(HOOK, n, k=20, window=8)) for n in neurons)
        out["top_macro_warm_ms"] = statistics.median(timed(lambda n=n: catalog.internal(macro, [HOOK, n])) for n in neurons[:10])
        for name, sql in README.items():
            out[f"{name} warm_ms"] = statistics.median(timed(lambda sql=sql: catalog.sql(sql)) for _ in range(10))

    def cold_top(n):
        with actscope.connect(store) as catalog:
            catalog.top(HOOK, n, k=20, window=8)

    def cold_sql(sql):
        with actscope.connect(store) as catalog:
            catalog.sql(sql)

    out["top_cold_ms"] = statistics.median(timed(lambda n=n: cold_top(n)) for n in neurons[:10])
    out["connect_ms"] = statistics.median(timed(lambda: actscope.connect(store).close()) for _ in range(10))
    for name, sql in README.items():
        out[f"{name} cold_ms"] = statistics.median(timed(lambda sql=sql: cold_sql(sql)) for _ in range(5))
    return {k: round(v, 1) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=100_000_000)
    parser.add_argument("--small-tokens", type=int, default=400_000)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--keep", help="keep the work folder here")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="actscope-bench-query-"))
    root.mkdir(parents=True, exist_ok=True)
    small = small_store(root, args.small_tokens)
    started = time.perf_counter()
    n_seq = grow(small, str(root / "big.zarr"), args.tokens)
    grow_s = time.perf_counter() - started
    width = Store.open(small).model.hook_widths[HOOK]
    result = {
        "machine": platform.machine(), "tokens": n_seq * 128, "small_tokens": Store.open(small).n_seq * 128,
        "grow_s": round(grow_s, 1),
        "tokens_parquet_mb": round((root / "big.zarr" / "index" / "tokens.parquet").stat().st_size / 1e6, 1),
        "small": measure(small, width, args.repeats), "big": measure(str(root / "big.zarr"), width, args.repeats),
    }
    print(json.dumps(result, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
