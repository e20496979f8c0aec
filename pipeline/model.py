"""The model: a TransformerLens 4 ``TransformerBridge`` over a Hugging Face model.

Activations are the bridge's default numerics, which are the Hugging Face modules' own outputs
(not compatibility mode's folded weights). The forward pass stops right after the last hooked
block: no final norm, no unembedding, no logits.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import warnings
from dataclasses import dataclass

import torch

from storage.errors import ModelError, cause
from storage.spec import JobSpec

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda was asked for, but torch sees no CUDA device. Use device: auto or cpu.")
    return torch.device(requested)


def load_tokenizer(model: str, revision: str | None = None):
    from transformers import AutoTokenizer

    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(model, revision=revision)
    except Exception as err:  # noqa: BLE001 - a broken model folder fails in many ways (types, values, files)
        raise ModelError(_load_failure(model, err)) from None


def load_model(
    model: str, device: torch.device, *, dtype: str = "float32", revision: str | None = None, tokenizer=None
):
    """Boot the bridge over a Hugging Face directory or hub id, on ``device``, in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model, revision)
    _quiet_transformers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                model, device=device, dtype=_DTYPES[dtype], tokenizer=tokenizer, revision=revision
            )
    except Exception as err:  # noqa: BLE001 - a config of the wrong types fails deep inside transformers
        raise ModelError(_load_failure(model, err)) from None
    bridge.eval()
    return bridge


def load_job_model(spec: JobSpec, device: torch.device, tokenizer=None):
    """The job's model, in the job's dtype."""
    return load_model(spec.model, device, dtype=spec.dtype, revision=spec.model_revision, tokenizer=tokenizer)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _load_failure(model: str, err: Exception) -> str:
    why = cause(err)
    if os.path.exists(model):
        return f"model: cannot load {model} as a Hugging Face model directory ({why})."
    if os.path.sep in model or model.startswith("."):
        return f"model: {model} does not exist. Give a Hugging Face model directory or a hub id."
    return (
        f"model: cannot load {model!r}: it is not a local directory and the hub could not provide "
        f"it (offline, or no such model). Cause: {why}"
    )


def prefer_sdpa(bridge, hooks: list[str]) -> bool:
    """Put attention back on PyTorch's SDPA kernel, Hugging Face's own default, when no hook
    inside attention is recorded (the bridge boots in eager mode so that such hooks fire).
    Models whose bridge reimplements attention (GPT-2's) are unaffected. True if switched."""
    if any(".attn." in hook for hook in hooks):
        return False
    model = bridge.original_model
    try:
        model.set_attn_implementation("sdpa")
    except (AttributeError, ValueError, ImportError):
        return False
    return model.config._attn_implementation == "sdpa"


def validate_hooks(bridge, hooks: list[str]) -> None:
    """Raise ModelError naming every unknown hook with the closest valid names."""
    valid = sorted(bridge.hook_dict)
    problems = []
    for hook in hooks:
        if hook in bridge.hook_dict:
            continue
        close = difflib.get_close_matches(hook, valid, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        problems.append(f"  - {hook} is not a hook of this model.{hint}")
    if problems:
        n_layers = bridge.cfg.n_layers
        examples = ", ".join(
            f"blocks.{n_layers - 1}.{name}" for name in ("mlp.hook_pre", "mlp.hook_post", "hook_resid_post", "hook_attn_out")
        )
        raise ModelError(
            "hooks: unknown hook name(s):\n" + "\n".join(problems)
            + f"\nThis model has {n_layers} blocks (0..{n_layers - 1}); per-token hooks include {examples}."
            + " `actscope hooks MODEL` lists them all."
        )


def per_token_hooks(bridge) -> list[str]:
    """The hook names whose output is one vector per token (for listing to a user)."""
    return sorted(h for h in bridge.hook_dict if not h.endswith(("hook_pattern", "hook_attn_scores")))


@dataclass(frozen=True)
class Framing:
    """How sequences are framed: prefix and suffix special tokens, the document separator."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    separator: tuple[int, ...]
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Framing:
        """Encoders (CLS and SEP defined) get [CLS] ... [SEP]; decoders get a BOS and an EOS between
        documents. The bridge's own bos id is not used: for BERT-style models it reports [UNK]."""
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        if cls_id is not None and sep_id is not None:
            return cls((cls_id,), (sep_id,), (sep_id,), pad if pad is not None else sep_id)
        separator = (eos,) if eos is not None else ()
        prefix = (bos,) if bos is not None else ()
        fallback_pad = eos if eos is not None else (bos if bos is not None else 0)
        return cls(prefix, (), separator, pad if pad is not None else fallback_pad)

    def to_dict(self) -> dict:
        return {"prefix": list(self.prefix), "suffix": list(self.suffix), "separator": list(self.separator), "pad": self.pad}


class HookedForward:
    """Runs the bridge and returns the hooked activations as [batch, pos, width] tensors.

    Hooks are attached once for the life of the object (a worker owns its model). When every hook
    lies inside ``blocks.N``, the forward stops after the last such block: a hook on its output
    raises ``StopAtLayerException``, which the bridge catches and returns from.
    """

    def __init__(self, bridge, hooks: list[str]):
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        self.bridge = bridge
        self.hooks = list(hooks)
        self._captured: dict[str, torch.Tensor] = {}
        for hook in self.hooks:
            bridge.add_hook(hook, self._capture(hook), is_permanent=True)
        last = self.last_block(self.hooks)
        if last is not None:

            def stop(tensor, hook):
                raise StopAtLayerException(tensor)

            # Registered after the capturing hooks, so on a shared hook point they run first.
            bridge.add_hook(f"blocks.{last}.hook_out", stop, is_permanent=True)

    @staticmethod
    def last_block(hooks: list[str]) -> int | None:
        """The last block every hook lies in, or None if some hook is outside the blocks."""
        layers = [_BLOCK.match(h) for h in hooks]
        if not all(layers):
            return None
        return max(int(m.group(1)) for m in layers)

    def _capture(self, name: str):
        def hook(tensor, hook):
            self._captured[name] = tensor
            return tensor

        return hook

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured.clear()
        self.bridge(tokens, attention_mask=attention_mask, return_type=None)
        batch, pos = tokens.shape
        out = {}
        for name in self.hooks:
            if name not in self._captured:
                raise ModelError(f"hook {name} did not fire during the forward pass; it cannot be recorded.")
            tensor = self._captured[name]
            if tensor.shape[:2] != (batch, pos):
                raise ModelError(
                    f"hook {name} gives shape {tuple(tensor.shape)}, not [batch, pos, ...]: "
                    "it is not one vector per token and cannot be recorded."
                )
            out[name] = tensor.reshape(batch, pos, -1)
        self._captured.clear()
        return out


def hook_widths(bridge, hooks: list[str]) -> dict[str, int]:
    """Each hook's width (neurons per token), from a forward pass on a tiny input."""
    forward = HookedForward(bridge, hooks)
    try:
        device = next(bridge.parameters()).device
        tokens = torch.zeros((1, 3), dtype=torch.long, device=device)
        acts = forward(tokens, torch.ones_like(tokens))
    finally:
        bridge.reset_hooks(including_permanent=True)
    return {name: int(tensor.shape[-1]) for name, tensor in acts.items()}
