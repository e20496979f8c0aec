"""The added cost of an SAE's latents over the forward: encode, and every statistic of the latents.

For a random-init model of GPT-2 small's shape (12 x 768, GPT-2's 50,257-token vocabulary) and
its last residual stream (``blocks.11.hook_resid_post``: the job's forward is then the whole
model), with an SAE 16 times the hook's width (768 -> 12,288 latents) firing about ``--l0``
latents a token, it measures, side by side in one run:

1. ``bare``: a plain Hugging Face ``GPT2Model`` forward (SDPA), batch after batch;
2. ShardWorker over one accumulation group, every default statistic: ``hook only``; ``hook + topk
   SAE`` (k = l0); ``hook + jumprelu SAE`` (per-latent thresholds set so that each latent fires on
   l0 / d_sae of the tokens, as trained SAEs do); each run twice, the second reported;
3. for each SAE: the encode alone over the same batches, and, on one batch of its latents, the
   non-zeros pass and each statistic's update as the worker runs them (from the non-zeros where
   the statistic can), in ``statistics_ms_per_batch`` (a top-k SAE's non-zeros: its chosen
   entries handed over, as the worker takes them; the others': a scan);
4. for each SAE, co-activation of the hook's neurons and the latents at each of
   ``--coactivation-strides``: the update per batch (against the dense N x N update on one batch),
   the latent pairs met and their bytes against the plan's bound, and the merge's time.

The SAE's added cost is ``(hook + SAE) - (hook only)`` of the worker's time, over ``bare``. It
needs torch, transformers, numpy, zarr, pydantic and safetensors (no Ray, no TransformerLens),
so it runs on the lent GPU machine too. Prints one JSON document:

    python benchmarks/bench_sae.py [--layers 12] [--d-model 768] [--expansion 16] [--l0 64]
        [--vocab 50257] [--ctx 128] [--batch 16] [--seqs 64] [--dtype float32] [--device auto]
        [--coactivation-strides 32,1]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_device import build_model, random_store, synchronize, time_forward

from actscope.pipeline import sampling
from actscope.pipeline.nonzero import NonZeros
from actscope.pipeline.reducers import Group, HookStatistics, job_statistics
from actscope.pipeline.sae import Encoder, SAEInfo, chosen_nonzeros
from actscope.pipeline.worker import Batch, ShardWorker, one_thread
from actscope.storage.spec import JobSpec


def resid_plan(layers: int) -> dict:
    """The planner's forward plan for GPT-2's last ``hook_resid_post`` (``pipeline.model.
    forward_plan``; a test checks that they agree), written out for a machine without
    TransformerLens."""
    return {
        "class": "GPT2LMHeadModel",
        "sites": {f"blocks.{layers - 1}.hook_resid_post": [f"transformer.h.{layers - 1}", "output"]},
        "blocks": [f"transformer.h.{i}" for i in range(layers)],
    }


def residuals(net, tokens: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The hook's activations (the last block's output, before the final norm), batch by batch."""
    captured = []
    handle = net.h[-1].register_forward_hook(lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    try:
        with torch.inference_mode():
            for b0 in range(0, len(tokens), batch):
                net(input_ids=tokens[b0:b0 + batch], use_cache=False)
    finally:
        handle.remove()
    return [x.reshape(-1, x.shape[-1]).float() for x in captured]


def write_sae(folder: Path, architecture: str, residual: torch.Tensor, args) -> dict:
    """A random SAE in SAELens 6's layout whose latents fire ``l0`` a token on ``residual``'s
    distribution; its record as the planner writes it (``SAEInfo``)."""
    from safetensors.torch import save_file

    d_in, d_sae = args.d_model, args.d_model * args.expansion
    gen = torch.Generator().manual_seed(3)
    w_enc = torch.randn(d_in, d_sae, generator=gen) / d_in**0.5
    weights = {"W_enc": w_enc, "b_enc": torch.zeros(d_sae), "W_dec": w_enc.T.contiguous(), "b_dec": torch.zeros(d_in)}
    config = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "apply_b_dec_to_input": True,
              "normalize_activations": "none", "metadata": {"hook_name": f"blocks.{args.layers - 1}.hook_resid_post"}}
    if architecture == "jumprelu":  # each latent's threshold: the quantile at which it fires l0 / d_sae of the time
        pre = residual.cpu() @ w_enc
        weights["threshold"] = torch.quantile(pre, 1 - args.l0 / d_sae, dim=0).clamp_min(1e-3)
    else:
        config["k"] = args.l0
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(config))
    return SAEInfo(name="sae", hook=config["metadata"]["hook_name"], path=str(folder), layout="saelens", architecture=architecture,
                   d_in=d_in, d_sae=d_sae, dtype="float32", k=config.get("k")).to_dict()


