"""What a job costs at GPT-2 small's shape: store bytes, memory, and the merge, side by side.

Models: random-init GPT-2s of GPT-2 small's width (d_model 768, 3072 MLP neurons a layer, 12
heads) with a ~39k-token BPE vocabulary trained here on the standard library's docstrings, at
2 layers and at 12. Every job runs on embedded Ray (``--workers`` workers) with every statistic:

- ``2L`` and ``2L-3x``: the 2-layer model, both ``mlp.hook_post`` hooks, every default, on
  ``--tokens`` tokens and on three times as many (the state must not grow with the corpus: the
  peak store bytes outside the token arrays of the longer job over the shorter's);
- ``12L``: the 12-layer model, all 12 ``mlp.hook_post`` hooks (36,864 neurons), co-activation of
  adjacent layers (``pairs: all`` needs ~20 GiB per worker at this width, more than this machine
  has for two), in groups of ``--group-shards`` shards so that the job has at least 2 units of work.

Prints JSON, one object per job: groups and shards, partial bytes per corpus token (the largest
``shards/`` folder seen, over the tokens), the peak store bytes outside the token arrays (sampled
every 0.2 s), the final store bytes, peak resident memory of the shard workers, of the merge's
tasks and of the driver, the phases' seconds and the merge's share of the job, and the fixed
cost of a group (writing and committing its partials) and per shard; for ``2L``, each neuron's
top activation and mean against a plain ``transformers`` forward + numpy (largest differences).

Usage: python benchmarks/bench_scale.py [--tokens 16384] [--layers 2,12] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import yaml

from actscope.jobs.demo import stdlib_docstrings
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job

VOCAB, D_MODEL, D_MLP, HEADS, CONTEXT = 39_000, 768, 3072, 12, 128
TOKEN_ARRAYS = {"tokens", "doc_ids", "doc_pos", "kinds"}


def build_model(root: Path, layers: int) -> str:
    """A GPT-2 of GPT-2 small's width with ``layers`` layers and a ~39k BPE vocabulary."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = root / f"gpt2-small-shape-{layers}L"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_docstrings(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    if len(fast) < VOCAB:  # the docstrings have fewer merges than GPT-2's corpus: pad to the shape
        fast.add_tokens([f"<|unused{i}|>" for i in range(VOCAB - len(fast))], special_tokens=True)
    config = GPT2Config(vocab_size=len(fast), n_positions=CONTEXT, n_embd=D_MODEL, n_layer=layers, n_head=HEADS, n_inner=D_MLP,
                        bos_token_id=0, eos_token_id=0, activation_function="gelu_new")
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def folder_bytes(path: str, skip: set[str] = frozenset()) -> int:
    total = 0
    for top in os.listdir(path) if os.path.isdir(path) else []:
        if top in skip:
            continue
        full = os.path.join(path, top)
        if os.path.isfile(full):
            total += os.path.getsize(full)
        for root, _, files in os.walk(full):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files if os.path.exists(os.path.join(root, f)))
    return total


class StoreWatcher(threading.Thread):
    """Samples the store's bytes outside the token arrays, and its ``shards/`` folder's."""

    def __init__(self, store: str):
        super().__init__(daemon=True)
        self.store, self.peak, self.peak_shards, self._halt = store, 0, 0, threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.2):
            try:
                self.peak = max(self.peak, folder_bytes(self.store, TOKEN_ARRAYS))
                self.peak_shards = max(self.peak_shards, folder_bytes(os.path.join(self.store, "shards")))
            except OSError:  # a file renamed or removed while walking
                pass

    def stop(self) -> None:
        self._halt.set()
        self.join()


