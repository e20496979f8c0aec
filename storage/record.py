"""The model record: what the plan found out about a job's model, written into the store
(``attrs["model"]``) and read by workers, the reduce, queries and reports.

A frozen dataclass with typed fields (the one place they are named); the store keeps it as a
plain JSON mapping. Every field has a default so that a record written by an older actscope, or
a partial one made by a test or benchmark, still reads; unknown keys are ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelRecord:
    name: str = ""  # as the job gives it: a hub id or a local folder (``queries.text.model_title`` shows it)
    architecture: str = ""  # the Hugging Face class, e.g. GPT2LMHeadModel
    n_layers: int = 0
    d_model: int = 0
    vocab_size: int = 0
    hook_widths: dict[str, int] = field(default_factory=dict)  # every recorded site: hooks and SAE latents
    framing: dict[str, Any] = field(default_factory=dict)  # the tokenizer's special tokens (``pipeline.model.Framing``)
    forward: dict[str, Any] | None = None  # the module hooks (``pipeline.model.forward_plan``)
    saes: dict[str, dict[str, Any]] = field(default_factory=dict)  # by SAE name: ``pipeline.sae.SAEInfo`` as a dict
    sources: dict[str, Any] | None = None  # the digest of every model, SAE and corpus file
    fingerprint: str | None = None  # of the model, SAEs and corpus, from ``sources``
    tracked_tokens: int = 0  # the plan's choice of the token sums' rows (``capacity.tracked_token_count``); 0: every token

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any] | ModelRecord) -> ModelRecord:
        if isinstance(attrs, ModelRecord):
            return attrs
        return cls(**_known(cls, {k: v for k, v in attrs.items() if not (k == "saes" and v is None)}))

    def to_attrs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StoreStatus:
    """How far a store's job has got (``attrs["status"]``), changed only by ``Store.update_status``."""

    tokenized: bool = False  # the corpus is in the token arrays; n_seq and the groups are final
    n_seq: int = 0
    complete: bool = False  # every group committed, reduced and indexed
    shards_per_group: int | None = None  # fixed before the first worker opens the store

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> StoreStatus:
        return cls(**_known(cls, attrs))

    def to_attrs(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _known(cls, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``attrs`` that are fields of ``cls`` (a newer actscope's extra keys are left out)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in attrs.items() if k in fields}
