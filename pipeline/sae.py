"""Sparse autoencoders over a hook: read from disk, encoded on the worker's device.

SAELens itself cannot be imported here (sae-lens 6 needs TransformerLens below 4), so the files
are read directly and the encoders follow SAELens's own formulas (``sae_lens/saes/*.py``):

- **Layouts.** SAELens (``cfg.json`` + ``sae_weights.safetensors``), 6.x configs (``architecture``,
  fields under ``metadata``) and earlier ones (``hook_point`` or ``hook_name``,
  ``activation_fn_str``, no ``architecture``: standard, or topk when its ``activation_fn_kwargs``
  give k); EleutherAI Sparsify (``cfg.json`` + ``sae.safetensors``: ``encoder.weight``,
  ``encoder.bias``, ``W_dec``, ``b_dec``; its hook points are module paths, so ``hook:`` is
  given in the job).
- **Input.** ``x`` (float32) is normalised as ``normalize_activations`` says (``none``;
  ``constant_norm_rescale``: ``x * sqrt(d_in) / |x|``; ``layer_norm``: ``(x - mean) / (std + 1e-5)``
  with torch's unbiased std; ``expected_average_only_in``: ``x * scaling_factor``, the factor
  SAELens's ``from_pretrained`` folds in, which a local folder's config does not hold, so the job
  gives it), then ``b_dec`` is subtracted when ``apply_b_dec_to_input`` (Sparsify: always, for an
  autoencoder).
- **Architectures.** ``standard``: ``relu(x W_enc + b_enc)``. ``jumprelu``: ``relu(pre) * (pre >
  threshold)`` (``threshold``, or ``exp(log_threshold)``). ``gated``: ``(x W_enc + b_gate > 0) *
  relu(x (W_enc * exp(r_mag)) + b_mag)``. ``topk``: the k largest of ``pre`` (times ``|W_dec|``
  rows when ``rescale_acts_by_decoder_norm``), through a ReLU, the rest 0. Sparsify ``topk``: the
  k largest of ``relu(x W^T + b)``. Anything else (batch-top-k, transcoders, temporal or
  matching-pursuit SAEs, hook_z SAEs, Sparsify's groupmax) is refused by name.
- **fold_w_dec_norm** (standard, jumprelu, gated): every latent times its decoder row's norm, as
  SAELens's ``fold_W_dec_norm`` gives (and Neuronpedia shows).

Weights are read as stored and used in float32 (a bfloat16 SAE is upcast: its latents are then
float32 sums of bfloat16 products, not SAELens's bfloat16 arithmetic).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from actscope.storage.errors import JobSpecError

ARCHITECTURES = ("standard", "jumprelu", "gated", "topk")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
_REFUSED = {
    "batchtopk": "batch-top-k SAEs are a training-time architecture (SAELens saves them as jumprelu for inference)",
    "matryoshka_batchtopk": "batch-top-k SAEs are a training-time architecture (SAELens saves them as jumprelu for inference)",
    "transcoder": "transcoders are not supported yet",
    "skip_transcoder": "transcoders are not supported yet",
    "jumprelu_transcoder": "transcoders are not supported yet",
    "temporal": "temporal SAEs read more than one token",
}
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class SAEInfo:
    """What a job records of one SAE (in the store's model record, under ``saes``)."""

    name: str
    hook: str
    path: str
    layout: str  # saelens | sparsify
    architecture: str
    d_in: int
    d_sae: int
    dtype: str
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    scaling_factor: float | None = None
    rescale_acts_by_decoder_norm: bool = False
    fold_w_dec_norm: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def read_config(entry, source: str = "saes") -> SAEInfo:
    """The SAE ``entry`` of a job (``SAESpec``) as a checked :class:`SAEInfo`, from its folder's
    ``cfg.json`` and the weights' shapes; a folder that is not an SAE, or an SAE actscope cannot
    encode, is a :class:`JobSpecError` naming the SAE and why."""
    where = f"{source}: {entry.name} ({entry.path})"
    folder = Path(entry.path).expanduser()
    cfg_path = folder / "cfg.json"
    if not folder.is_dir():
        raise JobSpecError(f"{where}: not a folder; give the folder holding cfg.json and the weights.")
    if not cfg_path.is_file():
        raise JobSpecError(f"{where}: no cfg.json in the folder (SAELens and Sparsify folders have one).")
    if cfg_path.stat().st_size > MAX_CONFIG_BYTES:
        raise JobSpecError(f"{where}: cfg.json is larger than 1 MiB; not an SAE config.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise JobSpecError(f"{where}: cfg.json is not JSON ({err}).") from None
    if not isinstance(cfg, dict):
        raise JobSpecError(f"{where}: cfg.json is not a JSON object.")
    if (folder / "sae.safetensors").is_file() and not (folder / "sae_weights.safetensors").is_file():
        return _sparsify(entry, cfg, folder, where)
    if not (folder / "sae_weights.safetensors").is_file():
        raise JobSpecError(f"{where}: no weights: expected sae_weights.safetensors (SAELens) or sae.safetensors (Sparsify).")
    return _saelens(entry, cfg, folder, where)


def _shapes(path: Path, where: str) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise JobSpecError(f"{where}: {path.name} cannot be read as safetensors ({str(err).splitlines()[0][:200]}).") from None


def _saelens(entry, cfg: dict, folder: Path, where: str) -> SAEInfo:
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = str(cfg.get("sae_lens_version") or meta.get("sae_lens_version") or "")
    modern = "architecture" in cfg and (version.split(".")[0].isdigit() and int(version.split(".")[0]) >= 6 or "metadata" in cfg)
    hook_in_cfg = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if modern:
        architecture = cfg["architecture"]
        k = cfg.get("k")
    else:
        activation = cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu"
        kwargs = cfg.get("activation_fn_kwargs") or {}
        architecture = cfg.get("architecture") or "standard"
        k = cfg.get("k")
        if activation == "topk" and kwargs.get("k") is not None:
            architecture, k = "topk", kwargs["k"]
        elif activation not in ("relu", "topk"):
            raise JobSpecError(f"{where}: activation {activation!r} is not one actscope encodes (relu, topk).")
    if architecture in _REFUSED:
        raise JobSpecError(f"{where}: architecture {architecture!r}: {_REFUSED[architecture]}.")
    if architecture not in ARCHITECTURES:
        raise JobSpecError(f"{where}: architecture {architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}.")
    if cfg.get("reshape_activations", "none") not in (None, "none") or "hook_z" in str(hook_in_cfg or ""):
        raise JobSpecError(f"{where}: hook_z SAEs read per-head activations, which actscope does not record yet.")
    normalize = cfg.get("normalize_activations", "none")
    if isinstance(normalize, bool):  # SAELens before 6: a bool for the expected-average scaling
        normalize = "expected_average_only_in" if normalize else "none"
    normalize = normalize or "none"
    if normalize not in NORMALIZATIONS:
        raise JobSpecError(f"{where}: normalize_activations {normalize!r} is not one of {', '.join(NORMALIZATIONS)}.")
    scaling = entry.scaling_factor
    if normalize == "expected_average_only_in" and scaling is None:
        raise JobSpecError(
            f"{where}: normalize_activations is expected_average_only_in, whose scaling factor SAELens's "
            "from_pretrained looks up by release; give it as scaling_factor in the job's saes entry."
        )
    shapes = _shapes(folder / "sae_weights.safetensors", where)
    needed = {"standard": ("W_enc", "b_enc", "W_dec", "b_dec"), "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
              "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec"), "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")}
    missing = [name for name in needed[architecture] if name not in shapes]
    if architecture == "jumprelu" and not {"threshold", "log_threshold"} & set(shapes):
        missing.append("threshold (or log_threshold)")
    if missing:
        raise JobSpecError(f"{where}: sae_weights.safetensors lacks {', '.join(missing)} for a {architecture} SAE.")
    d_in, d_sae = shapes["W_enc"][0][0], shapes["W_enc"][0][1]
    if "d_in" in cfg and "d_sae" in cfg and (cfg["d_in"], cfg["d_sae"]) != (d_in, d_sae):
        raise JobSpecError(f"{where}: cfg.json says d_in {cfg['d_in']}, d_sae {cfg['d_sae']}; W_enc is {d_in} x {d_sae}.")
    if architecture == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
        raise JobSpecError(f"{where}: a topk SAE needs k, a whole number from 1 to d_sae ({d_sae}); got {k!r}.")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if entry.fold_w_dec_norm and architecture == "topk":
        raise JobSpecError(f"{where}: fold_w_dec_norm would change which latents a topk SAE keeps; leave it off.")
    return SAEInfo(
        name=entry.name, hook=_hook(entry, hook_in_cfg, where), path=str(folder.resolve()), layout="saelens",
        architecture=architecture, d_in=d_in, d_sae=d_sae, dtype=shapes["W_enc"][1].lower(), k=k if architecture == "topk" else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), normalize_activations=normalize,
        scaling_factor=scaling, rescale_acts_by_decoder_norm=rescale, fold_w_dec_norm=entry.fold_w_dec_norm,
    )


