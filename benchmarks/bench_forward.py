"""The workers' forward against the plain Hugging Face forward of the same model, side by side.

Model: the 4-layer GPT-2 of ``bench_coactivation.py`` (d_model 256, 4 x 1024 MLP neurons, random
weights, MiniLM's tokenizer) by default, or any model folder. On the same 16 x 128 batches of the
stdlib docstrings, one process, interleaved round by round (this machine drifts):

- ``plain``:  the Hugging Face base model's forward (``AutoModel``, its default attention), all
              layers: what a user would time;
- ``module``: ``pipeline.model.ModuleForward``, what workers now run: the Hugging Face model with
              torch hooks on every ``mlp.hook_post`` module, stopped after the last hooked block;
- ``bridge``: ``pipeline.model.HookedForward``, the TransformerLens bridge's forward with the same
              hooks (what workers ran before, and still run for hooks only the bridge has).

Prints JSON: median ms per batch of each and the ratios to ``plain``. Usage:

    PYTHONPATH=. python benchmarks/bench_forward.py [--model PATH] [--rounds 7] [--batches 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_coactivation import build_model

from actscope.jobs.demo import stdlib_docstrings
from actscope.pipeline.model import HookedForward, forward_plan, job_forward, load_model, load_tokenizer, prefer_sdpa
from actscope.storage.record import ModelRecord
from actscope.storage.spec import JobSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a model folder (default: the 4-layer GPT-2, built here)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = args.model or build_model(Path(tempfile.mkdtemp(prefix="actscope-bench-forward-")))
    from transformers import AutoModel

    device = torch.device("cpu")
    bridge = load_model(model_dir, device)
    hooks = [f"blocks.{i}.mlp.hook_post" for i in range(bridge.cfg.n_layers)]
    plan = forward_plan(bridge, hooks)
    prefer_sdpa(bridge, hooks)
    spec = JobSpec.from_dict({"model": model_dir, "dataset": {"path": "text"}, "hooks": hooks, "store": "/nonexistent"})
    plain = AutoModel.from_pretrained(model_dir).eval()
    runs = {
        "plain": lambda t, m: plain(input_ids=t, attention_mask=m),
        "module": job_forward(spec, ModelRecord(forward=plan), device),
        "bridge": HookedForward(bridge, hooks),
    }
    tokenizer = load_tokenizer(model_dir)
    n = args.batches * args.batch_size * args.ctx
    ids = tokenizer(" ".join(stdlib_docstrings(limit=3000)), add_special_tokens=False)["input_ids"][:n]
    tokens = torch.tensor(ids).reshape(-1, args.batch_size, args.ctx)
    mask = torch.ones_like(tokens[0])
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for name, run in runs.items():  # warm-up
            run(tokens[0], mask)
        for _ in range(args.rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                for batch in tokens:
                    run(batch, mask)
                times[name].append((time.perf_counter() - start) / len(tokens) * 1000)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "benchmark": "forward", "machine": f"{platform.machine()} {os.cpu_count()} cores, {args.threads} threads",
        "model": args.model or "4-layer GPT-2, d_model 256, 4 x 1024 MLP", "batch": [args.batch_size, args.ctx],
        "hooks": hooks, "module_forward": plan.get("class") is not None,
        "median_ms_per_batch": {k: round(v, 2) for k, v in median.items()},
        "speed_vs_plain": {k: round(median["plain"] / v, 3) for k, v in median.items()},
        "all_ms": {k: [round(x, 1) for x in v] for k, v in times.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