def make_store(url: str, model: str, args, sae: dict | None) -> str:
    """A tokenized store of random token ids (one accumulation group), as the planner and the
    tokenize phase would leave it, with every default statistic."""
    hook = f"blocks.{args.layers - 1}.hook_resid_post"
    spec = {"model": model, "dataset": {"path": "text"}, "hooks": [hook], "store": url, "dense": [], "device": args.device,
            "dtype": args.dtype, "context_length": args.ctx, "shard_size": args.batch * 4, "batch_size": args.batch}
    record = {"name": model, "architecture": "GPT2LMHeadModel", "n_layers": args.layers, "d_model": args.d_model,
              "vocab_size": args.vocab, "hook_widths": {hook: args.d_model}, "forward": resid_plan(args.layers),
              "framing": {"prefix": [], "suffix": [], "separator": [], "pad": 0}}
    if sae is not None:
        spec["saes"] = [{"name": "sae", "path": sae["path"]}]
        record["saes"] = {"sae": sae}
        record["hook_widths"]["sae"] = sae["d_sae"]
    return random_store(url, JobSpec.from_dict(spec), record, args)


def run_worker(url: str, args) -> dict:
    worker = ShardWorker(url, threads=args.threads)
    runs = []
    for _ in range(2):  # the first run warms kernels and allocations; the second is reported
        if worker.store.is_committed(0):
            worker.store.uncommit(0)
        runs.append(worker(0))
    quality = worker.store.sae_quality().get("sae")
    result = runs[-1]
    out = {"seconds": round(result.seconds, 3), "seconds_write": round(result.seconds_write, 3), "first_run_s": round(runs[0].seconds, 3),
           "peak_rss_gib": round(result.peak_rss / 2**30, 2), "device_peak_gib": round(result.device_peak / 2**30, 2)}
    if quality:
        out["measured_l0"] = round(quality["l0"], 1)
    return out


