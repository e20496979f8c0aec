"""SAEs for tests, written in the layouts SAELens and Sparsify save, and a numpy encoder written
from the formulas (independently of ``pipeline.sae``) to check latents against."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def write_sae(folder: Path, *, d_in: int, d_sae: int, architecture: str = "standard", layout: str = "saelens6",
              hook: str | None = "blocks.1.hook_resid_post", seed: int = 0, k: int | None = None,
              normalize: str = "none", apply_b_dec_to_input: bool = True, log_threshold: bool = False,
              weights: dict[str, np.ndarray] | None = None, d_out: int | None = None, hook_out: str | None = None,
              skip: bool = False) -> Path:
    """A random SAE (about a fifth of its latents active on the tiny model's activations) in
    ``layout``: ``saelens6`` (architecture + metadata), ``saelens5`` (hook_point,
    activation_fn_str, no architecture for standard/topk), or ``sparsify``. ``d_out`` makes it a
    transcoder (SAELens: a ``*transcoder`` architecture; Sparsify: ``transcode``) writing
    ``hook_out``; ``skip`` adds a skip connection."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w = weights or {}
    if not weights:
        w_enc = rng.normal(0, 1 / np.sqrt(d_in), (d_in, d_sae)).astype(np.float32)
        w = {
            "W_enc": w_enc, "b_enc": rng.normal(-0.3, 0.2, d_sae).astype(np.float32),
            "W_dec": (rng.normal(0, 1, (d_sae, d_out or d_in)) * rng.uniform(0.3, 2.0, (d_sae, 1))).astype(np.float32),
            "b_dec": rng.normal(0, 0.05, d_out or d_in).astype(np.float32),
        }
        if skip:
            w["W_skip"] = rng.normal(0, 0.1, (d_out or d_in, d_in)).astype(np.float32)
        if architecture.startswith("jumprelu"):
            threshold = rng.uniform(0.0, 0.4, d_sae).astype(np.float32)
            w["log_threshold" if log_threshold else "threshold"] = np.log(threshold) if log_threshold else threshold
        if architecture == "gated":
            w["b_gate"] = w.pop("b_enc")
            w["r_mag"] = rng.normal(0, 0.3, d_sae).astype(np.float32)
            w["b_mag"] = rng.normal(0, 0.2, d_sae).astype(np.float32)
    if layout == "sparsify":
        save_file({"encoder.weight": np.ascontiguousarray(w["W_enc"].T), "encoder.bias": w["b_enc"], "W_dec": w["W_dec"],
                   "b_dec": w["b_dec"], **({"W_skip": w["W_skip"]} if skip else {})}, str(folder / "sae.safetensors"))
        cfg = {"activation": "topk", "expansion_factor": d_sae // d_in, "normalize_decoder": True, "num_latents": d_sae,
               "k": k, "multi_topk": False, "skip_connection": skip, "transcode": d_out is not None, "d_in": d_in}
    else:
        save_file(w, str(folder / "sae_weights.safetensors"))
        if layout == "saelens6":
            cfg = {"architecture": architecture, "d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu",
                   "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize,
                   "reshape_activations": "none", "metadata": {"sae_lens_version": "6.18.0", "hook_name": hook, "model_name": "tiny"}}
            if k is not None:
                cfg["k"] = k
            if d_out is not None:
                cfg.update(d_out=d_out, hook_name_out=hook_out, hook_layer_out=1)
        else:  # before SAELens 6
            cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "hook_point": hook, "hook_point_layer": 1,
                   "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": normalize == "expected_average_only_in",
                   "activation_fn_str": "topk" if architecture == "topk" else "relu", "sae_lens_training_version": "3.14.0"}
            if architecture == "topk":
                cfg["activation_fn_kwargs"] = {"k": k}
            elif architecture != "standard":
                cfg["architecture"] = architecture
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def encode(folder: Path, x: np.ndarray, *, fold: bool = False, scaling_factor: float | None = None) -> np.ndarray:
    """Latents of ``x`` [..., d_in] (float64), by the formulas of SAELens and Sparsify."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    x = np.asarray(x, np.float64)
    if (folder / "sae.safetensors").exists():
        w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "sae.safetensors")).items()}
        pre = np.maximum((x if cfg["transcode"] else x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"], 0)
        return _keep_top(pre, cfg["k"])
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "sae_weights.safetensors")).items()}
    arch = cfg.get("architecture") or ("topk" if cfg.get("activation_fn_str") == "topk" else "standard")
    transcoder = arch.endswith("transcoder")
    arch = {"transcoder": "standard", "skip_transcoder": "standard"}.get(arch, arch.replace("_skip", "").replace("_transcoder", ""))
    normalize = cfg.get("normalize_activations", "none")
    if normalize is True or normalize == "expected_average_only_in":
        x = x * scaling_factor
    elif normalize == "constant_norm_rescale":
        x = x * np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True)
    elif normalize == "layer_norm":
        c = x - x.mean(-1, keepdims=True)
        x = c / (c.std(-1, ddof=1, keepdims=True) + 1e-5)
    if cfg.get("apply_b_dec_to_input", True) and not transcoder:  # a transcoder's b_dec is its output's
        x = x - w["b_dec"]
    if arch == "gated":
        out = (x @ w["W_enc"] + w["b_gate"] > 0) * np.maximum(x @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"], 0)
    else:
        pre = x @ w["W_enc"] + w["b_enc"]
        if arch == "standard":
            out = np.maximum(pre, 0)
        elif arch == "jumprelu":
            threshold = w["threshold"] if "threshold" in w else np.exp(w["log_threshold"])
            out = np.where(pre > threshold, np.maximum(pre, 0), 0.0)
        elif arch == "abstopk":  # the k largest in magnitude, signed
            out = np.zeros_like(pre)
            top = np.argsort(-np.abs(pre), axis=-1, kind="stable")[..., : cfg["k"]]
            np.put_along_axis(out, top, np.take_along_axis(pre, top, -1), -1)
        else:
            out = _keep_top(pre, cfg.get("k") or cfg["activation_fn_kwargs"]["k"])
    if fold:
        out = out * np.linalg.norm(w["W_dec"], axis=-1)
    return out


def _keep_top(pre: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros_like(pre)
    top = np.argsort(-pre, axis=-1, kind="stable")[..., :k]
    np.put_along_axis(out, top, np.maximum(np.take_along_axis(pre, top, -1), 0), -1)
    return out
