"""The job spec: a frozen, validated description of one cache job.

Built at the boundary (YAML or the store's attributes → ``JobSpec``) with no I/O, written into
the store it produced, and read back from it unchanged. Each field's description is its
documentation: docs/job-file.md's table says the same words (tests/test_docs.py checks it).
"""

from __future__ import annotations

import difflib
import os
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actscope.storage.errors import JobSpecError, short

PositiveInt = Annotated[int, Field(gt=0)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(min_length=1, max_length=4096)]  # paths, URLs, hook names


def Bounded(limit: int, why: str) -> Any:
    """A positive int of at most ``limit`` (``why`` is the reason, shown in the error)."""
    return Annotated[int, Field(gt=0, le=limit, json_schema_extra={"why": why})]


#: Ranks are int16 in the tables; keeping more than this many ranked rows per neuron also costs
#: a worker 16 bytes per neuron per rank (top and bottom).
MAX_RANKED = 10_000
#: Tokens in one shard: token indices within a shard are 32-bit in the top-k keys, and a shard's
#: tokens and dense buffers live in a worker's memory.
MAX_SHARD_TOKENS = 1 << 24

#: Fields that say how a job is executed, not what it computes: changing them between a run and
#: its resumption is allowed, so they are left out of the job's fingerprint.
EXECUTION_FIELDS = frozenset({"store", "workers", "batch_size", "device"})

#: Hooks whose activations are not one vector per token (attention patterns and scores are
#: [batch, head, query, key]); per-neuron statistics over tokens make no sense for them.
_NOT_PER_TOKEN = re.compile(r"\.hook_(pattern|attn_scores)$")


#: Statistics a job may switch off (top examples and moments are always computed).
OPTIONAL_STATISTICS = ("bottom", "histogram", "samples", "tokens", "logits", "coactivation")
StatisticName = Literal["bottom", "histogram", "samples", "tokens", "logits", "coactivation"]


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class DatasetSpec(_Frozen):
    """Where the corpus comes from: the arguments of ``datasets.load_dataset``."""

    path: Name = Field(
        description="First argument of `datasets.load_dataset`: `text`, `json`, `parquet`, `csv`, or a hub id."
    )
    name: str | None = Field(None, description="Dataset configuration name (hub datasets).")
    data_files: list[str] | None = Field(
        None, description="Local files or globs (one or a list)."
    )
    split: str = Field("train", description="Split to read.")
    text_column: str = Field("text", description="Column holding each document's text.")
    max_tokens: Bounded(1 << 40, "at most 2**40 tokens") | None = Field(
        None, description="Stop after this many corpus tokens."
    )
    revision: str | None = Field(None, description="Hub revision of the dataset.")

    @field_validator("data_files", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class CoactivationSpec(_Frozen):
    """Which neuron pairs co-activation covers, and on how many tokens."""

    stride: Bounded(1 << 20, "a stride beyond 2**20 keeps no tokens") = Field(
        32, description="Use a hashed 1-in-`stride` subsample of the counted tokens; 1 = every token (exact over the whole corpus, about 32x the cost)."
    )
    pairs: Literal["auto", "all", "within", "adjacent"] = Field(
        "auto", description="Site pairs: `all`, `within` (same hook), `adjacent` (same or next layer); `auto`: `all` where "
        "the neuron pairs' co-moments fit 4 GiB a worker, else `adjacent` where they fit, else `within` (the plan prints its choice)."
    )
    partners: Bounded(1000, "ranks are kept per neuron") = Field(10, description="Partners kept per neuron, by |pearson| and by Jaccard.")
    hooks: list[str] | None = Field(None, description="Hooks (and SAEs, by name) taking part; SAE latents take part only when named (their pairs with each other are kept sparse; with a hook's neurons, `N x w` dense).")


_SITE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")


class SAESpec(_Frozen):
    """A sparse autoencoder over one of the job's hooks: its latents become units like neurons."""

    name: str = Field(description="The latents' site name: the `hook` column of every table, the CLI's and pages' hook argument.")
    path: Name = Field(description="A folder in SAELens's layout (`cfg.json` + `sae_weights.safetensors`) or Sparsify's (`cfg.json` + `sae.safetensors`).")
    hook: Name | None = Field(None, description="The hook it reads; one of `hooks` (Sparsify configs name module paths, so give it).")
    hook_out: Name | None = Field(None, description="A transcoder's output hook (`hook_name_out`): checked against the model, its decoder rows' directions for logit effects, its FVU's target when it is one of `hooks`.")
    fold_w_dec_norm: bool = Field(False, description="Each latent times its decoder row's norm (SAELens's `fold_W_dec_norm`; Neuronpedia's numbers).")
    scaling_factor: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="The input scale of an `expected_average_only_in` SAE, which SAELens's `from_pretrained` folds in by release.",
    )

    @field_validator("name")
    @classmethod
    def _site_name(cls, name: str) -> str:
        if not _SITE_NAME.match(name) or name.startswith(("blocks.", "hook_")):
            raise ValueError(
                f"{short(name)} cannot name an SAE: a letter, then letters, digits, '_', '.' or '-' (at most 128), "
                "not starting like a hook (blocks., hook_)"
            )
        return name


