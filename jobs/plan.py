"""The plan: everything checked before a store is touched (the job file's cheap checks, the
model, its hooks and SAEs, memory, the corpus), and what the run will do with the store's path
(``Plan.action``). Nothing here writes."""

from __future__ import annotations

import dataclasses
import gc
import glob
import json
import os
import re
from dataclasses import dataclass
from enum import StrEnum

from actscope.pipeline.capacity import (
    Estimate,
    gib,
    latents_per_token,
    machine_memory,
    partial_bytes,
    shards_per_group,
    store_bytes,
    tracked_token_count,
    worker_memory,
)
from actscope.pipeline.coactivation import chosen_pairs, dense_pair_sizes
from actscope.pipeline.corpus import check_corpus
from actscope.pipeline.fingerprint import changed_sources, data_files, fingerprint, sources
from actscope.pipeline.model import (
    Framing,
    describe_forward,
    forward_plan,
    hook_widths,
    load_job_model,
    load_skeleton,
    load_tokenizer,
    validate_hooks,
)
from actscope.storage.errors import CorpusError, JobSpecError, ModelError, StoreError
from actscope.storage.record import ModelRecord
from actscope.storage.spec import JobSpec
from actscope.storage.store import Store, Target, inspect_target, local_path


class Action(StrEnum):
    """What a run does with the store's path (``Plan.action``)."""

    CREATE = "create"
    RESUME = "resume"
    REPLACE = "replace"


