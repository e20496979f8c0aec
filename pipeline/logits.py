"""Logit effects: the output tokens each neuron most promotes and suppresses, from the weights.

A neuron writes a direction into the residual stream: row n of ``W_out`` for an MLP neuron
(``blocks.L.mlp.hook_post``), the basis vector e_n for a residual-stream unit (``hook_resid_*``,
``hook_mlp_out``, ``hook_attn_out``). Its direct effect on the logits is that direction through
the final normalisation and the unembedding: ``(direction - mean) * gamma @ W_U`` for LayerNorm
(which centres, then scales by gamma), ``direction * gamma @ W_U`` for RMSNorm. The norm's
division by the token's scale is a positive number per token, the same for every output, so it
changes no ranking and is left out; so are the norm's bias and ``b_U`` (constant in the
direction). Values are therefore *relative* effects, comparable within a neuron.

Only causal language models (a class ending in ``ForCausalLM`` or ``LMHeadModel``) get logit
effects: a masked-LM head (BERT's) passes the residual through a dense layer and a GELU first,
so no single direction-to-logit map exists.
"""

from __future__ import annotations

import re

import numpy as np
import torch

_MLP_POST = re.compile(r"^blocks\.(\d+)\.mlp\.hook_post$")
_RESIDUAL = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_mid|resid_post|mlp_out|attn_out)$")
ROWS_PER_BLOCK = 1024


def has_unembedding(bridge) -> bool:
    name = type(bridge.original_model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel")) and hasattr(bridge, "unembed")


def directions(bridge, hook: str) -> torch.Tensor | None:
    """[width, d_model] the residual-stream direction each unit of ``hook`` writes, or None."""
    if match := _MLP_POST.match(hook):
        return bridge.blocks[int(match.group(1))].mlp.W_out.detach()
    if _RESIDUAL.match(hook):
        return torch.eye(bridge.cfg.d_model, device=bridge.W_U.device, dtype=bridge.W_U.dtype)
    return None


def output_map(bridge) -> torch.Tensor:
    """[d_model, vocab]: the final norm's gain folded into W_U, and LayerNorm's centring."""
    w_u = bridge.W_U.detach().float()
    norm = getattr(getattr(bridge, "ln_final", None), "original_component", None)
    if norm is None or getattr(norm, "weight", None) is None:
        return w_u
    gamma = norm.weight.detach().float()
    if "gemma" in type(norm).__name__.lower():
        gamma = 1.0 + gamma  # Gemma's RMSNorm scales by (1 + weight)
    folded = gamma[:, None] * w_u
    if isinstance(norm, torch.nn.LayerNorm) or "layernorm" in type(norm).__name__.lower():
        folded = folded - folded.mean(0, keepdim=True)  # (d - mean(d)) @ M == d @ (M - mean_rows(M))
    return folded


@torch.no_grad()
def logit_effects(bridge, hooks: list[str], k: int, latents: dict | None = None) -> dict[str, dict[str, np.ndarray]]:
    """{hook: promote_ids/promote_values/suppress_ids/suppress_values [k, width]} for the hooks
    that write a residual direction; nothing for the others or for non-causal-LM models.
    ``latents``: {SAE name: (its hook, decoder rows [d_sae, hook width])}: a latent writes its
    decoder row in the hook's space, so its direction is that row through the hook's own
    directions (``W_dec @ W_out`` for an MLP hook, ``W_dec`` for a residual one)."""
    if not has_unembedding(bridge):
        return {}
    out_map = output_map(bridge)
    sites = [(hook, directions(bridge, hook)) for hook in hooks]
    for name, (hook, w_dec) in (latents or {}).items():
        through = directions(bridge, hook)
        if through is not None:
            sites.append((name, w_dec.float().to(through.device) @ through.float()))
    results = {}
    for hook, direction in sites:
        if direction is None:
            continue
        parts = {"promote_ids": [], "promote_values": [], "suppress_ids": [], "suppress_values": []}
        for rows in torch.split(direction.float().to(out_map.device), ROWS_PER_BLOCK):
            effect = rows @ out_map
            for side, largest in (("promote", True), ("suppress", False)):
                top = torch.topk(effect, min(k, effect.shape[1]), dim=1, largest=largest)
                parts[f"{side}_ids"].append(top.indices.T.to(torch.int32).cpu().numpy())
                parts[f"{side}_values"].append(top.values.T.cpu().numpy())
        results[hook] = {name: np.concatenate(p, axis=1) for name, p in parts.items()}
    return results