def _sparsify(entry, cfg: dict, folder: Path, where: str) -> SAEInfo:
    if cfg.get("transcode"):
        raise JobSpecError(f"{where}: Sparsify transcoders are not supported yet.")
    if cfg.get("activation", "topk") != "topk":
        raise JobSpecError(f"{where}: Sparsify activation {cfg.get('activation')!r} is not supported (topk is).")
    if cfg.get("skip_connection"):
        raise JobSpecError(f"{where}: Sparsify skip connections decode from the input; not supported.")
    if entry.fold_w_dec_norm:
        raise JobSpecError(f"{where}: fold_w_dec_norm would change which latents a top-k SAE keeps; leave it off.")
    shapes = _shapes(folder / "sae.safetensors", where)
    missing = [name for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") if name not in shapes]
    if missing:
        raise JobSpecError(f"{where}: sae.safetensors lacks {', '.join(missing)}.")
    d_sae, d_in = shapes["encoder.weight"][0]
    k = cfg.get("k")
    if not (isinstance(k, int) and 0 < k <= d_sae):
        raise JobSpecError(f"{where}: cfg.json needs k, a whole number from 1 to {d_sae}; got {k!r}.")
    if entry.hook is None:
        raise JobSpecError(f"{where}: Sparsify names its hook point by module path; give the TransformerLens hook as hook:.")
    return SAEInfo(
        name=entry.name, hook=entry.hook, path=str(folder.resolve()), layout="sparsify", architecture="topk",
        d_in=d_in, d_sae=d_sae, dtype=shapes["encoder.weight"][1].lower(), k=k,
    )


def _hook(entry, hook_in_cfg, where: str) -> str:
    if entry.hook is not None:
        return entry.hook
    if not hook_in_cfg:
        raise JobSpecError(f"{where}: cfg.json names no hook (hook_name); give hook: in the job.")
    return str(hook_in_cfg)


class Encoder:
    """One SAE's encoder on a device: ``encode(x [n, d_in]) -> [n, d_sae]``, float32."""

    def __init__(self, info: SAEInfo, device: torch.device):
        from safetensors.torch import load_file

        self.info = info
        name = "sae.safetensors" if info.layout == "sparsify" else "sae_weights.safetensors"
        w = {k: v.to(device=device, dtype=torch.float32) for k, v in load_file(str(Path(info.path) / name)).items()}
        if info.layout == "sparsify":
            w = {"W_enc": w["encoder.weight"].T.contiguous(), "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
        if info.architecture == "jumprelu" and "threshold" not in w:
            w["threshold"] = w["log_threshold"].exp()
        if info.architecture == "gated":
            w["W_mag"] = w["W_enc"] * w["r_mag"].exp()
        self.w = w
        self.norms = w["W_dec"].norm(dim=-1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        info, w = self.info, self.w
        x = x.float()
        if info.normalize_activations == "constant_norm_rescale":
            x = x * (math.sqrt(info.d_in) / x.norm(dim=-1, keepdim=True))
        elif info.normalize_activations == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            x = centred / (centred.std(dim=-1, keepdim=True) + 1e-5)
        elif info.normalize_activations == "expected_average_only_in":
            x = x * info.scaling_factor
        if info.apply_b_dec_to_input or info.layout == "sparsify":
            x = x - w["b_dec"]
        arch = info.architecture
        if arch == "gated":
            gate = (x @ w["W_enc"] + w["b_gate"]) > 0
            latents = torch.relu(x @ w["W_mag"] + w["b_mag"]) * gate
        else:
            pre = x @ w["W_enc"] + w["b_enc"]
            if arch == "standard":
                latents = torch.relu(pre)
            elif arch == "jumprelu":
                latents = torch.relu(pre) * (pre > w["threshold"])
            else:  # topk
                if info.layout == "sparsify":
                    pre = torch.relu(pre)
                elif info.rescale_acts_by_decoder_norm:
                    pre = pre * self.norms
                top = torch.topk(pre, info.k, dim=-1)
                latents = torch.zeros_like(pre).scatter_(-1, top.indices, torch.relu(top.values))
        if info.fold_w_dec_norm:
            latents = latents * self.norms
        return latents

    def directions(self) -> torch.Tensor:
        """[d_sae, d_in]: what each latent writes, in the hook's space (decoder rows; with folded
        norms, the rows scaled to unit norm, since the latents carry the norms)."""
        w_dec = self.w["W_dec"]
        return w_dec / self.norms[:, None].clamp_min(1e-30) if self.info.fold_w_dec_norm else w_dec


__all__ = ["ARCHITECTURES", "Encoder", "SAEInfo", "read_config"]
