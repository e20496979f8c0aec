"""Where a worker's time goes at steady state: per batch, per shard and per group, against a bare forward.

Runs the job once in-process (``use_ray=False``) to get a real tokenized store (the issue-14 job
by default: the 4-layer GPT-2 of ``bench_coactivation.py``, its four ``mlp.hook_post`` hooks,
every default statistic), then runs group 0 again in a ``ShardWorker`` of one torch thread, as a
Ray worker of one CPU runs it, with a timer around each part of the work:

- per batch: the forward, each statistic's ``update`` (top-k, bottom-k, moments, histogram, band
  and random samples, token sums), co-activation's ``update``;
- per shard: reading the shard's tokens, the sampling priorities, writing dense chunks;
- per group: reading the group's token ids, writing and committing the partials;
- ``other``: the rest of the wall time (the loop itself, building each batch's view, the float32
  conversion of the activations): what the profile does not account for.

A bare forward of the base model (``AutoModel``, one thread) over the same tokens runs before and
after; ratios use their mean. ``--bridge`` profiles the bridge's forward instead of the module
forward (the state before issue 14). Prints one JSON document. Usage:

    PYTHONPATH=.:benchmarks python benchmarks/bench_profile.py [--tokens 100000] [--group-shards 3] [--bridge]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml
from bench_coactivation import build_model
from bench_run import bare_forward, write_job

import actscope.pipeline.worker as worker_module
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.pipeline import sampling
from actscope.pipeline.model import job_forward
from actscope.pipeline.reducers import HookStatistics, job_statistics
from actscope.storage.store import PAD, Store

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def timed(function, key: str):
    def run(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SECONDS[key] += time.perf_counter() - start
            CALLS[key] += 1

    return run


class TimedStatistics(HookStatistics):
    def __init__(self, spec, group):
        super().__init__(spec, group)
        for statistic, reducer in zip(job_statistics(spec, group.hook), self.reducers):
            reducer.update = timed(reducer.update, f"batch: {statistic.name}")


def instrument(bridge: bool) -> None:
    """Wrap the worker's parts in timers (module attributes the worker looks up at call time)."""
    worker_module.HookStatistics = TimedStatistics
    coactivation = worker_module.RunningCoactivation

    class TimedCoactivation(coactivation):
        def update(self, acts, batch):
            return timed(super().update, "batch: co-activation")(acts, batch)

    worker_module.RunningCoactivation = TimedCoactivation
    worker_module.sampling = type("sampling", (), {"priority": staticmethod(timed(sampling.priority, "shard: sampling priorities"))})
    forward = job_forward
    worker_module.job_forward = (lambda spec, record, device: forward(spec, {}, device)) if bridge else forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--group-shards", type=int, default=3, help="shards in group 0, the one profiled")
    parser.add_argument("--model", default=None, help="a model folder (default: the 4-layer GPT-2, built here)")
    parser.add_argument("--hooks", default=None, help="default: every mlp.hook_post of the model")
    parser.add_argument("--statistics", default=None, help="comma-separated optional statistics (default: every one)")
    parser.add_argument("--bridge", action="store_true", help="profile the bridge's forward (before issue 14)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="actscope-bench-profile-"))
    try:
        model = args.model or build_model(root)
        from transformers import AutoConfig

        layers = AutoConfig.from_pretrained(model).num_hidden_layers
        hooks = args.hooks.split(",") if args.hooks else [f"blocks.{i}.mlp.hook_post" for i in range(layers)]
        statistics = None if args.statistics is None else [s for s in args.statistics.split(",") if s]
        path = write_job(root, model, args.tokens, hooks, [], 1, statistics)
        job = yaml.safe_load(path.read_text())
        path.write_text(yaml.safe_dump({**job, "group_shards": args.group_shards}))
        spec = load_job(path)
        run_job(spec, use_ray=False, threads=1)
        store = Store.open(spec.store, writable=True)
        torch.set_num_threads(1)
        data = store.read_tokens(0, store.n_seq)
        bare = [bare_forward(model, data["tokens"], data["kinds"] != PAD, spec.batch_size)]

        instrument(args.bridge)
        worker = worker_module.ShardWorker(spec.store, threads=1)
        store_calls = {"read_tokens": "shard: read tokens", "write_partial": "group: write and commit partials"}
        for name, key in store_calls.items():
            setattr(worker.store, name, timed(getattr(worker.store, name), key))
        worker.forward = timed(worker.forward, "batch: forward")
        # The first run merged the job's co-activation; a group run again would leave it out.
        worker.store.has_merged_coactivation = lambda: False
        first, last = worker.store.group_range(0)
        worker.store.uncommit(0)
        SECONDS.clear()
        CALLS.clear()
        result = worker(0)
        bare.append(bare_forward(model, data["tokens"], data["kinds"] != PAD, spec.batch_size))
        wall = result.seconds
        accounted = sum(SECONDS.values())
        SECONDS["other (unaccounted)"] = wall - accounted
        n_tokens = (last - first) * spec.context_length
        n_batches = CALLS["batch: forward"]
        bare_s = float(np.mean(bare)) * n_tokens / data["tokens"].size
        print(json.dumps({
            "benchmark": "profile", "machine": f"{platform.machine()} {os.cpu_count()} cores, 1 torch thread",
            "forward": "bridge" if args.bridge else "module", "hooks": hooks, "statistics": spec.statistics,
            "tokens": n_tokens, "batches": n_batches, "shards": result.shards, "batch": [spec.batch_size, spec.context_length],
            "wall_s": round(wall, 3), "accounted_share": round(accounted / wall, 4),
            "bare_forward_s": round(bare_s, 3), "worker_vs_bare": round(bare_s / wall, 3),
            "forward_vs_bare": round(bare_s / SECONDS["batch: forward"], 3),
            "parts": {
                key: {"s": round(s, 3), "share": round(s / wall, 4), "ms_per_batch": round(1000 * s / n_batches, 2),
                      "vs_forward": round(s / SECONDS["batch: forward"], 4)}
                for key, s in sorted(SECONDS.items(), key=lambda kv: -kv[1])
            },
        }, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