@dataclass
class Plan:
    """What a run will do, decided before anything is written.

    ``action``: ``create`` (nothing at the store's path), ``resume`` (the same job's store), or
    ``replace`` (``--overwrite`` of another job's store: the new one is built at ``build_url``
    beside it and swapped in when it is complete; on an object store, where folders cannot be
    renamed, the old one is deleted just before the new one is created)."""

    action: Action
    build_url: str
    model: ModelRecord
    tokenizer: object
    memory: Estimate
    memory_limit: int | None  # bytes one worker may use where the plan can see its device
    existing: Store | None = None

    def describe(self, spec: JobSpec) -> list[str]:
        verbs = {Action.CREATE: "create a new store at", Action.RESUME: "resume the store at", Action.REPLACE: "replace the store at"}
        lines = [f"{verbs[self.action]} {spec.store}" + (f" (built at {self.build_url}, swapped in when complete)" if self.build_url != spec.store else "")]
        lines.append(f"model: {self.model.name} ({self.model.architecture}, {self.model.n_layers} layers, vocabulary {self.model.vocab_size:,})")
        saes = self.model.saes
        for hook, width in self.model.hook_widths.items():
            if hook in saes:
                s = saes[hook]
                writes = f", writes {s['hook_out'] or 'an unnamed hook'}" if s.get("transcoder") else ""
                lines.append(f"sae: {hook} ({s['architecture']} {s['layout']}, {s['d_in']:,} -> {s['d_sae']:,} latents, reads {s['hook']}{writes})")
            else:
                lines.append(f"hook: {hook} ({width:,} units{', dense' if hook in spec.dense else ''})")
        lines.append(f"forward: {describe_forward(self.model.forward)}")
        if spec.computes("tokens") and any(not spec.sae(site) for site in self.model.hook_widths):
            lines.append(_describe_token_sums(spec, self.model))
        if spec.coactivation_hooks():
            lines.append(_describe_pairs(spec, self.model.hook_widths))
        partial = partial_bytes(spec, self.model.hook_widths, self.model.vocab_size)
        shard_tokens = spec.shard_size * spec.context_length
        widths, vocab = self.model.hook_widths, self.model.vocab_size
        if spec.dataset.max_tokens:
            n_tokens = spec.dataset.max_tokens
            n_shards = -(-n_tokens // shard_tokens)
            group = group_size(spec, widths, vocab)
            n_groups = -(-n_shards // group)
            grouping = f"{n_groups:,} group(s) of {group} shard(s) ({group * shard_tokens:,} tokens) for {n_tokens:,} tokens"
        else:
            grouping = "groups sized once the corpus is tokenized"
        lines.append(f"partial state: at most {gib(partial)} per group, written once per group ({grouping})")
        if spec.dataset.max_tokens:
            sizes = store_bytes(spec, widths, vocab, n_tokens, group, latents_per_token(self.model))
            lines.append(f"store: at most {gib(sizes.total)} at its peak: " + ", ".join(f"{name} {gib(size)}" for name, size in sizes.parts.items()))
            if n_groups < 8:
                lines.append(f"parallelism: {n_groups} group(s), so at most {n_groups} worker(s) busy; set group_shards lower to spread the job (more store bytes)")
        limit = f" of {gib(self.memory_limit)} available" if self.memory_limit else " (the workers' devices are not visible here)"
        lines.append(f"worker memory: {gib(self.memory.total)}{limit}; largest parts: " + ", ".join(f"{name} {gib(size)}" for name, size in self.memory.largest()))
        return lines


def _describe_token_sums(spec: JobSpec, model: ModelRecord) -> str:
    """Which form of token sums the plan chose for the neurons, and why."""
    units = sum(w for site, w in model.hook_widths.items() if not spec.sae(site))
    every = f"{gib(8 * units * model.vocab_size)} a worker for all {model.vocab_size:,}"
    if not model.tracked_tokens:
        return f"token sums: every token's, exact ({every})"
    why = "tracked_tokens" if spec.tracked_tokens != "auto" else f"all would take {every}; tracked_tokens: all forces them"
    return (f"token sums: the {model.tracked_tokens:,} most frequent tokens of the first group of shards, exact for each "
            f"({gib(8 * units * model.tracked_tokens)} a worker; {why})")


def _describe_pairs(spec: JobSpec, widths: dict[str, int]) -> str:
    """Which site pairs co-activation covers, and why."""
    chosen = chosen_pairs(spec, widths)
    size = gib(8 * sum(dense_pair_sizes(spec, widths)))
    if spec.coactivation.pairs != "auto" or chosen == "all":
        return f"co-activation: {chosen} site pairs ({size} of co-moments a worker)"
    every = gib(8 * sum(dense_pair_sizes(spec, widths, "all")))
    return f"co-activation: {chosen} site pairs ({size} of co-moments a worker; all pairs would take {every}; coactivation.pairs: all forces them)"


def plan(spec: JobSpec, *, overwrite: bool = False, job_path: str | None = None, local_workers: int | None = None,
         worker_memory_limit: int | None = None) -> Plan:
    """Validate everything that can be validated before writing, then decide the store's fate.

    Nothing is written here, and no weight is read: the model is built from its config with fake
    parameters (``pipeline.model.Skeleton``). ``job_path``: the job file (protected from being a
    store); ``local_workers``: how many workers will share this machine (None: they run
    elsewhere); ``worker_memory_limit``: the bytes each worker has, where the user says so (the
    plan checks the job against it wherever the workers run)."""
    protect_paths(spec, job_path)
    tokenizer = load_tokenizer(spec.model, spec.model_revision)
    framing = Framing.from_tokenizer(tokenizer)
    body = spec.context_length - len(framing.prefix) - len(framing.suffix)
    if body <= 0:
        raise JobSpecError(f"context_length: {spec.context_length} leaves no room for text after the special tokens ({-body + 1} more needed).")
    skeleton = load_skeleton(spec.model, revision=spec.model_revision, tokenizer=tokenizer)  # no weights are read
    validate_hooks(skeleton.bridge, spec.hooks)
    positions = getattr(skeleton.bridge.cfg, "n_ctx", None)
    if positions and spec.context_length > positions:
        raise JobSpecError(f"context_length: {spec.context_length} is more than the model's {positions} positions; use at most {positions}.")
    widths = _WidthsOf(spec, skeleton, tokenizer)
    model = _model_record(spec, skeleton.bridge, tokenizer, framing, widths)
    model = dataclasses.replace(model, tracked_tokens=tracked_token_count(spec, model.hook_widths, model.vocab_size))
    weight_bytes = skeleton.weight_bytes(spec.dtype)
    del skeleton, widths
    gc.collect()
    memory = worker_memory(spec, model.hook_widths, model.vocab_size, weight_bytes, _group_tokens(spec, model), latents_per_token(model),
                           _reducing(spec, local_workers))
    limit = _memory_limit(spec, local_workers, worker_memory_limit)
    if limit is not None and memory.total > limit:
        raise JobSpecError(_too_big(memory, limit, local_workers))
    check_corpus(spec.dataset, tokenizer)
    files = sources(spec)
    model = dataclasses.replace(model, sources=files, fingerprint=fingerprint(spec, files))

    def decided(action: Action, build_url: str, existing: Store | None = None) -> Plan:
        return Plan(action, build_url, model, tokenizer, memory, limit, existing)

    if inspect_target(spec.store) == Target.ABSENT:  # refuses anything that is neither nothing nor a store
        return decided(Action.CREATE, spec.store)
    try:
        existing = Store.open(spec.store)
    except StoreError:
        if not overwrite:
            raise
        existing = None  # an actscope store of another schema, or a damaged one: --overwrite replaces it
    if existing is not None and existing.fingerprint == model.fingerprint:
        _check_stored_spec(existing, spec)
        return decided(Action.RESUME, spec.store, existing)
    staging = staging_url(spec.store)
    if not overwrite:
        raise StoreError(_mismatch(existing, spec, model.sources, staging))
    if staging is None:
        return decided(Action.REPLACE, spec.store)
    if _leftover(staging) == Target.STORE:
        partial = Store.open(staging)
        if partial.fingerprint == model.fingerprint:
            _check_stored_spec(partial, spec)
            return decided(Action.REPLACE, staging, partial)  # an earlier --overwrite of this job, unfinished
    return decided(Action.REPLACE, staging)


class _WidthsOf:
    """Hooks' widths: from the skeleton's fake forward, and the rest (hooks only the bridge's
    forward has, whose forward reads values) from the model with its weights, loaded once if
    at all."""

    def __init__(self, spec: JobSpec, skeleton, tokenizer):
        self.spec, self.skeleton, self.tokenizer, self._bridge = spec, skeleton, tokenizer, None

    def __call__(self, hooks: list[str]) -> dict[str, int]:
        found = self.skeleton.widths(hooks)
        missing = [h for h in hooks if h not in found]
        if missing and self._bridge is None:
            import torch

            self._bridge = load_job_model(self.spec, torch.device("cpu"), tokenizer=self.tokenizer)
        return found | (hook_widths(self._bridge, missing) if missing else {})


def _model_record(spec: JobSpec, bridge, tokenizer, framing: Framing, widths_of) -> ModelRecord:
    """What the plan found out about the model (and its SAEs, checked against it)."""
    model = ModelRecord(
        name=spec.model,
        architecture=type(bridge.original_model).__name__,
        n_layers=int(bridge.cfg.n_layers),
        d_model=int(bridge.cfg.d_model),
        vocab_size=len(tokenizer),
        hook_widths=widths_of(spec.hooks),
        framing=framing.to_dict(),
        forward=forward_plan(bridge, spec.hooks),
    )
    if not spec.saes:
        return model
    saes = check_saes(spec, model.hook_widths, bridge, widths_of)
    return dataclasses.replace(model, saes=saes, hook_widths={**model.hook_widths, **{name: info["d_sae"] for name, info in saes.items()}})


def _leftover(staging: str) -> Target:
    """What is at the staging folder of ``--overwrite``: as ``inspect_target``, but a folder that
    is not a store (a replacement cut short while it was created, or files put there) is named
    with the command that removes it: it is never deleted by actscope."""
    try:
        return inspect_target(staging)
    except StoreError:
        raise StoreError(
            f"{staging} holds an unfinished replacement of the store that is not a store actscope can resume "
            f"(an --overwrite stopped while it created it). Look inside, then remove it (rm -r '{staging}') and run again."
        ) from None


def check_saes(spec: JobSpec, widths: dict[str, int], bridge, widths_of) -> dict[str, dict]:
    """Each SAE's record (``pipeline.sae.SAEInfo``), read from its folder and checked against
    the hook it reads: in ``hooks``, and as wide as its ``d_in``; a transcoder's output hook
    against the model (a hook it has, as wide as ``d_out``)."""
    from actscope.pipeline.sae import read_config

    out = {}
    for entry in spec.saes:
        info = read_config(entry)
        if info.hook not in spec.hooks:
            raise JobSpecError(f"saes: {info.name} reads {info.hook} (its cfg.json says so), which is not in hooks; add it to hooks.")
        if info.d_in != widths[info.hook]:
            raise JobSpecError(
                f"saes: {info.name} has d_in {info.d_in}, but {info.hook} is {widths[info.hook]} wide for this model; "
                "an SAE must read the hook it was trained on."
            )
        if info.hook_out is not None:
            try:
                validate_hooks(bridge, [info.hook_out])
            except JobSpecError as error:
                raise JobSpecError(f"saes: {info.name} writes {info.hook_out} (hook_out), which is not a hook of this model: {error}") from None
            width = widths_of([info.hook_out])[info.hook_out]
            if width != info.d_out:
                raise JobSpecError(f"saes: {info.name}'s decoder writes {info.d_out} values, but {info.hook_out} is {width} wide; give the hook it was trained to predict as hook_out.")
        out[info.name] = info.to_dict()
    return out


def _check_stored_spec(store: Store, spec: JobSpec) -> None:
    """The stored spec is what workers read: it must be the job's (a hand-edited zarr.json has
    the right fingerprint and another spec)."""
    if store.spec.result_fields() != spec.result_fields():
        raise StoreError(
            f"{store.url}: the job stored there does not match its fingerprint (its zarr.json was edited or damaged). "
            "Nothing was changed: use a new store path, or --overwrite."
        )


def staging_url(url: str) -> str | None:
    """Where ``--overwrite`` builds a local store's replacement (None on object stores)."""
    path = local_path(url)
    if path is None:
        return None
    real = os.path.realpath(path)
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.actscope-new")


def protect_paths(spec: JobSpec, job_path: str | None = None) -> None:
    """Refuse, by name, a store that is or contains the file system root, the home or working
    folder, the model, the corpus or the job file: a store's path is one actscope may one day
    replace (with --overwrite), so it must never hold anything else of the user's."""
    path = local_path(spec.store)
    if path is None:
        return
    store = os.path.realpath(path)
    protected = [("the file system root", "/"), ("your home folder", os.path.expanduser("~")), ("the working folder", os.getcwd())]
    if os.path.exists(spec.model):
        protected.append(("the model", spec.model))
    protected += [(f"the SAE {sae.name}", sae.path) for sae in spec.saes if os.path.exists(sae.path)]
    if job_path is not None:
        protected.append(("the job file", job_path))
    protected += [("the corpus", glob_root(pattern)) for pattern in spec.dataset.data_files or []]
    protected += [("the corpus", found) for found in data_files(spec)[:10_000]]
    protected = [(what, os.path.realpath(other)) for what, other in protected]
    inside = store.rstrip(os.sep) + os.sep
    for holds, clash in (("", lambda other: store == other), ("a folder holding ", lambda other: other.startswith(inside))):
        for what, other in protected:
            if clash(other):
                raise StoreError(f"store: {spec.store} is {holds}{what} ({other}); a store needs a path of its own, e.g. runs/job.zarr.")
    # Inside the model's or a corpus glob's folder, the store's files would become part of the
    # model's fingerprint, or of the corpus.
    roots = [("the model's folder", spec.model)] if os.path.isdir(spec.model) else []
    roots += [("the corpus's folder", glob_root(p)) for p in spec.dataset.data_files or [] if glob_root(p) != p]
    for what, folder in roots:
        if store.startswith(os.path.realpath(folder).rstrip(os.sep) + os.sep):
            raise StoreError(f"store: {spec.store} is inside {what} ({os.path.realpath(folder)}); give the store a path outside it.")


#: ``datasets``' loaders that read the job's own files.
_FILE_LOADERS = frozenset({"text", "json", "csv", "parquet", "arrow", "pandas"})


def check_before_loading(spec: JobSpec, job_path: str | None = None) -> None:
    """The checks that need no model (milliseconds, where loading one takes seconds): the store's
    path (``protect_paths``, and not a folder of the user's files), the corpus's local files,
    and the hooks' layers against the model's ``config.json`` where it has one."""
    protect_paths(spec, job_path)
    inspect_target(spec.store)
    local = spec.dataset.path in _FILE_LOADERS  # a hub dataset's data_files are paths in its repository
    for pattern in spec.dataset.data_files or [] if local else []:
        if "://" not in pattern and not glob.glob(pattern, recursive=True):
            raise CorpusError(f"dataset.data_files: {pattern} matches no file (paths are relative to the working folder, {os.getcwd()}).")
    layers = _config_layers(spec.model)
    for hook in spec.hooks:
        found = re.match(r"blocks\.(\d+)\.", hook)
        if layers is not None and found and int(found.group(1)) >= layers:
            raise ModelError(f"hooks: {hook} is not a hook of {spec.model}: the model has {layers} blocks (0..{layers - 1}).")


def _config_layers(model: str) -> int | None:
    """The number of blocks a local model's ``config.json`` gives, where it gives one."""
    try:
        with open(os.path.join(model, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def glob_root(pattern: str) -> str:
    """The folder a glob pattern starts from (its part before the first wildcard)."""
    parts = []
    for part in pattern.split(os.sep):
        if any(c in part for c in "*?["):
            break
        parts.append(part)
    return os.sep.join(parts) or "."


def _memory_limit(spec: JobSpec, local_workers: int | None, given: int | None = None) -> int | None:
    """Bytes one worker may hold: as ``given`` (the user's word for workers elsewhere), else where
    the plan can see its device."""
    import torch

    if given is not None:
        return given
    if local_workers is None:
        return None
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return None  # refused with a clear message when the worker starts
        return int(torch.cuda.get_device_properties(0).total_memory * 0.9)
    return int(machine_memory() * 0.8 / max(local_workers, 1))


def _reducing(spec: JobSpec, local_workers: int | None) -> int | None:
    """The sites a worker reduces at once (``pipeline.worker``): one on a GPU; on a CPU one a
    torch thread, the cores split between this machine's workers. Workers elsewhere count as
    GPUs unless the job says ``device: cpu`` (then every site, their cores being unknown)."""
    import torch

    if local_workers is None:
        return None if spec.device == "cpu" else 1
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        return 1
    return max(1, (os.cpu_count() or 1) // max(local_workers, 1))


def _too_big(memory: Estimate, limit: int, local_workers: int | None) -> str:
    parts = ", ".join(f"{name} {gib(size)}" for name, size in memory.largest(4))
    share = f" (this machine's memory shared by {local_workers} workers)" if local_workers and local_workers > 1 else ""
    return (
        f"the job needs about {gib(memory.total)} per worker and {gib(limit)} is available{share}; largest parts: {parts}. "
        "Ways out: coactivation.pairs: within or adjacent, fewer coactivation.hooks, or statistics without "
        "coactivation (a larger coactivation.stride shrinks only the pairs of SAE latents); fewer or narrower hooks; a smaller "
        "shard_size, batch_size or top_k; fewer workers on one machine; or a device with more memory."
    )


def _mismatch(existing: Store | None, spec: JobSpec, files: dict[str, str], staging: str | None = None) -> str:
    try:
        old, old_files = existing.spec.result_fields(), existing.model.sources
    except Exception:  # noqa: BLE001 - an unreadable old record is still a mismatch
        old, old_files = {}, None
    new = spec.result_fields()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed:
        what = f"fields that differ: {', '.join(changed)}"
    elif files_changed := changed_sources(old_files, files):
        shown = ", ".join(files_changed[:5]) + (f" and {len(files_changed) - 5} more" if len(files_changed) > 5 else "")
        what = f"files changed since it ran: {shown}"
    else:
        what = "the model or corpus files differ"
    unfinished = ""
    if staging is not None and os.path.isdir(staging):
        unfinished = f" An unfinished replacement is at {staging}: --overwrite resumes it."
    return (
        f"{spec.store} holds a different job ({what}). Nothing was changed. "
        f"Use a new store path, or pass --overwrite to replace it (the old store stays until the new one is complete).{unfinished}"
    )


def group_size(spec: JobSpec, widths: dict[str, int], vocab_size: int, n_seq: int | None = None) -> int | None:
    """Shards per accumulation group: the job's ``group_shards``; else the capacity rule's for
    the shards ``dataset.max_tokens`` makes (decided before the corpus is tokenized, so that
    workers can start on the first groups while the rest is tokenized), or for the ``n_seq``
    sequences tokenized; None while neither is known."""
    if spec.group_shards != "auto":
        return spec.group_shards
    if spec.dataset.max_tokens:
        n_shards = -(-spec.dataset.max_tokens // (spec.shard_size * spec.context_length))
    elif n_seq is not None:
        n_shards = -(-n_seq // spec.shard_size)
    else:
        return None
    return shards_per_group(spec, widths, vocab_size, n_shards)


def _group_tokens(spec: JobSpec, model: ModelRecord) -> int | None:
    """Tokens in one group where the job fixes it before the corpus is tokenized; else None."""
    group = group_size(spec, model.hook_widths, model.vocab_size)
    return None if group is None else group * spec.shard_size * spec.context_length