def latent_costs(sae: dict, residual_batches: list[torch.Tensor], tokens: torch.Tensor, device: torch.device, args) -> dict:
    """Encode over every batch, then each statistic's update on one batch of latents (ms)."""
    encoder = Encoder(SAEInfo(**sae), device)
    encoder.encode(residual_batches[0])  # warm-up
    synchronize(device)
    start = time.perf_counter()
    for x in residual_batches:
        latents = encoder.encode(x)
    synchronize(device)
    encode_s = time.perf_counter() - start
    spec = JobSpec.from_dict({"model": "m", "dataset": {"path": "text"}, "hooks": [sae["hook"]], "store": "-",
                              "saes": [{"name": "sae", "path": sae["path"]}]})
    n = len(latents)
    flat = tokens.reshape(-1)[:n]
    batch = Batch(first=0, counted=None, global_index=torch.arange(n, device=device), token_ids=flat,
                  docs=torch.zeros(n, dtype=torch.int64, device=device), priority=sampling.priority(torch.arange(n, device=device), spec.seed))
    stats = HookStatistics(spec, Group("sae", sae["d_sae"], flat, torch.ones_like(flat, dtype=torch.bool), 0))
    with one_thread(device):  # as the worker runs them: the non-zeros once, then each statistic
        start = time.perf_counter()
        nz = NonZeros.of(latents, None)
        synchronize(device)
        ms = {"non-zeros": round(1000 * (time.perf_counter() - start), 2)}
        # A top-k encoder hands its chosen entries over instead (the worker then skips the scan):
        # what that costs the encode, from the same indices.
        handed = sae.get("k") is not None
        if handed:
            index = torch.topk(latents.abs(), sae["k"], dim=-1).indices
            start = time.perf_counter()
            chosen_nonzeros(latents, index)
            synchronize(device)
            ms["non-zeros"] = round(1000 * (time.perf_counter() - start), 2)
        for statistic, reducer in zip(job_statistics(spec, "sae"), stats.reducers):
            update = (lambda r=reducer: r.update_nonzero(latents, nz, batch)) if hasattr(reducer, "update_nonzero") else (lambda r=reducer: r.update(latents, batch))
            update()  # the first batch of a group ranks differently; time a later one
            synchronize(device)
            start = time.perf_counter()
            update()
            synchronize(device)
            ms[statistic.name] = round(1000 * (time.perf_counter() - start), 2)
    return {"encode_s": round(encode_s, 3), "statistics_ms_per_batch": ms, "statistics_ms_total": round(sum(ms.values()), 1),
            "non_zeros_from": "the encoder's choice" if handed else "a scan",
            "batch_tokens": n, "density": round(float((latents != 0).float().mean()), 5)}


