"""The worker on an accelerator: bare forward, hooked forward, statistics and co-activation, side by side.

Made for the lent GPU machine, which has torch and transformers but neither Ray nor TransformerLens
nor ``datasets``: it needs torch, transformers, numpy, zarr and pydantic, and drives
``pipeline.worker.ShardWorker`` directly over stores of random tokens it writes itself. For a
random-init model of GPT-2 small's shape (12 x 768, 12 x 3072 MLP neurons, GPT-2's 50,257-token
vocabulary) and every ``mlp.hook_post``, in each dtype it measures, in one run:

1. ``bare``: a plain Hugging Face ``GPT2Model`` forward (SDPA), batch after batch;
2. ``hooked``: the workers' forward (``pipeline.model.ModuleForward``: the same model with torch
   hooks on the 12 MLPs, stopped after the last hooked block);
3. ShardWorker over one accumulation group, three jobs: ``top-k only``, ``every statistic but
   co-activation`` (bottom, histogram, samples, tokens), ``every statistic`` (with co-activation,
   ``pairs: all``); logit effects are a one-off computation from the weights and are left out.

Each is reported as tokens per second and as a ratio to ``bare``; worker groups are run twice and
the second (warm) run is reported, with the time spent writing the group's partials shown apart.
Prints one JSON document. On a CPU, use a small shape (the test suite runs it so):

    python benchmarks/bench_device.py [--layers 12] [--d-model 768] [--vocab 50257] [--ctx 1024]
        [--batch 16] [--seqs 128] [--dtypes float32,bfloat16] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actscope.pipeline.model import ModuleForward, ModuleSite
from actscope.pipeline.worker import ShardWorker
from actscope.storage.spec import JobSpec
from actscope.storage.store import TEXT, Store

JOBS = {
    "top-k only": [],
    "every statistic but co-activation": ["bottom", "histogram", "samples", "tokens"],
    "every statistic": ["bottom", "histogram", "samples", "tokens", "coactivation"],
}


def gpt2_plan(layers: int) -> dict:
    """The forward plan the job's planner derives from the bridge for GPT-2's ``mlp.hook_post``
    hooks (``pipeline.model.forward_plan``; a test checks that the two agree). Written out here
    because TransformerLens is not installed on the GPU machine."""
    return {
        "class": "GPT2LMHeadModel",
        "sites": {f"blocks.{i}.mlp.hook_post": [f"transformer.h.{i}.mlp.c_proj", "input"] for i in range(layers)},
        "blocks": [f"transformer.h.{i}" for i in range(layers)],
    }


def build_model(root: Path, args) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=args.vocab, n_positions=max(args.ctx, 64), n_embd=args.d_model, n_layer=args.layers,
        n_head=max(1, args.d_model // 64), n_inner=4 * args.d_model, activation_function="gelu_new",
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(root / "model")
    return str(root / "model")


def make_store(url: str, model: str, args, dtype: str, statistics: list[str]) -> str:
    """A tokenized store of random token ids (one accumulation group), as the planner and the
    tokenize phase would leave it."""
    hooks = [f"blocks.{i}.mlp.hook_post" for i in range(args.layers)]
    spec = JobSpec.from_dict({
        "model": model, "dataset": {"path": "text"}, "hooks": hooks, "store": url, "dense": [], "device": args.device,
        "dtype": dtype, "context_length": args.ctx, "shard_size": args.batch * 4, "batch_size": args.batch,
        "statistics": statistics, "top_k": 20,
    })
    framing = {"prefix": [], "suffix": [], "separator": [], "pad": 0}
    record = {"name": model, "architecture": "GPT2LMHeadModel", "n_layers": args.layers, "d_model": args.d_model,
              "vocab_size": args.vocab, "hook_widths": {h: 4 * args.d_model for h in hooks}, "framing": framing,
              "forward": gpt2_plan(args.layers)}
    return random_store(url, spec, record, args)


def random_store(url: str, spec: JobSpec, record: dict, args) -> str:
    """The store of ``spec`` and model ``record``, tokenized: ``args.seqs`` sequences of random
    token ids, one accumulation group."""
    store = Store.create(url, spec=spec, fingerprint="bench", model=record)
    store.reset_token_arrays()
    rng = np.random.default_rng(0)
    shape = (args.seqs, args.ctx)
    store.append_tokens({
        "tokens": rng.integers(0, args.vocab, size=shape, dtype=np.int32),
        "doc_ids": np.repeat(np.arange(args.seqs, dtype=np.int64)[:, None], args.ctx, axis=1),
        "doc_pos": np.broadcast_to(np.arange(args.ctx, dtype=np.int32), shape).copy(),
        "kinds": np.full(shape, TEXT, dtype=np.uint8),
    })
    store.update_status(tokenized=True, n_seq=args.seqs, shards_per_group=-(-args.seqs // spec.shard_size))
    return url


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(run, tokens: torch.Tensor, batch: int, device: torch.device) -> float:
    """Seconds for ``run`` over every batch of ``tokens``, after one warm-up batch."""
    mask = torch.ones_like(tokens)
    with torch.inference_mode():
        run(tokens[:batch], mask[:batch])
        synchronize(device)
        start = time.perf_counter()
        for b0 in range(0, len(tokens), batch):
            run(tokens[b0:b0 + batch], mask[b0:b0 + batch])
        synchronize(device)
    return time.perf_counter() - start


def measure(root: Path, model: str, dtype: str, args, device: torch.device) -> dict:
    from transformers import GPT2LMHeadModel, GPT2Model

    n_tokens = args.seqs * args.ctx
    tokens = torch.from_numpy(np.random.default_rng(1).integers(0, args.vocab, size=(args.seqs, args.ctx))).to(device)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    out: dict = {"dtype": dtype, "tokens": n_tokens}

    bare = GPT2Model.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa").to(device).eval()
    bare_s = time_forward(lambda t, m: bare(input_ids=t, attention_mask=m, use_cache=False), tokens, args.batch, device)
    bare = None  # its weights go before the next model loads
    plan = gpt2_plan(args.layers)
    lm = GPT2LMHeadModel.from_pretrained(model, dtype=torch_dtype, attn_implementation="sdpa").to(device).eval()
    hooked = ModuleForward(lm, {h: ModuleSite(*s) for h, s in plan["sites"].items()}, plan["blocks"][-1])
    hooked_s = time_forward(hooked, tokens, args.batch, device)
    hooked.close()
    del lm, hooked
    out["bare"] = {"tokens_per_s": round(n_tokens / bare_s), "seconds": round(bare_s, 4)}
    out["hooked"] = {"tokens_per_s": round(n_tokens / hooked_s), "seconds": round(hooked_s, 4), "vs_bare": round(bare_s / hooked_s, 3)}

    for name, statistics in JOBS.items():
        url = make_store(str(root / f"{dtype}-{len(statistics)}.zarr"), model, args, dtype, statistics)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        worker = ShardWorker(url, threads=args.threads)
        runs = []
        for _ in range(2):  # the first run warms kernels and allocations; the second is reported
            if worker.store.is_committed(0):
                worker.store.uncommit(0)
            runs.append(worker(0))
        result = runs[-1]
        compute = result.seconds - result.seconds_write
        out[name] = {
            "tokens_per_s": round(n_tokens / result.seconds), "vs_bare": round(bare_s / result.seconds, 3),
            "without_write_vs_bare": round(bare_s / compute, 3), "seconds": round(result.seconds, 3),
            "seconds_write": round(result.seconds_write, 3), "first_run_s": round(runs[0].seconds, 3),
            "device_peak_gib": round(result.device_peak / 2**30, 2),
        }
        del worker
        shutil.rmtree(url, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50_257)
    parser.add_argument("--ctx", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqs", type=int, default=128, help="sequences in the worker's group (and in the forward timings)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.device = device.type
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32: the exactness promises hold
    root = Path(tempfile.mkdtemp(prefix="actscope-bench-device-"))
    try:
        model = build_model(root, args)
        results = [measure(root, model, dtype, args, device) for dtype in args.dtypes.split(",")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(json.dumps({
        "benchmark": "device", "device": name, "torch": torch.__version__,
        "shape": {"layers": args.layers, "d_model": args.d_model, "vocab": args.vocab, "ctx": args.ctx, "batch": args.batch},
        "results": results,
    }, indent=1))


if __name__ == "__main__":
    main()
