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
  rows when ``rescale_acts_by_decoder_norm``), through a ReLU, the rest 0. ``abstopk``: the k of
  ``pre`` largest in magnitude, signed (no ReLU). Sparsify ``topk``: the k largest of
  ``relu(x W^T + b)``.
- **Transcoders** (SAELens ``transcoder``, ``skip_transcoder``, ``jumprelu_transcoder``,
  ``jumprelu_skip_transcoder``; Sparsify ``transcode: true``): the latents are the encoder's on
  the *input* hook (``b_dec`` is the output's bias, so it is never subtracted from the input; a
  skip connection changes the output, not the latents); the output hook (``hook_name_out``, or
  the job's ``hook_out``) is recorded, and the decoder rows are directions there (logit effects).
  Refused by name: batch-top-k (saved as jumprelu for inference), temporal or matching-pursuit
  SAEs, hook_z SAEs, Sparsify's groupmax, cross-layer transcoders.
- **fold_w_dec_norm** (standard, jumprelu, gated): every latent times its decoder row's norm, as
  SAELens's ``fold_W_dec_norm`` gives (and Neuronpedia shows).

Weights are read as stored and used in float32 (a bfloat16 SAE is upcast: its latents are then
float32 sums of bfloat16 products, not SAELens's bfloat16 arithmetic).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from actscope.pipeline.nonzero import NonZeros
from actscope.storage.errors import JobSpecError

ARCHITECTURES = (
    "standard", "jumprelu", "gated", "topk", "abstopk",
    "transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder",
)
#: A transcoder's encoder is one of the SAEs' (its skip connection acts on the output only).
TRANSCODERS = {"transcoder": "standard", "skip_transcoder": "standard", "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm", "expected_average_only_in")
_REFUSED = {
    "batchtopk": "batch-top-k SAEs are a training-time architecture (SAELens saves them as jumprelu for inference)",
    "matryoshka_batchtopk": "batch-top-k SAEs are a training-time architecture (SAELens saves them as jumprelu for inference)",
    "temporal": "temporal SAEs read more than one token",
    "clt": "cross-layer transcoders read and write every layer",
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
    transcoder: bool = False  # latents of ``hook``; the decoder writes ``hook_out``
    hook_out: str | None = None
    d_out: int | None = None  # the decoder's width (d_in for an SAE)
    skip: bool = False  # a skip connection (W_skip) adds x W_skip^T to the output

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def encoder(self) -> str:
        """The encoding formula: the architecture's, a transcoder's that of its SAE kind."""
        return TRANSCODERS.get(self.architecture, self.architecture)


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
    except RecursionError:
        raise JobSpecError(f"{where}: cfg.json is nested too deeply to be an SAE config.") from None
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
    kind = TRANSCODERS.get(architecture, architecture)
    transcoder, skip = architecture in TRANSCODERS, "skip" in architecture
    needed = ["W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"] if kind == "gated" else ["W_enc", "b_enc", "W_dec", "b_dec"]
    missing = [name for name in needed + ["W_skip"] * skip if name not in shapes]
    if kind == "jumprelu" and not {"threshold", "log_threshold"} & set(shapes):
        missing.append("threshold (or log_threshold)")
    if missing:
        raise JobSpecError(f"{where}: sae_weights.safetensors lacks {', '.join(missing)} for a {architecture} SAE.")
    _matrix(shapes, "W_enc", where)
    _matrix(shapes, "W_dec", where)
    d_in, d_sae = shapes["W_enc"][0]
    if "d_in" in cfg and "d_sae" in cfg and (cfg["d_in"], cfg["d_sae"]) != (d_in, d_sae):
        raise JobSpecError(f"{where}: cfg.json says d_in {cfg['d_in']}, d_sae {cfg['d_sae']}; W_enc is {d_in} x {d_sae}.")
    if entry.hook_out and not transcoder:
        raise JobSpecError(f"{where}: hook_out names a transcoder's output hook; this is a {architecture} SAE, which writes back to its own hook.")
    top_k = architecture in ("topk", "abstopk")
    if top_k and not (_whole(k) and 0 < k <= d_sae):
        raise JobSpecError(f"{where}: a {architecture} SAE needs k, a whole number from 1 to d_sae ({d_sae}); got {k!r}.")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    if entry.fold_w_dec_norm and top_k:
        raise JobSpecError(f"{where}: fold_w_dec_norm would change which latents a {architecture} SAE keeps; leave it off.")
    d_out = shapes["W_dec"][0][-1]
    if shapes["W_dec"][0] != (d_sae, d_out) or shapes["b_dec"][0] != (d_out,) or (not transcoder and d_out != d_in):
        raise JobSpecError(f"{where}: W_dec is {shapes['W_dec'][0]} and b_dec {shapes['b_dec'][0]}; expected ({d_sae}, {d_in if not transcoder else 'd_out'}) and the same d_out.")
    vectors = {name: (d_sae,) for name in ("b_enc", "b_gate", "r_mag", "b_mag", "threshold", "log_threshold")}
    _check_tensors(folder / "sae_weights.safetensors", shapes, {**vectors, "W_skip": (d_out, d_in)}, where)
    return SAEInfo(
        name=entry.name, hook=_hook(entry, hook_in_cfg, where), path=str(folder.resolve()), layout="saelens",
        architecture=architecture, d_in=d_in, d_sae=d_sae, dtype=shapes["W_enc"][1].lower(), k=k if top_k else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)) and not transcoder, normalize_activations=normalize,
        scaling_factor=scaling, rescale_acts_by_decoder_norm=rescale, fold_w_dec_norm=entry.fold_w_dec_norm,
        transcoder=transcoder, d_out=d_out, skip=skip,
        hook_out=entry.hook_out or (meta.get("hook_name_out") or cfg.get("hook_name_out") or None if transcoder else None),
    )


def _sparsify(entry, cfg: dict, folder: Path, where: str) -> SAEInfo:
    if cfg.get("activation", "topk") != "topk":
        raise JobSpecError(f"{where}: Sparsify activation {cfg.get('activation')!r} is not supported (topk is).")
    if entry.fold_w_dec_norm:
        raise JobSpecError(f"{where}: fold_w_dec_norm would change which latents a top-k SAE keeps; leave it off.")
    transcoder, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    shapes = _shapes(folder / "sae.safetensors", where)
    missing = [name for name in ("encoder.weight", "encoder.bias", "W_dec", "b_dec") + ("W_skip",) * skip if name not in shapes]
    if missing:
        raise JobSpecError(f"{where}: sae.safetensors lacks {', '.join(missing)}.")
    _matrix(shapes, "encoder.weight", where)
    _matrix(shapes, "W_dec", where)
    d_sae, d_in = shapes["encoder.weight"][0]
    k = cfg.get("k")
    if not (_whole(k) and 0 < k <= d_sae):
        raise JobSpecError(f"{where}: cfg.json needs k, a whole number from 1 to {d_sae}; got {k!r}.")
    if entry.hook is None:
        raise JobSpecError(f"{where}: Sparsify names its hook point by module path; give the TransformerLens hook as hook:.")
    if entry.hook_out and not transcoder:
        raise JobSpecError(f"{where}: hook_out names a transcoder's output hook; this Sparsify folder is an autoencoder (transcode is false).")
    d_out = shapes["W_dec"][0][-1]
    if not transcoder and d_out != d_in:
        raise JobSpecError(f"{where}: W_dec is {shapes['W_dec'][0]}; an autoencoder's rows are d_in ({d_in}) wide.")
    expected = {"encoder.bias": (d_sae,), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in)}
    _check_tensors(folder / "sae.safetensors", shapes, expected, where)
    return SAEInfo(
        name=entry.name, hook=entry.hook, path=str(folder.resolve()), layout="sparsify", architecture="topk",
        d_in=d_in, d_sae=d_sae, dtype=shapes["encoder.weight"][1].lower(), k=k, apply_b_dec_to_input=not transcoder,
        transcoder=transcoder, hook_out=entry.hook_out if transcoder else None, d_out=d_out, skip=skip,
    )