def latent_coactivation(sae: dict, residual_batches: list[torch.Tensor], device: torch.device, root: Path, stride: int, dense: bool) -> dict:
    """Co-activation of the hook's neurons and the SAE's latents (``pairs: all``) over every batch
    at ``stride``: the worker's update per batch, the distinct latent pairs met and their bytes
    against the plan's bound, then the merge (``prepare`` and every block) from a real store;
    ``dense``: also one batch of the dense N x N update the latents had before (a negative
    threshold still takes it)."""
    from actscope.pipeline import capacity, coactivation
    from actscope.storage.store import COACTIVATION, Store

    hook, width = sae["hook"], sae["d_in"]
    encoder = Encoder(SAEInfo(**sae), device)
    fields = {"model": "m", "dataset": {"path": "text"}, "hooks": [hook], "store": str(root / "coact.zarr"), "statistics": ["coactivation"],
              "saes": [{"name": "sae", "path": sae["path"]}], "coactivation": {"stride": stride, "hooks": [hook, "sae"]}}
    spec = JobSpec.from_dict(fields)
    widths = {hook: width, "sae": sae["d_sae"]}
    running = coactivation.RunningCoactivation(spec, widths, device)
    seconds, start_index = 0.0, 0
    for x in residual_batches:
        n = len(x)
        index = torch.arange(start_index, start_index + n, device=device)
        batch = Batch(first=0, counted=None, global_index=index, token_ids=index, docs=index, priority=sampling.priority(index, spec.seed))
        acts = {hook: x, "sae": encoder.encode(x)}
        synchronize(device)
        start = time.perf_counter()
        running.update(acts, batch)
        synchronize(device)
        seconds += time.perf_counter() - start
        start_index += n
    result = running.result()
    met = len(result["pairs.1.1.key"])
    out = {"stride": stride, "tokens": start_index, "coactivation_tokens": int(result["n"][0]),
           "update_ms_per_batch": round(1000 * seconds / len(residual_batches), 1),
           "latent_pairs_met": met, "latent_pairs_bytes_mib": round(68 * met / 2**20, 1),
           "plan_bound_pairs": capacity.latent_pair_entries(spec, widths, start_index),
           "dense_pairs_bytes_mib": round(16 * sae["d_sae"] ** 2 / 2**20, 1)}
    store = Store.create(spec.store, spec=spec, fingerprint="bench", model={"hook_widths": widths})
    store.update_status(n_seq=1)
    store.write_partial(0, {COACTIVATION: result}, {})
    start = time.perf_counter()
    coactivation.prepare(store, spec)
    out["merge_prepare_s"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    blocks = coactivation.blocks(spec, widths)
    rows = sum(coactivation.block_table(store, spec, site, first).num_rows for site, first in blocks)
    out["merge_blocks_s"] = round(time.perf_counter() - start, 2)
    out["merge_rows"] = rows
    shutil.rmtree(spec.store, ignore_errors=True)
    if dense:  # the same update on one batch with the latents dense (threshold -1)
        spec = JobSpec.from_dict({**fields, "thresholds": {"sae": -1.0}})
        running = coactivation.RunningCoactivation(spec, widths, device)
        x = residual_batches[0]
        index = torch.arange(len(x), device=device)
        batch = Batch(first=0, counted=None, global_index=index, token_ids=index, docs=index, priority=sampling.priority(index, spec.seed))
        acts = {hook: x, "sae": encoder.encode(x)}
        running.update(acts, batch)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        running.update(acts, batch)
        synchronize(device)
        out["dense_update_ms_per_batch"] = round(1000 * (time.perf_counter() - start), 1)
        del running
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--expansion", type=int, default=16)
    parser.add_argument("--l0", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=50_257)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--coactivation-strides", default="32,1", help="co-activation of the latents at each stride ('' for none)")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.device = device.type
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    root = Path(tempfile.mkdtemp(prefix="actscope-bench-sae-"))
    try:
        model = build_model(root, args)
        n_tokens = args.seqs * args.ctx
        tokens = torch.from_numpy(np.random.default_rng(1).integers(0, args.vocab, size=(args.seqs, args.ctx))).to(device)
        from transformers import GPT2Model

        net = GPT2Model.from_pretrained(model, attn_implementation="sdpa").to(device).eval()
        bare_s = time_forward(lambda t, m: net(input_ids=t, attention_mask=m, use_cache=False), tokens, args.batch, device)
        batches = residuals(net, tokens, args.batch)  # for the encode timings
        calibration = residuals(net, torch.from_numpy(np.random.default_rng(7).integers(0, args.vocab, size=(16, args.ctx))).to(device), 4)
        calibration = torch.cat(calibration)
        net = None  # its weights go before the workers load theirs
        out: dict = {"bare": {"seconds": round(bare_s, 3), "tokens_per_s": round(n_tokens / bare_s)}}
        jobs = {"hook only": None, "hook + topk SAE": write_sae(root / "topk", "topk", calibration, args),
                "hook + jumprelu SAE": write_sae(root / "jumprelu", "jumprelu", calibration, args)}
        for name, sae in jobs.items():
            url = make_store(str(root / f"{name.replace(' ', '-')}.zarr"), model, args, sae)
            out[name] = run_worker(url, args)
            out[name]["vs_bare"] = round(bare_s / out[name]["seconds"], 3)
            shutil.rmtree(url, ignore_errors=True)
            if sae is not None:
                added = out[name]["seconds"] - out["hook only"]["seconds"]
                out[name]["sae_added_over_bare"] = round(added / bare_s, 3)
                out[name].update(latent_costs(sae, batches, tokens, device, args))
                out[name]["encode_over_bare"] = round(out[name]["encode_s"] / bare_s, 3)
                out[name]["coactivation"] = [
                    latent_coactivation(sae, batches, device, root, int(stride), dense=k == 0)
                    for k, stride in enumerate(filter(None, args.coactivation_strides.split(",")))
                ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    print(json.dumps({
        "benchmark": "sae", "device": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "shape": {"layers": args.layers, "d_model": args.d_model, "d_sae": args.d_model * args.expansion, "l0": args.l0,
                  "vocab": args.vocab, "ctx": args.ctx, "batch": args.batch, "tokens": n_tokens},
        "results": out,
    }, indent=1))


if __name__ == "__main__":
    main()
