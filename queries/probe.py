"""Probe a neuron on new text: its activation on every token, from the job's own model.

The text is framed as the job framed its documents (BOS, or [CLS] ... [SEP]) and cut to the
job's context length, so a probe sees what the statistics saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from actscope.queries.activations import TokenActivations
from actscope.storage.errors import QueryError

if TYPE_CHECKING:
    from actscope.queries.catalog import Catalog


@dataclass(frozen=True)
class Probe:
    token_ids: list[int]
    tokens: list[str]
    activations: np.ndarray  # float32 [n_tokens]
    special: list[bool]
    truncated: bool

    def records(self) -> list[dict]:
        return [
            {"pos": i, "token_id": t, "token": s, "activation": float(a), "special": sp}
            for i, (t, s, a, sp) in enumerate(zip(self.token_ids, self.tokens, self.activations, self.special))
        ]


def probe(catalog: Catalog, hook: str, neuron: int, text: str) -> Probe:
    from actscope.pipeline.model import load_tokenizer

    catalog.check_neuron(hook, neuron)
    if not text.strip():
        raise QueryError("probe needs some text.")
    spec, framing = catalog.store.spec, catalog.model.framing
    tokenizer = load_tokenizer(spec.model, spec.model_revision)
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = spec.context_length - len(framing["prefix"]) - len(framing["suffix"])
    ids = framing["prefix"] + body[:room] + framing["suffix"]
    special = [True] * len(framing["prefix"]) + [False] * len(body[:room]) + [True] * len(framing["suffix"])
    forward, device = TokenActivations(catalog.store, hook).model()
    tokens = torch.tensor([ids], device=device)
    acts = forward(tokens, torch.ones_like(tokens))[hook][0, :, neuron].float().cpu().numpy()
    vocab = catalog.arrow("SELECT token FROM vocab WHERE token_id IN (SELECT unnest(?)) ORDER BY token_id", [sorted(set(ids))])
    strings = dict(zip(sorted(set(ids)), vocab.column(0).to_pylist()))
    return Probe(ids, [strings[i] for i in ids], acts, special, truncated=len(body) > room)
