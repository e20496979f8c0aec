"""Ground truth computed directly, without the pipeline: plain ``transformers`` forward passes with
PyTorch hooks on the Hugging Face modules, and brute-force numpy statistics."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModel


def _site(model, hook: str):
    """The Hugging Face module whose output is the TransformerLens hook ``hook``."""
    parts = hook.split(".")
    layer = int(parts[1])
    base = getattr(model, "transformer", None) or getattr(model, "encoder", None) or model
    if hasattr(base, "h"):  # GPT-2
        block = base.h[layer]
        return {"mlp.hook_post": block.mlp.act, "hook_resid_post": block, "hook_mlp_out": block.mlp}[".".join(parts[2:])]
    block = base.layer[layer]  # BERT
    return {"mlp.hook_post": block.intermediate.intermediate_act_fn, "hook_resid_post": block}[".".join(parts[2:])]


@torch.no_grad()
def activations(model_dir: str, hooks: list[str], tokens: np.ndarray, attention: np.ndarray) -> dict[str, np.ndarray]:
    """{hook: [n_seq, ctx, width] float32} from a plain transformers forward, eager attention."""
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    captured: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    handles = []
    for hook in hooks:
        def save(module, args, output, hook=hook):
            captured[hook].append((output[0] if isinstance(output, tuple) else output).detach().clone())
        handles.append(_site(model, hook).register_forward_hook(save))
    try:
        for b0 in range(0, len(tokens), 16):
            model(
                input_ids=torch.from_numpy(tokens[b0:b0 + 16].astype(np.int64)),
                attention_mask=torch.from_numpy(attention[b0:b0 + 16].astype(np.int64)),
            )
    finally:
        for handle in handles:
            handle.remove()
    return {h: torch.cat(v).float().numpy() for h, v in captured.items()}


def brute_top_k(acts: np.ndarray, counted: np.ndarray, k: int, largest: bool = True):
    """(values [k', width], token index [k', width]) per neuron: sort by value, ties by index."""
    flat = acts.reshape(-1, acts.shape[-1])
    index = np.flatnonzero(counted.reshape(-1))
    chosen = flat[index]
    score = chosen if largest else -chosen
    order = np.lexsort((np.broadcast_to(index[:, None], chosen.shape), -score), axis=0)[:k]
    return np.take_along_axis(chosen, order, axis=0), index[order]


def assert_same_top_k(got_values, got_index, ref_acts, ref_values, tol=1e-5):
    """The pipeline picked the true top-k: its values equal the reference's rank by rank, and each
    picked token's reference activation equals the recorded value. Index order may differ only
    between reference values closer than ``tol`` (float noise between two exact computations)."""
    flat = ref_acts.reshape(-1, ref_acts.shape[-1])
    np.testing.assert_allclose(got_values, ref_values, atol=tol, rtol=0)
    picked = np.take_along_axis(flat, got_index, axis=0)
    np.testing.assert_allclose(picked, got_values, atol=tol, rtol=0)


def priority(index: int, seed: int) -> int:
    """The sampling priority of a token, in plain Python integers (independent of numpy/torch)."""
    m = 0xFFFFFFFF
    x = (index ^ ((seed * 0x9E3779B1) & m)) & m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    x = (((x >> 16) ^ x) * 0x45D9F3B) & m
    return (x >> 16) ^ x


def band(value: float) -> int:
    """The octave band of a value: 16 + e for |x| in [2**(e-8), 2**(e-7)) positive, mirrored for
    negative values; -1 below 2**-8 (the near-zero bin)."""
    import math

    mag = abs(value)
    if mag < 2.0**-8:
        return -1
    octave = min(math.floor(math.log2(mag)) + 8, 15)
    return 16 + octave if value > 0 else 15 - octave


def coactivation_brute_force(xs: list[np.ndarray], thresholds: list[float]) -> dict[str, np.ndarray]:
    """All co-activation statistics over all neurons (the hooks' columns side by side), float64."""
    x = np.concatenate(xs, axis=1).astype(np.float64)
    fired = np.concatenate([(a > t) for a, t in zip(xs, thresholds)], axis=1).astype(np.float64)
    n = len(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        centred = x - (x.mean(0) if n else 0.0)
        cov = centred.T @ centred
        pearson = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
        both = fired.T @ fired
        n_a = fired.sum(0)
        return {
            "pearson": pearson, "n_both": both, "p_b_given_a": both / n_a[:, None],
            "jaccard": both / (n_a[:, None] + n_a[None, :] - both), "lift": both * n / np.outer(n_a, n_a),
        }


COACTIVATION_COLUMNS = ("hook_a", "neuron_a", "hook_b", "neuron_b", "ranking", "rank", "pearson", "jaccard", "p_b_given_a", "lift", "n_both")


def check_coactivation(rows: dict[str, np.ndarray], ref, offsets: dict[str, int], allowed: np.ndarray, m: int, tol=1e-4) -> int:
    """The ``coactivation`` table (columns as arrays) against brute force: every row pairs allowed,
    distinct neurons; its statistics equal the reference's; and each neuron's partners are its true
    top-m by |pearson| and by Jaccard, rank by rank (up to float noise between near-equal scores).
    Vectorised, so that it runs at GPT-2 small's width. Returns the number of rows checked."""
    ga = np.array([offsets[h] for h in rows["hook_a"]], dtype=np.int64) + rows["neuron_a"].astype(np.int64)
    gb = np.array([offsets[h] for h in rows["hook_b"]], dtype=np.int64) + rows["neuron_b"].astype(np.int64)
    assert allowed[ga, gb].all() and (ga != gb).all()
    for name in ("pearson", "jaccard", "p_b_given_a", "lift", "n_both"):
        np.testing.assert_allclose(np.asarray(rows[name], dtype=np.float64), ref[name][ga, gb], rtol=tol, atol=tol, err_msg=name)
    n = len(allowed)
    ranking = np.asarray(rows["ranking"])
    for name, score in (("pearson", np.abs(ref["pearson"])), ("jaccard", ref["jaccard"])):
        score = np.where(allowed & ~np.eye(n, dtype=bool) & ~np.isnan(score), score, -np.inf)
        k = min(m, n)
        expected = -np.sort(-np.partition(score, n - k, axis=1)[:, n - k:], axis=1)
        got = np.full((n, k), -np.inf)
        mine = ranking == name
        assert (rows["rank"][mine] >= 1).all() and (rows["rank"][mine] <= k).all()
        got[ga[mine], rows["rank"][mine].astype(np.int64) - 1] = score[ga[mine], gb[mine]]
        np.testing.assert_allclose(got, expected, atol=tol, err_msg=name)
    return len(ga)
