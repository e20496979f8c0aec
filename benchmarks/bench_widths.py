"""A job at Llama-3.1-8B's widths on this machine: 2 layers, every default statistic, one worker.

The model is Llama-3.1-8B's config with 2 layers (d_model 4,096, 14,336 MLP neurons a layer,
grouped-query attention, a 128,256-token vocabulary), random init, float32, saved here with a
`tokenizers` WordLevel vocabulary of the real size; the corpus is words drawn from a Zipf law
over that vocabulary, so that token frequencies look like text's. The job records both
``mlp.hook_post`` hooks (28,672 neurons) with the defaults, which the plan fits to the machine:
token sums over the most frequent tokens of the first group, co-activation within each layer.

Prints JSON: the plan's lines, the phases' seconds, peak resident memory, and the brute-force
check against a plain ``transformers`` forward + numpy over the store's own tokens: every
neuron's top activation and mean (largest differences), and for a sample of neurons their token
means over the tracked tokens and their co-activation partners' Pearson correlations.

Usage: python benchmarks/bench_widths.py [--tokens 8192] [--sample 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

VOCAB, D_MODEL, D_MLP, LAYERS, CONTEXT = 128_256, 4096, 14_336, 2, 128


def build(root: Path) -> Path:
    """The 2-layer model of Llama-3.1-8B's widths and its tokenizer (random init, float32)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = root / "llama-8b-widths-2L"
    vocab = {"<|begin_of_text|>": 0, "<|end_of_text|>": 1, "<unk>": 2} | {f"w{i}": i + 3 for i in range(VOCAB - 3)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", unk_token="<unk>").save_pretrained(path)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP, num_hidden_layers=LAYERS, num_attention_heads=32,
                         num_key_value_heads=8, max_position_embeddings=CONTEXT, rope_theta=500_000.0, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def corpus(root: Path, tokens: int) -> Path:
    """Documents of words drawn from a Zipf law over the vocabulary (exponent 1.1)."""
    rng = np.random.default_rng(0)
    words = np.minimum(rng.zipf(1.1, size=tokens * 2), VOCAB - 3) - 1
    path = root / "corpus.jsonl"
    docs = np.array_split(words, max(1, len(words) // 300))
    path.write_text("".join(json.dumps({"text": " ".join(f"w{w}" for w in doc)}) + "\n" for doc in docs))
    return path


def brute_force(model: Path, store, sample: int) -> dict:
    import duckdb
    import torch
    from transformers import LlamaForCausalLM

    from actscope.pipeline.tokenstats import tracked_tokens
    from actscope.storage.store import PAD, TEXT

    data = store.read_tokens(0, store.n_seq, ("tokens", "kinds"))
    hf = LlamaForCausalLM.from_pretrained(model).eval()
    acts: dict[int, list] = {}
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, n=n: acts.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
               for n, layer in enumerate(hf.model.layers)]
    with torch.no_grad():
        for start in range(0, store.n_seq, 8):
            ids = torch.from_numpy(data["tokens"][start:start + 8].astype(np.int64))
            hf(input_ids=ids, attention_mask=torch.from_numpy(data["kinds"][start:start + 8] != PAD).long(), use_cache=False)
    for h in handles:
        h.remove()
    del hf
    counted = (data["kinds"] == TEXT).reshape(-1)
    ids = data["tokens"].reshape(-1)[counted]
    tracked = tracked_tokens(store)
    table = store.table_url
    rng = np.random.default_rng(1)
    out = {"max_abs_diff_top1": 0.0, "max_abs_diff_mean": 0.0, "max_abs_diff_token_mean": 0.0, "token_rows_checked": 0,
           "max_abs_diff_pearson": 0.0, "coactivation_rows_checked": 0, "tracked_tokens": None if tracked is None else len(tracked)}
    for n, parts in sorted(acts.items()):
        x = torch.cat(parts).numpy()[counted]
        hook = f"blocks.{n}.mlp.hook_post"
        top = duckdb.sql(f"SELECT neuron, activation FROM '{table('top_examples')}' WHERE hook = '{hook}' AND rank = 1 ORDER BY neuron").fetchnumpy()
        mean = duckdb.sql(f"SELECT neuron, mean FROM '{table('neuron_stats')}' WHERE hook = '{hook}' ORDER BY neuron").fetchnumpy()
        assert len(top["neuron"]) == len(mean["neuron"]) == D_MLP
        out["max_abs_diff_top1"] = max(out["max_abs_diff_top1"], float(np.abs(top["activation"] - x.max(0)[top["neuron"]]).max()))
        out["max_abs_diff_mean"] = max(out["max_abs_diff_mean"], float(np.abs(mean["mean"] - x.astype(np.float64).mean(0)[mean["neuron"]]).max()))
        neurons = np.sort(rng.choice(D_MLP, size=sample, replace=False))
        for neuron in neurons.tolist():
            rows = duckdb.sql(f"SELECT token_id, mean_activation, count FROM '{table('token_stats')}' WHERE hook = '{hook}' AND neuron = {neuron} ORDER BY rank").fetchall()
            for token, value, count in rows:
                assert tracked is None or token in set(tracked.tolist()), "a token outside the tracked set ranked"
                here = ids == token
                assert here.sum() == count
                out["max_abs_diff_token_mean"] = max(out["max_abs_diff_token_mean"], abs(float(x[here, neuron].astype(np.float64).mean()) - value))
                out["token_rows_checked"] += 1
        chosen = _coactivation_tokens(store, counted)
        xs = x[chosen].astype(np.float64)
        for a, b, pearson in duckdb.sql(
            f"SELECT neuron_a, neuron_b, pearson FROM '{table('coactivation')}' WHERE hook_a = '{hook}' AND hook_b = '{hook}' "
            f"AND ranking = 'pearson' AND neuron_a IN ({', '.join(map(str, neurons.tolist()))})"
        ).fetchall():
            truth = np.corrcoef(xs[:, a], xs[:, b])[0, 1]
            out["max_abs_diff_pearson"] = max(out["max_abs_diff_pearson"], abs(float(truth) - pearson))
            out["coactivation_rows_checked"] += 1
    return out


def _coactivation_tokens(store, counted) -> np.ndarray:
    """The counted tokens co-activation samples (a seeded hash, 1 in ``stride``), as positions
    among the counted tokens."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' plain-Python hash, not the pipeline's
    from tests.reference import priority

    spec = store.spec
    everywhere = np.flatnonzero(counted)
    keep = [priority(int(i), spec.seed) < 2**32 // spec.coactivation.stride for i in everywhere]
    return np.flatnonzero(keep)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--sample", type=int, default=64, help="neurons a hook whose token means and partners are checked")
    args = parser.parse_args()
    from actscope.jobs.jobfile import load_job
    from actscope.jobs.runner import dry_run, run_job
    from actscope.storage.store import Store

    root = Path(tempfile.mkdtemp(prefix="actscope-bench-widths-"))
    try:
        start = time.perf_counter()
        model = build(root)
        built = time.perf_counter() - start
        job = {"model": str(model), "dataset": {"path": "json", "data_files": [str(corpus(root, args.tokens))], "max_tokens": args.tokens},
               "context_length": CONTEXT, "hooks": [f"blocks.{i}.mlp.hook_post" for i in range(LAYERS)], "store": str(root / "job.zarr"), "workers": 1}
        (root / "job.yaml").write_text(yaml.safe_dump(job))
        spec = load_job(root / "job.yaml")
        plan = dry_run(spec, use_ray=False)
        start = time.perf_counter()
        summary = run_job(spec, use_ray=False)
        seconds = time.perf_counter() - start
        store = Store.open(spec.store)
        result = {
            "model_build_s": round(built, 1), "plan": plan, "tokens": summary.n_tokens, "seconds_total": round(seconds, 1),
            "phases_s": {k: round(v, 1) for k, v in summary.phases.items()},
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "tables": {name: int(__import__("duckdb").sql(f"SELECT count(*) FROM '{store.table_url(name)}'").fetchall()[0][0])
                       for name in ("top_examples", "bottom_examples", "neuron_stats", "histograms", "band_samples", "random_samples",
                                    "token_stats", "logit_effects", "coactivation")},
        }
        result["brute_force"] = brute_force(model, store, args.sample)
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