def run(root: Path, name: str, model: str, hooks: list[str], tokens: int, workers: int, check: bool = False, **fields) -> dict:
    corpus = root / "corpus.jsonl"
    if not corpus.exists():
        corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in stdlib_docstrings()))
    store = str(root / f"{name}.zarr")
    job = {
        "model": model, "dataset": {"path": "json", "data_files": [str(corpus)], "max_tokens": tokens},
        "context_length": CONTEXT, "hooks": hooks, "store": store, "workers": workers, "shard_size": 32, "batch_size": 8, **fields,
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(job))
    spec = load_job(root / f"{name}.yaml")
    watcher = StoreWatcher(store)
    watcher.start()
    start = time.perf_counter()
    summary = run_job(spec, threads=max(1, (os.cpu_count() or 1) // workers))
    total = time.perf_counter() - start
    watcher.stop()
    from actscope.pipeline.coactivation import chosen_pairs
    from actscope.storage.store import Store

    opened = Store.open(store)
    groups = summary.group_results
    merge = summary.phases.get("reduce+index", 0.0)
    write = [g.seconds_write for g in groups]
    out = {
        "job": name, "hooks": len(hooks), "units": sum(opened.model.hook_widths.values()), "vocab": opened.model.vocab_size,
        "tokens": summary.n_tokens, "shards": summary.shards_total, "groups": opened.n_groups, "shards_per_group": opened.shards_per_group,
        "coactivation_pairs": chosen_pairs(spec, opened.model.hook_widths) if spec.coactivation_hooks() else None,
        "partial_bytes_per_token": round(watcher.peak_shards / summary.n_tokens),
        "peak_store_bytes_outside_token_arrays": watcher.peak,
        "final_store_bytes": folder_bytes(store),
        "peak_rss_shard_workers": max((g.peak_rss for g in groups), default=0),
        "peak_rss_merge_tasks": max((p.peak_rss for p in summary.reduce_parts), default=0),
        "peak_rss_driver": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "phases_s": {k: round(v, 2) for k, v in summary.phases.items()},
        "seconds_total": round(total, 2),
        "merge_s": round(merge, 2), "merge_share": round(merge / total, 3),
        "merge_parts": len(summary.reduce_parts),
        "merge_part_s_sum": round(sum(p.seconds for p in summary.reduce_parts), 2),
        "merge_part_s_by_kind": {
            kind: round(sum(p.seconds for p in summary.reduce_parts if _kind(p.key) == kind), 2)
            for kind in ("hook", "prepare", "block")
        },
        "group_fixed_s": round(sum(write) / max(len(write), 1), 3),
        "fixed_s_per_shard": round(sum(write) / max(sum(g.shards for g in groups), 1), 4),
        "group_s": [round(g.seconds, 2) for g in groups],
    }
    if check:
        out["brute_force"] = brute_force_check(model, opened)
    shutil.rmtree(store, ignore_errors=True)
    return out


def brute_force_check(model_dir: str, store) -> dict:
    """Each neuron's top activation and mean against a plain ``transformers`` forward + numpy over
    the store's own token arrays (text tokens counted, as the job does): the largest differences."""
    import duckdb
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    from actscope.storage.store import TEXT

    data = store.read_tokens(0, store.n_seq, ("tokens", "kinds"))
    hf = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    acts: dict[int, list] = {}
    handles = [layer.mlp.act.register_forward_hook(lambda m, i, o, n=n: acts.setdefault(n, []).append(o.reshape(-1, o.shape[-1])))
               for n, layer in enumerate(hf.transformer.h)]
    with torch.no_grad():
        for start in range(0, store.n_seq, 16):
            ids = torch.from_numpy(data["tokens"][start:start + 16].astype(np.int64))
            hf(ids, attention_mask=torch.from_numpy(data["kinds"][start:start + 16] != 2).long())
    for h in handles:
        h.remove()
    counted = (data["kinds"] == TEXT).reshape(-1)
    index = store.table_url
    out = {"max_abs_diff_top1": 0.0, "max_abs_diff_mean": 0.0}
    full = {n: torch.cat(parts).numpy() for n, parts in acts.items()}
    for n in full:
        x = full[n][counted]
        hook = f"blocks.{n}.mlp.hook_post"
        top = duckdb.sql(f"SELECT neuron, activation FROM '{index('top_examples')}' WHERE hook = '{hook}' AND rank = 1 ORDER BY neuron").fetchnumpy()
        mean = duckdb.sql(f"SELECT neuron, mean FROM '{index('neuron_stats')}' WHERE hook = '{hook}' ORDER BY neuron").fetchnumpy()
        out["max_abs_diff_top1"] = max(out["max_abs_diff_top1"], float(np.abs(top["activation"] - x.max(0)[top["neuron"]]).max()))
        out["max_abs_diff_mean"] = max(out["max_abs_diff_mean"], float(np.abs(mean["mean"] - x.astype(np.float64).mean(0)[mean["neuron"]]).max()))
    out["coactivation_rows_checked"] = check_coactivation_at_width(store, full, counted)
    return out


def check_coactivation_at_width(store, full: dict, counted) -> int:
    """The whole ``coactivation`` table against brute force over every neuron pair (tolerance 1e-4,
    as the tests): raises if a statistic or a partner differs; returns the rows checked."""
    import duckdb
    import numpy as np

    from actscope.pipeline.coactivation import chosen_pairs
    from tests.reference import COACTIVATION_COLUMNS, check_coactivation, coactivation_brute_force, priority

    spec = store.spec
    assert chosen_pairs(spec, store.model.hook_widths) == "all"
    hooks = [f"blocks.{n}.mlp.hook_post" for n in sorted(full)]
    chosen = [i for i in np.flatnonzero(counted) if priority(int(i), spec.seed) < 2**32 // spec.coactivation.stride]
    truth = coactivation_brute_force([full[n][chosen] for n in sorted(full)], [spec.threshold(h) for h in hooks])
    widths = [full[n].shape[1] for n in sorted(full)]
    offsets = dict(zip(hooks, np.cumsum([0, *widths[:-1]]).tolist()))
    columns = ", ".join(COACTIVATION_COLUMNS)
    rows = {k: np.asarray(v) for k, v in duckdb.sql(f"SELECT {columns} FROM '{store.table_url('coactivation')}'").fetchnumpy().items()}
    allowed = np.ones((sum(widths), sum(widths)), dtype=bool)  # the 2-layer job's default pairs: all
    return check_coactivation(rows, truth, offsets, allowed, spec.coactivation.partners)


def _kind(key: str) -> str:
    return "hook" if key.startswith("hook-") else "prepare" if key == "coactivation" else "block"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16_384, help="tokens of the 2-layer job (its 3x job has three times as many)")
    parser.add_argument("--tokens-12l", type=int, default=8_192)
    parser.add_argument("--group-shards", type=int, default=1, help="shards per group of the 12-layer job")
    parser.add_argument("--layers", default="2,12")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="actscope-bench-scale-"))
    results = []
    try:
        layers = [int(x) for x in args.layers.split(",")]
        if 2 in layers:
            model = build_model(root, 2)
            hooks = [f"blocks.{i}.mlp.hook_post" for i in range(2)]
            results.append(run(root, "2L", model, hooks, args.tokens, args.workers, check=True))
            results.append(run(root, "2L-3x", model, hooks, 3 * args.tokens, args.workers))
            short, long = results[-2:]
            results.append({"check": "2L-3x over 2L, peak store bytes outside the token arrays",
                            "ratio": round(long["peak_store_bytes_outside_token_arrays"] / short["peak_store_bytes_outside_token_arrays"], 3)})
        if 12 in layers:
            model = build_model(root, 12)
            hooks = [f"blocks.{i}.mlp.hook_post" for i in range(12)]
            results.append(run(root, "12L", model, hooks, args.tokens_12l, args.workers,
                               coactivation={"pairs": "adjacent"}, group_shards=args.group_shards))
        print(json.dumps({
            "benchmark": "scale", "machine": f"{platform.machine()} {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') >> 30} GiB",
            "results": results,
        }, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
