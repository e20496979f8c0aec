"""The job spec: a frozen, validated description of one cache job.

Built at the boundary (YAML or the store's attributes → ``JobSpec``) with no I/O, written into
the store it produced, and read back from it unchanged. Each field's description is its
documentation (the README's job-file table is generated from it).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from storage.errors import JobSpecError

PositiveInt = Annotated[int, Field(gt=0)]

#: Fields that say how a job is executed, not what it computes: changing them between a run and
#: its resumption is allowed, so they are left out of the job's fingerprint.
EXECUTION_FIELDS = frozenset({"store", "workers", "batch_size", "device"})

#: Hooks whose activations are not one vector per token (attention patterns and scores are
#: [batch, head, query, key]); per-neuron statistics over tokens make no sense for them.
_NOT_PER_TOKEN = re.compile(r"\.hook_(pattern|attn_scores)$")


#: Statistics a job may switch off (top examples and moments are always computed).
OPTIONAL_STATISTICS = ("bottom", "histogram", "samples", "tokens", "logits", "coactivation")
Statistic = Literal["bottom", "histogram", "samples", "tokens", "logits", "coactivation"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DatasetSpec(_Frozen):
    """Where the corpus comes from: the arguments of ``datasets.load_dataset``."""

    path: str = Field(
        description="First argument of datasets.load_dataset: text, json, parquet, csv, or a hub id."
    )
    name: str | None = Field(None, description="Dataset configuration name (hub datasets).")
    data_files: list[str] | None = Field(
        None, description="Local files or globs, relative to the job file's folder."
    )
    split: str = Field("train", description="Split to read.")
    text_column: str = Field("text", description="Column holding each document's text.")
    max_tokens: PositiveInt | None = Field(
        None, description="Stop after this many corpus tokens (all of the corpus if unset)."
    )
    revision: str | None = Field(None, description="Hub revision of the dataset.")

    @field_validator("data_files", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class CoactivationSpec(_Frozen):
    """Which neuron pairs co-activation covers, and on how many tokens."""

    stride: PositiveInt = Field(
        32, description="Use a hashed 1-in-stride subsample of the counted tokens (1 = every token)."
    )
    pairs: Literal["all", "within", "adjacent"] = Field(
        "all", description="Site pairs: all, within (same hook), adjacent (same or next layer)."
    )
    partners: PositiveInt = Field(10, description="Partners kept per neuron and ranking.")
    hooks: list[str] | None = Field(None, description="Hooks taking part (default: every hook).")


class JobSpec(_Frozen):
    """One cache job: a model, a corpus, the hook points to record, and where to store it all."""

    model: str = Field(description="A Hugging Face model directory or hub id.")
    model_revision: str | None = Field(None, description="Hub revision of the model.")
    dataset: DatasetSpec = Field(description="The corpus.")
    context_length: PositiveInt = Field(128, description="Tokens per sequence, special tokens included.")
    hooks: list[str] = Field(
        min_length=1, description="TransformerLens hook names to record, e.g. blocks.0.mlp.hook_post."
    )
    dense: list[str] = Field(
        default_factory=list, description="Hooks whose every activation is kept in the store (fp16)."
    )
    top_k: PositiveInt = Field(32, description="Examples kept per neuron at each extreme.")
    store: str = Field(description="Where the store goes: a local path or an fsspec URL.")
    workers: PositiveInt | Literal["auto"] = Field(
        1, description="Ray workers (one model each); auto = one per GPU, else one per CPU."
    )
    shard_size: PositiveInt = Field(256, description="Sequences per shard, the unit of work and retry.")
    batch_size: PositiveInt = Field(16, description="Sequences per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Model weights and activations' dtype."
    )
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="Per hook, the activation above which a neuron counts as active (default 0).",
    )
    include_special_tokens: bool = Field(
        False, description="Count BOS/EOS/CLS/SEP positions in statistics (padding never counts)."
    )
    statistics: list[Statistic] = Field(
        default_factory=lambda: list(OPTIONAL_STATISTICS),
        description="Optional statistics to compute (all by default); top examples and moments always are.",
    )
    examples: Literal["token", "document"] = Field(
        "token", description="Top and bottom examples: any tokens, or at most one per document (as Neuroscope)."
    )
    samples_per_band: PositiveInt = Field(4, description="Sampled examples kept per activation band (octave).")
    band_sample_rate: float = Field(
        0.125, gt=0, le=1, description="Fraction of tokens (a seeded hash decides which) eligible as band samples."
    )
    random_samples: PositiveInt = Field(16, description="Uniformly sampled counted tokens, with every neuron's value.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the deterministic sampling.")
    top_tokens: PositiveInt = Field(10, description="Vocabulary tokens kept per neuron, by mean activation.")
    min_token_count: PositiveInt = Field(
        4, description="Occurrences a token needs before its mean activation can rank."
    )
    top_logits: PositiveInt = Field(10, description="Output tokens kept per neuron, promoted and suppressed.")
    coactivation: CoactivationSpec = Field(
        default_factory=CoactivationSpec, description="Co-activation of neuron pairs (see its fields)."
    )

    @field_validator("hooks", "dense")
    @classmethod
    def _unique_per_token_hooks(cls, hooks: list[str]) -> list[str]:
        duplicates = sorted({h for h in hooks if hooks.count(h) > 1})
        if duplicates:
            raise ValueError(f"hooks must be unique; repeated: {', '.join(duplicates)}")
        for hook in hooks:
            if _NOT_PER_TOKEN.search(hook):
                raise ValueError(
                    f"{hook} is not one vector per token (attention patterns are per head and "
                    "query-key pair); record blocks.L.attn.hook_z or hook_attn_out instead"
                )
        return hooks

    @model_validator(mode="after")
    def _hook_options_name_hooks(self) -> JobSpec:
        for option in ("dense", "thresholds", "coactivation.hooks"):
            value = self.coactivation.hooks or [] if option == "coactivation.hooks" else getattr(self, option)
            missing = [h for h in value if h not in self.hooks]
            if missing:
                raise ValueError(f"{option} lists hooks that are not in hooks: {', '.join(missing)}")
        return self

    @field_validator("statistics")
    @classmethod
    def _unique_statistics(cls, names: list[str]) -> list[str]:
        return sorted(set(names), key=OPTIONAL_STATISTICS.index)

    def computes(self, statistic: str) -> bool:
        return statistic in self.statistics

    def coactivation_hooks(self) -> list[str]:
        """The hooks taking part in co-activation, in job order (none when it is off)."""
        if not self.computes("coactivation"):
            return []
        chosen = self.coactivation.hooks
        return [h for h in self.hooks if chosen is None or h in chosen]

    def threshold(self, hook: str) -> float:
        return self.thresholds.get(hook, 0.0)

    def result_fields(self) -> dict[str, Any]:
        """The fields that determine the job's results (everything but execution details)."""
        return self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "job") -> JobSpec:
        """Validate ``data``; every problem is reported with the field it concerns."""
        if not isinstance(data, dict):
            raise JobSpecError(
                f"{source}: expected a mapping of fields (model, dataset, hooks, store, ...). "
                f"Got {type(data).__name__} instead."
            )
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise JobSpecError(_describe(err, source)) from None


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} problem(s) in the job file:"]
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = f"unknown key; valid keys here: {_valid_keys(problem['loc'])}"
        elif problem["type"] == "missing":
            message = "required field is missing"
        elif "input" in problem and problem["type"] not in ("value_error",):
            message = f"{message} (got {problem['input']!r})"
        lines.append(f"  - {where}: {message}")
    return "\n".join(lines)


def _valid_keys(loc: tuple[Any, ...]) -> str:
    nested = {"dataset": DatasetSpec, "coactivation": CoactivationSpec}
    model: type[BaseModel] = nested.get(loc[0], JobSpec) if len(loc) > 1 else JobSpec
    return ", ".join(model.model_fields)