def _whole(value) -> bool:
    """A whole number, not a bool (``k: true`` is 1 to Python and a mistake to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _matrix(shapes: dict, name: str, where: str) -> None:
    """``name`` is a matrix with no empty side (a latent count or a width of 0 is no SAE)."""
    shape = shapes[name][0]
    if len(shape) != 2 or 0 in shape:
        raise JobSpecError(f"{where}: {name} has shape {shape}; expected a matrix with both sides at least 1.")


#: Elements read at a time when the weights are checked for NaN and infinity.
_CHECK_BLOCK = 1 << 24


def _check_tensors(path: Path, shapes: dict, expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Every tensor named in ``expected`` that the file has is of that shape, and every tensor in
    the file is finite: a NaN or an infinity in a weight or a threshold makes latents that are
    NaN or never fire, silently. Read a block of rows at a time (bounded memory)."""
    from safetensors import safe_open

    for name, shape in expected.items():
        if name in shapes and shapes[name][0] != shape:
            raise JobSpecError(f"{where}: {name} has shape {shapes[name][0]}; expected {shape}.")
    with safe_open(str(path), framework="pt") as f:
        for name in shapes:
            tensor = f.get_slice(name)
            shape = tuple(tensor.get_shape())
            if not shape or not tensor.get_dtype().startswith(("F", "BF")):
                continue  # scalars and integer tensors cannot hold NaN
            rows = max(1, _CHECK_BLOCK // max(1, math.prod(shape[1:])))
            for start in range(0, shape[0], rows):
                if not torch.isfinite(tensor[start : start + rows]).all():
                    raise JobSpecError(f"{where}: {name} holds NaN or infinite values; this SAE's latents would be NaN or never fire.")


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
        if info.encoder == "jumprelu" and "threshold" not in w:
            w["threshold"] = w["log_threshold"].exp()
        if info.encoder == "gated":
            w["W_mag"] = w["W_enc"] * w["r_mag"].exp()
        self.w = w
        self.norms = w["W_dec"].norm(dim=-1)

    def _normalized(self, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """``x`` as the SAE reads it, and the map SAELens applies to its output to undo that
        (``run_time_activation_norm_fn_out``; none for a transcoder, whose output is another
        hook's)."""
        info = self.info
        undo = lambda y: y
        if info.normalize_activations == "constant_norm_rescale":
            scale = math.sqrt(info.d_in) / x.norm(dim=-1, keepdim=True)
            x, undo = x * scale, lambda y: y / scale
        elif info.normalize_activations == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            std = (x - mean).std(dim=-1, keepdim=True)
            x, undo = (x - mean) / (std + 1e-5), lambda y: y * std + mean
        elif info.normalize_activations == "expected_average_only_in":
            x, undo = x * info.scaling_factor, lambda y: y / info.scaling_factor
        return x, (lambda y: y) if info.transcoder else undo

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(self._normalized(x.float())[0], nonzeros=False)[0]

    @torch.no_grad()
    def encode_with_nonzeros(self, x: torch.Tensor) -> tuple[torch.Tensor, NonZeros | None]:
        """The latents, and, where the architecture chose them (top-k: k a token), their
        non-zero entries as ``NonZeros.of`` would find them (row-major, every token), from the
        chosen indices: no scan of the ``[tokens, d_sae]`` zeros. None for the others."""
        return self._encode(self._normalized(x.float())[0], nonzeros=True)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """The SAE's output for input ``x`` whose latents are ``latents`` (in the hook's units:
        SAELens's ``decode``; a transcoder's prediction of its output hook)."""
        w = self.w
        x = x.float()
        _, undo = self._normalized(x)
        if self.info.fold_w_dec_norm or self.info.rescale_acts_by_decoder_norm:
            latents = latents / self.norms  # the latents carry the decoder norms
        out = latents @ w["W_dec"] + w["b_dec"]
        if self.info.skip:
            out = out + x @ w["W_skip"].T
        return undo(out)

    @torch.no_grad()
    def quality(self, x: torch.Tensor, latents: torch.Tensor, target: torch.Tensor | None) -> dict[str, float]:
        """Sums from which L0 and the fraction of variance unexplained follow, over the tokens
        (rows) given: ``tokens``, ``active`` (non-zero latents), and, where ``target`` is known
        (the input for an SAE, the output hook's activations for a transcoder), ``sse`` (squared
        error of the reconstruction) and ``sst`` (squared deviation from the target's mean)."""
        out = {"tokens": float(len(x)), "active": float((latents != 0).sum())}
        if target is not None and len(x):
            target = target.double()
            out["sse"] = float(((self.reconstruct(x, latents).double() - target) ** 2).sum())
            out["sst"] = float(((target - target.mean(0)) ** 2).sum())
        return out

    def _encode(self, x: torch.Tensor, *, nonzeros: bool) -> tuple[torch.Tensor, NonZeros | None]:
        info, w = self.info, self.w
        if info.apply_b_dec_to_input:  # never for a transcoder (its b_dec is the output's)
            x = x - w["b_dec"]
        arch = info.encoder
        if arch == "gated":
            gate = (x @ w["W_enc"] + w["b_gate"]) > 0
            latents = torch.relu(x @ w["W_mag"] + w["b_mag"]) * gate
        else:
            pre = x @ w["W_enc"] + w["b_enc"]
            if arch == "standard":
                latents = torch.relu(pre)
            elif arch == "jumprelu":
                latents = torch.relu(pre) * (pre > w["threshold"])
            else:  # topk, abstopk
                if info.layout == "sparsify":
                    pre = torch.relu(pre)
                elif info.rescale_acts_by_decoder_norm:
                    pre = pre * self.norms
                if arch == "abstopk":
                    index = torch.topk(pre.abs(), info.k, dim=-1).indices
                    latents = torch.zeros_like(pre).scatter_(-1, index, pre.gather(-1, index))
                else:
                    top = torch.topk(pre, info.k, dim=-1)
                    index = top.indices
                    latents = torch.zeros_like(pre).scatter_(-1, index, torch.relu(top.values))
                if info.fold_w_dec_norm:
                    latents = latents * self.norms
                return latents, chosen_nonzeros(latents, index) if nonzeros else None
        if info.fold_w_dec_norm:
            latents = latents * self.norms
        return latents, None

    def directions(self) -> torch.Tensor:
        """[d_sae, d_out]: what each latent writes, in the hook's space (a transcoder's: its output
        hook's), the decoder rows; with folded norms, the rows scaled to unit norm, since the
        latents carry the norms."""
        w_dec = self.w["W_dec"]
        return w_dec / self.norms[:, None].clamp_min(1e-30) if self.info.fold_w_dec_norm else w_dec


def chosen_nonzeros(latents: torch.Tensor, index: torch.Tensor) -> NonZeros:
    """The non-zero entries among each token's chosen latents ``index`` [tokens, k], in the
    order ``torch.nonzero`` gives (token, then latent)."""
    index = index.sort(dim=-1).values
    values = latents.gather(-1, index)
    keep = values != 0
    rows = torch.arange(len(latents), device=latents.device)[:, None].expand_as(index)
    return NonZeros(rows[keep], index[keep], values[keep], len(latents), latents.shape[1])


__all__ = ["ARCHITECTURES", "TRANSCODERS", "Encoder", "SAEInfo", "chosen_nonzeros", "read_config"]