class JobSpec(_Frozen):
    """One cache job: a model, a corpus, the hook points to record, and where to store it all."""

    model: Name = Field(description="A Hugging Face model directory or hub id.")
    model_revision: str | None = Field(None, description="Hub revision of the model.")
    dataset: DatasetSpec = Field(description="The corpus.")
    context_length: Bounded(1 << 17, "and at most the model's positions") = Field(128, description="Tokens per sequence, special tokens included.")
    hooks: list[Name] = Field(
        min_length=1, max_length=4096, description="TransformerLens hook names to record (`actscope hooks MODEL` lists them)."
    )
    dense: list[Name] = Field(
        default_factory=list, description="Hooks whose every activation is kept in the store (fp16, compressed); an SAE's name keeps its latents, sparse (CSR rows per shard, fp16 values)."
    )
    top_k: Bounded(MAX_RANKED, "ranks are int16 and cost 16 bytes per neuron each") = Field(32, description="Examples kept per neuron.")
    store: Name = Field(description="Where the store goes: a local path or an fsspec URL.")
    workers: Bounded(4096, "one model each") | Literal["auto"] = Field(
        1, description="Ray workers, one model each; `auto` = one per GPU, else one per CPU."
    )
    shard_size: Bounded(1 << 16, "a shard is one worker's unit of memory") = Field(256, description="Sequences per shard: the unit of the token and dense arrays' chunks.")
    group_shards: Bounded(1 << 20, "a group's token indices are 32-bit") | Literal["auto"] = Field(
        "auto",
        description="Shards per accumulation group, the unit of work, commit and retry; auto: the fewest that keep the "
        "state a group writes at about 1 KB per corpus token. Smaller groups spread a job over more workers and lose "
        'less to a crash, for more store bytes (see "What a job costs").',
    )
    batch_size: Bounded(1 << 14, "sequences in one forward") = Field(16, description="Sequences per forward pass.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto` (CUDA when available), `cpu` or `cuda`.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="`float32`, `float16` or `bfloat16`: the model's weights and activations."
    )
    thresholds: dict[str, FiniteFloat] = Field(
        default_factory=dict,
        description="Per hook, the activation above which a neuron counts as active (`frac_active`); 0 when not given.",
    )
    include_special_tokens: bool = Field(
        False, description="Count BOS/EOS/CLS/SEP positions in statistics (padding never counts)."
    )
    statistics: list[StatisticName] = Field(
        default_factory=lambda: list(OPTIONAL_STATISTICS),
        description="Optional statistics to compute: any of `bottom`, `histogram`, `samples`, `tokens`, `logits`, `coactivation` (top examples and moments always are). A table whose statistic is off is empty.",
    )
    examples: Literal["token", "document"] = Field(
        "token", description="`token`: the top/bottom examples are any tokens; `document`: at most one per document, its best token (as Neuroscope)."
    )
    samples_per_band: Bounded(256, "a worker holds 32 bands x this per neuron") = Field(4, description="Sampled examples kept per neuron and activation band (octave of |x|, per sign).")
    band_sample_rate: float = Field(
        0.125, gt=0, le=1, allow_inf_nan=False, description="Fraction of tokens (chosen by a seeded hash) eligible as band samples; 1 = every token."
    )
    random_samples: Bounded(4096, "every neuron's value is kept on each") = Field(16, description="Uniformly sampled counted tokens, with every neuron's value on them.")
    seed: int = Field(0, ge=0, lt=2**32, description="Seed of the sampling hash (samples are deterministic and independent of sharding).")
    top_tokens: Bounded(1000, "ranks are kept per neuron") = Field(10, description="Vocabulary tokens kept per neuron, by mean activation.")
    tracked_tokens: Bounded(1 << 24, "a vocabulary's size") | Literal["auto", "all"] = Field(
        "auto",
        description="Vocabulary tokens whose activation sums every neuron keeps (`token_stats`): `all`; a number N: the N most "
        "frequent counted tokens of the corpus's first group of shards (ties by lower id); `auto`: all where their sums fit "
        "2 GiB a worker, else as many of the most frequent as fit (the plan prints its choice). SAE latents keep their "
        "sparse sums over every token.",
    )
    min_token_count: Bounded(1 << 40, "a count of tokens") = Field(
        4, description="Occurrences a token needs before its mean activation ranks."
    )
    top_logits: Bounded(1000, "ranks are kept per neuron") = Field(10, description="Output tokens kept per neuron, most promoted and most suppressed.")
    coactivation: CoactivationSpec = Field(
        default_factory=CoactivationSpec, description="Co-activation of neuron pairs (on unless `statistics` leaves it out)."
    )
    saes: list[SAESpec] = Field(
        default_factory=list, max_length=256,
        description="Sparse autoencoders over hooks, each a list entry; their latents get every statistic, as neurons do (see [SAE latents](#sae-latents)).",
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
        names = [s.name for s in self.saes]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"saes: names must be unique; repeated: {', '.join(repeated)}")
        clash = [n for n in names if n in self.hooks]
        if clash:
            raise ValueError(f"saes: {', '.join(clash)} is a hook's name; give the SAE a name of its own")
        for sae in self.saes:
            if sae.hook is not None and sae.hook not in self.hooks:
                raise ValueError(f"saes: {sae.name} reads {sae.hook}, which is not in hooks; add it to hooks")
        for option in ("dense", "thresholds", "coactivation.hooks"):
            value = self.coactivation.hooks or [] if option == "coactivation.hooks" else getattr(self, option)
            missing = [h for h in value if h not in self.sites]
            if missing:
                raise ValueError(f"{option} lists hooks that are not in hooks or saes: {', '.join(missing)}")
        return self

    @property
    def sites(self) -> list[str]:
        """Every set of units the job reduces: its hooks, then its SAEs' latents (by name)."""
        return [*self.hooks, *(s.name for s in self.saes)]

    def sae(self, name: str) -> SAESpec | None:
        return next((s for s in self.saes if s.name == name), None)

    @model_validator(mode="after")
    def _shard_fits(self) -> JobSpec:
        tokens = self.shard_size * self.context_length
        if tokens > MAX_SHARD_TOKENS:
            raise ValueError(
                f"shard_size x context_length is {tokens:,} tokens per shard; at most {MAX_SHARD_TOKENS:,} "
                "(a shard is held in one worker's memory): lower shard_size"
            )
        if self.group_shards != "auto" and self.group_shards * tokens > 1 << 31:
            raise ValueError(
                f"group_shards x shard_size x context_length is {self.group_shards * tokens:,} tokens per group; at most "
                f"{1 << 31:,} (token indices within a group are 32-bit): lower group_shards"
            )
        return self

    @field_validator("statistics")
    @classmethod
    def _unique_statistics(cls, names: list[str]) -> list[str]:
        return sorted(set(names), key=OPTIONAL_STATISTICS.index)

    def computes(self, statistic: str) -> bool:
        return statistic in self.statistics

    def coactivation_hooks(self) -> list[str]:
        """The sites taking part in co-activation, in job order (none when it is off): every hook
        by default, SAEs' latents when ``coactivation.hooks`` names them (their pairs with each
        other are kept sparse, but with a hook's neurons they are dense, N x w: chosen, not
        implied)."""
        if not self.computes("coactivation"):
            return []
        chosen = self.coactivation.hooks
        return [h for h in self.sites if (h in self.hooks and chosen is None) or (chosen is not None and h in chosen)]

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
    shown = 20
    for problem in err.errors()[:shown]:
        where = ".".join(str(part)[:60] for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(str(problem["loc"][-1]), _fields(problem["loc"]), n=1, cutoff=0.6)
            message = (f"unknown key; did you mean {guess[0]}?" if guess else "unknown key;") + f" valid keys here: {_valid_keys(problem['loc'])}"
        elif problem["type"] == "missing":
            message = "required field is missing"
        elif problem["type"] == "less_than_equal" and _why(problem["loc"]):
            message = f"{message} ({_why(problem['loc'])}; got {short(problem.get('input'))})"
        elif "input" in problem and problem["type"] not in ("value_error",):
            message = f"{message} (got {short(problem['input'])})"
        lines.append(f"  - {where}: {message}")
    if err.error_count() > shown:
        lines.append(f"  ... and {err.error_count() - shown} more")
    return "\n".join(lines)


def _why(loc: tuple[Any, ...]) -> str | None:
    """The reason a field has its upper bound (``Bounded``'s ``why``)."""
    nested = {"dataset": DatasetSpec, "coactivation": CoactivationSpec}
    model, name = (nested.get(loc[0]), loc[1]) if len(loc) > 1 else (JobSpec, loc[0])
    field = model.model_fields.get(name) if model is not None and isinstance(name, str) else None
    extra = field.json_schema_extra if field is not None else None
    if extra is None and field is not None:  # an optional bounded field keeps it in its annotation
        extra = next((m.json_schema_extra for a in getattr(field.annotation, "__args__", ()) for m in getattr(a, "__metadata__", ()) if getattr(m, "json_schema_extra", None)), None)
    return extra.get("why") if isinstance(extra, dict) else None


def _fields(loc: tuple[Any, ...]) -> list[str]:
    nested = {"dataset": DatasetSpec, "coactivation": CoactivationSpec, "saes": SAESpec}
    model: type[BaseModel] = nested.get(loc[0], JobSpec) if len(loc) > 1 else JobSpec
    return list(model.model_fields)


def _valid_keys(loc: tuple[Any, ...]) -> str:
    return ", ".join(_fields(loc))


#: Folder names that say nothing of the model in them: its parent's name is kept with them.
_GENERIC_FOLDERS = frozenset({"model", "models", "checkpoint", "weights", "hf", "final", "latest"})


def model_title(model: str) -> str:
    """How pages, sites and exports name a job's ``model``: a hub id as it is; a local folder by
    its name (a hub cache's ``models--org--name`` folder as ``org/name``; a generic name such as
    ``model`` with its parent's), never by its path on the machine that ran the job."""
    if "://" not in model and not os.path.isabs(model) and not os.path.exists(model):
        return model  # a hub id
    parts = [p for p in model.replace("\\", "/").rstrip("/").split("/") if p not in ("", ".")]
    for part in parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    if len(parts) > 1 and parts[-1].lower() in _GENERIC_FOLDERS:
        return f"{parts[-2]}/{parts[-1]}"
    return parts[-1] if parts else model

