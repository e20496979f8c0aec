"""Run a cache job: plan → tokenize → activate (Ray workers) → reduce → index.

Each phase reads only what the previous one wrote to the store, so a crashed or killed job
restarts at its first unfinished shard. Nothing touches an existing store until the job is known
to be valid and to belong to it (same fingerprint), unless the user asks to overwrite it.
"""

from __future__ import annotations

import gc
import glob
import itertools
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from actscope.jobs import scheduler
from actscope.pipeline.capacity import (
    Estimate,
    gib,
    latents_per_token,
    machine_memory,
    partial_bytes,
    shards_per_group,
    store_bytes,
    worker_memory,
)
from actscope.pipeline.corpus import Encoded, check_corpus, document_chars, encode_here, encode_task, tokenize_corpus
from actscope.pipeline.fingerprint import changed_sources, data_files, fingerprint, sources
from actscope.pipeline.model import (
    Framing,
    describe_forward,
    forward_plan,
    hook_widths,
    load_job_model,
    load_tokenizer,
    validate_hooks,
)
from actscope.pipeline.reduce import PartDone, assemble, plan_parts, run_part
from actscope.pipeline.worker import GroupResult
from actscope.storage.errors import ActscopeError, CorpusError, JobSpecError, ModelError, StoreDamaged, StoreError
from actscope.storage.lease import Fence, Lease
from actscope.storage.record import ModelRecord
from actscope.storage.spec import JobSpec
from actscope.storage.store import DamagedPartial, Store, Target, inspect_target, local_path


class Reporter(Protocol):
    """Receives progress; the CLI draws it, the library stays silent."""

    def phase(self, name: str, total_tokens: int | None, done_tokens: int = 0) -> None: ...

    def advance(self, tokens: int) -> None: ...


class _Silent:
    def phase(self, name, total_tokens, done_tokens=0):
        pass

    def advance(self, tokens):
        pass


@dataclass
class RunSummary:
    store: str
    n_seq: int
    n_tokens: int
    shards_total: int
    shards_run: int
    shards_skipped: int
    workers: int
    seconds_activate: float
    seconds_total: float
    resumed: bool
    phases: dict[str, float] = field(default_factory=dict)
    nodes: int = 1  # distinct machines (Ray nodes) that ran shards
    tokenize_tasks: int = 0  # batches sent to Ray tasks to encode (0: all encoded here)
    seconds_startup: float = 0.0  # of the activate phase, until the first workers had loaded their model
    reduce_parts: list[PartDone] = field(default_factory=list)  # the reduce's parts this run ran
    group_results: list[GroupResult] = field(default_factory=list)  # the groups this run ran

    @property
    def tokens_per_second(self) -> float:
        run_tokens = self.n_tokens * self.shards_run / max(self.shards_total, 1)
        return run_tokens / self.seconds_activate if self.seconds_activate else 0.0


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


def plan(spec: JobSpec, *, overwrite: bool = False, job_path: str | None = None, local_workers: int | None = None) -> Plan:
    """Validate everything that can be validated before writing, then decide the store's fate.

    Nothing is written here. ``job_path``: the job file (protected from being a store);
    ``local_workers``: how many workers will share this machine (None: they run elsewhere)."""
    protect_paths(spec, job_path)
    tokenizer = load_tokenizer(spec.model, spec.model_revision)
    framing = Framing.from_tokenizer(tokenizer)
    body = spec.context_length - len(framing.prefix) - len(framing.suffix)
    if body <= 0:
        raise JobSpecError(f"context_length: {spec.context_length} leaves no room for text after the special tokens ({-body + 1} more needed).")
    bridge = load_job_model(spec, _planning_device(), tokenizer=tokenizer)
    validate_hooks(bridge, spec.hooks)
    positions = getattr(bridge.cfg, "n_ctx", None)
    if positions and spec.context_length > positions:
        raise JobSpecError(f"context_length: {spec.context_length} is more than the model's {positions} positions; use at most {positions}.")
    model = _model_record(spec, bridge, tokenizer, framing)
    weight_bytes = sum(p.numel() * p.element_size() for p in bridge.original_model.parameters())
    del bridge
    gc.collect()
    memory = worker_memory(spec, model.hook_widths, model.vocab_size, weight_bytes, _group_tokens(spec, model), latents_per_token(model))
    limit = _memory_limit(spec, local_workers)
    if limit is not None and memory.total > limit:
        raise JobSpecError(_too_big(memory, limit, local_workers))
    check_corpus(spec.dataset, tokenizer)
    files = sources(spec)
    model = model.replace(sources=files, fingerprint=fingerprint(spec, files))

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


def _model_record(spec: JobSpec, bridge, tokenizer, framing: Framing) -> ModelRecord:
    """What the plan found out about the model (and its SAEs, checked against it)."""
    model = ModelRecord(
        name=spec.model,
        architecture=type(bridge.original_model).__name__,
        n_layers=int(bridge.cfg.n_layers),
        d_model=int(bridge.cfg.d_model),
        vocab_size=len(tokenizer),
        hook_widths=hook_widths(bridge, spec.hooks),
        framing=framing.to_dict(),
        forward=forward_plan(bridge, spec.hooks),
    )
    if not spec.saes:
        return model
    saes = check_saes(spec, model.hook_widths, bridge)
    return model.replace(saes=saes, hook_widths={**model.hook_widths, **{name: info["d_sae"] for name, info in saes.items()}})


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


def check_saes(spec: JobSpec, widths: dict[str, int], bridge) -> dict[str, dict]:
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
            width = hook_widths(bridge, [info.hook_out])[info.hook_out]
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


def _memory_limit(spec: JobSpec, local_workers: int | None) -> int | None:
    """Bytes one worker may hold where the plan can see its device."""
    import torch

    if local_workers is None:
        return None
    if spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return None  # refused with a clear message when the worker starts
        return int(torch.cuda.get_device_properties(0).total_memory * 0.9)
    return int(machine_memory() * 0.8 / max(local_workers, 1))


def _too_big(memory: Estimate, limit: int, local_workers: int | None) -> str:
    parts = ", ".join(f"{name} {gib(size)}" for name, size in memory.largest(4))
    share = f" (this machine's memory shared by {local_workers} workers)" if local_workers and local_workers > 1 else ""
    return (
        f"the job needs about {gib(memory.total)} per worker and {gib(limit)} is available{share}; largest parts: {parts}. "
        "Ways out: coactivation.pairs: within or adjacent, fewer coactivation.hooks, or statistics without "
        "coactivation (a larger coactivation.stride shrinks only the pairs of SAE latents); fewer or narrower hooks; a smaller "
        "shard_size, batch_size or top_k; fewer workers on one machine; or a device with more memory."
    )


def _plan_while_ray_starts(spec: JobSpec, ray_session: RaySession | None, on_ray=None, **options) -> Plan:
    """``plan`` on a thread while Ray starts on this one (``ray.init`` installs signal handlers,
    so it stays on the main thread), then ``on_ray()`` here while the plan goes on. A mistake in
    the job is reported before any error of Ray's."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan") as pool:
        planning = pool.submit(plan, spec, **options)
        try:
            if ray_session is not None:
                ray_session.ensure()
                if on_ray is not None:
                    on_ray()
        finally:
            planned = planning.result()
    return planned


def _start_early(spec: JobSpec, address: str | None) -> bool:
    """Whether the workers start while the job is planned: where they do not compete with the
    plan for this machine's cores (on a cluster, or on GPUs). On a machine of CPUs alone they
    do, and it was measured a wash (start-up 7-10 s to 5-6 s, the plan 7.5 s to 9-10.6 s)."""
    import torch

    return address is not None or spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())


def _finished(url: str) -> bool:
    try:
        return Store.exists(url) and bool(Store.open(url).status.complete)
    except StoreError:
        return False  # not an actscope store: the plan says so


def _planning_device():
    import torch

    return torch.device("cpu")


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


def run_job(spec: JobSpec, *, job_path: str | None = None, **options) -> RunSummary:
    """Run (or resume) ``spec`` to completion and return what was done, as the store's one writer:
    the store's lease is taken first (``storage.lease``; another run holding it is refused at
    once with ``StoreBusy``) and held to the end. ``options``: those of ``_run_leased``;
    ``job_path``: the job file, which the store may not be."""
    check_before_loading(spec, job_path)  # before a lock is made beside the store
    with Lease.acquire(spec.store) as lease:
        return _run_leased(spec, lease.fence, job_path=job_path, **options)


def _run_leased(
    spec: JobSpec,
    fence: Fence,
    *,
    address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    use_ray: bool = True,
    threads: int | None = None,
    reporter: Reporter | None = None,
    job_path: str | None = None,
) -> RunSummary:
    """``run_job`` under the lease whose ``fence`` every commit checks: the job's phases in
    order, and the clean-up in one place. ``threads``: torch threads per CPU worker (default:
    the cores split between the workers)."""
    run = _Run(spec, fence, address=address, workers=workers, use_ray=use_ray, threads=threads, reporter=reporter)
    created = None  # a store this run made, removed if the run fails before it is tokenized
    try:
        planned = run.plan(overwrite=overwrite, job_path=job_path)
        created = run.open_store(planned)
        run.tokenize_and_activate(planned.tokenizer)
        created = None  # tokenized: from here on a failure keeps the store, to resume
        scheduler.kill_actors(run.prestarted)  # workers the activate phase did not take (it had nothing to run)
        run.reduce_and_index(planned.tokenizer)
    except ActscopeError:
        if created is not None and not _tokenized(created):
            Store.remove(created.url)
        raise
    finally:
        scheduler.kill_actors(run.prestarted)
        run.ray.close()
    if run.url != spec.store:
        _swap_in(run.url, spec.store)
    return run.summary(resumed=planned.action == Action.RESUME)


def _tokenized(store: Store) -> bool:
    try:
        return store.status.tokenized
    except StoreError:
        return False


class _Run:
    """One run of a job under its lease: what its phases share (the store, Ray, the workers
    started early, the groups' results and the phases' times)."""

    def __init__(self, spec: JobSpec, fence: Fence, *, address: str | None, workers: int | None, use_ray: bool,
                 threads: int | None, reporter: Reporter | None):
        self.spec, self.fence, self.workers, self.use_ray, self.threads = spec, fence, workers, use_ray, threads
        self.reporter = reporter or _Silent()
        # Inside a Ray job (actscope submit, a KubeRay RayJob) Ray names the cluster in RAY_ADDRESS.
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.ray = RaySession(self.address)
        self.local_workers = _local_worker_count(spec, workers, use_ray) if self.address is None else None
        self.t0 = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.prestarted: list = []  # workers started during the plan, handed to the activate phase
        self.results: list[GroupResult] = []
        self.ready: list[float] = []  # when each of the first workers had loaded its model
        self.done: set[int] = set()  # groups committed before this run
        self.pending: list[int] = []  # groups this run activated: the reduce is redone where there are any
        self.tokenize_tasks = 0
        self.reduced: list[PartDone] = []
        self.store: Store | None = None
        self.url = spec.store

    def plan(self, *, overwrite: bool, job_path: str | None) -> Plan:
        """Ray starts (3 s embedded: its own processes, mostly waiting) while the plan loads the
        model on this process's thread, then the workers start (on a cluster or GPUs); a
        finished store never waits for Ray."""
        unfinished = self.use_ray and not _finished(self.spec.store)
        planned = _plan_while_ray_starts(
            self.spec, self.ray if unfinished else None,
            on_ray=self._prestart if unfinished and _start_early(self.spec, self.address) else None,
            overwrite=overwrite, job_path=job_path, local_workers=self.local_workers,
        )
        self.phases["plan"] = time.perf_counter() - self.t0
        self.model, self.url = planned.model, planned.build_url
        self.n_workers = _worker_count(self.spec, self.workers, self.use_ray, self.address, self.ray)
        return planned

    def _prestart(self) -> None:
        # The workers' processes start and import (seconds) while the plan runs; they touch
        # nothing until the plan has validated the job and they are given its store.
        n = _worker_count(self.spec, self.workers, self.use_ray, self.address, self.ray)
        actor_class, threads = scheduler.actor_class(self.spec.device, n, self.threads)
        self.prestarted.extend(actor_class.remote(threads=threads) for _ in range(n))

    def open_store(self, planned: Plan) -> Store | None:
        """Open the store to resume, or create it; the store created, if one was."""
        if planned.existing is not None:
            self.store = Store.open(self.url, writable=True, fence=self.fence)
            self.store.refuse_links()
            return None
        if planned.action == Action.REPLACE and inspect_target(self.url) == Target.STORE:
            Store.remove(self.url)  # an actscope store: the old job's on an object store, or a stale replacement
        self.store = Store.create(self.url, spec=self.spec, fingerprint=planned.model.fingerprint, model=planned.model, fence=self.fence)
        return self.store

    def tokenize_and_activate(self, tokenizer) -> None:
        spec, store = self.spec, self.store
        self.logits = spec.computes("logits") and not store.has_logits()
        group = group_size(spec, self.model.hook_widths, self.model.vocab_size)
        t = time.perf_counter()
        if self.use_ray and not store.status.tokenized and group is not None and not spec.dense:
            self._overlapped(tokenizer, group)
        else:
            t = self._in_turn(tokenizer)
        self.phases["activate"] = time.perf_counter() - t  # with the tokenize phase, when they overlap
        self.startup = max(max(self.ready) - t, 0.0) if self.ready else 0.0

    def _overlapped(self, tokenizer, group: int) -> None:
        """Workers start on the first groups while the rest of the corpus is tokenized: the
        groups are fixed before it is (``group_size``), and a group's sequences are final once
        written. Dense arrays are sized by the corpus's length, so a job with dense hooks
        tokenizes first (``_in_turn``)."""
        spec, store, t = self.spec, self.store, time.perf_counter()
        store.update_status(shards_per_group=group)  # before any worker opens the store
        self.reporter.phase("tokenize", None)
        self.ray.ensure()
        encoder = TaskEncoder(spec, tokenizer, self.ray, cpus=0)
        feed = scheduler.GroupFeed(spec, group)
        progress = _OverlapProgress(self.reporter, spec.context_length)

        def tokenize() -> None:
            try:
                n_seq = tokenize_corpus(store, spec, Framing.from_tokenizer(tokenizer), encoder, progress=self.reporter.advance,
                                        written=feed.written, max_chars=document_chars(tokenizer, spec.dataset.max_tokens))
                mark_tokenized(store, spec, n_seq)
                self.phases["tokenize"] = time.perf_counter() - t
                progress.tokenized(n_seq)
                feed.finish(n_seq)
            except BaseException as err:  # noqa: BLE001 - raised again by the scheduler
                feed.fail(err)

        tokenizer_thread = threading.Thread(target=tokenize, name="tokenize", daemon=True)
        tokenizer_thread.start()
        try:
            for result in scheduler.execute_on_ray(self.url, self.fence, feed, self.n_workers, self.logits, self.threads, self.ready, self.prestarted):
                self.results.append(result)
                progress.advance(result.n_tokens)
        finally:
            feed.cancel()
            tokenizer_thread.join()
        self.tokenize_tasks = encoder.tasks
        self.pending = [r.group for r in self.results if not r.skipped]

    def _in_turn(self, tokenizer) -> float:
        """Tokenize (where not yet done), then activate the groups not yet committed; the time
        the activate phase started."""
        spec, store = self.spec, self.store
        if not store.status.tokenized:
            t = time.perf_counter()
            self.reporter.phase("tokenize", None)
            # Workers already started hold the CPUs: tasks then ask for none (see TaskEncoder).
            encoder = TaskEncoder(spec, tokenizer, self.ray, cpus=0 if self.prestarted else 1) if self.use_ray else LocalEncoder(tokenizer)
            n_seq = tokenize_corpus(store, spec, Framing.from_tokenizer(tokenizer), encoder, progress=self.reporter.advance,
                                    max_chars=document_chars(tokenizer, spec.dataset.max_tokens))
            self.tokenize_tasks = encoder.tasks
            for hook in spec.dense:
                if hook in spec.hooks:  # an SAE's latents are written sparse, per shard
                    store.create_dense(hook, self.model.hook_widths[hook], n_seq)
            mark_tokenized(store, spec, n_seq)
            self.phases["tokenize"] = time.perf_counter() - t
        self.done = store.committed_groups()
        self.pending = pending = [g for g in range(store.n_groups) if g not in self.done]
        t = time.perf_counter()
        done_seqs = sum(store.group_range(g)[1] - store.group_range(g)[0] for g in self.done)
        self.reporter.phase("activate", store.n_seq * spec.context_length, done_seqs * spec.context_length)
        if pending or self.logits:
            if self.use_ray:
                self.ray.ensure()
                feed = scheduler.GroupFeed.of(store, pending)
                execute = scheduler.execute_on_ray(self.url, self.fence, feed, self.n_workers, self.logits, self.threads, self.ready, self.prestarted)
            else:
                execute = scheduler.execute_here(self.url, self.fence, pending, self.logits, self.threads, self.ready)
            for result in execute:
                self.results.append(result)
                self.reporter.advance(result.n_tokens)
        return t

    def reduce_and_index(self, tokenizer) -> None:
        """Merge the groups into the tables, where groups were (re)done or the store is not
        complete; on Ray tasks unless the partials are small."""
        spec, store = self.spec, self.store
        if store.status.complete and not self.pending:
            return
        t = time.perf_counter()
        n_tokens = store.n_seq * spec.context_length
        self.reporter.phase("reduce", n_tokens)
        if self.pending:  # groups were (re)done: parts of an earlier reduce may be stale
            store.reset_reduce()
        try:
            first, later = plan_parts(store)
            small = store.n_groups * partial_bytes(spec, self.model.hook_widths, self.model.vocab_size) < RAY_REDUCE_BYTES
            if self.use_ray and (first or later) and not small:
                self.ray.ensure()
                self.reduced = list(scheduler.reduce_on_ray(self.url, self.fence, first, later))
            else:
                self.reduced = [run_part(self.url, part, self.fence) for part in first + later]
            assemble(store, tokenizer)
        except DamagedPartial as damaged:
            if damaged.first_shard is not None:
                store.uncommit(damaged.first_shard // store.shards_per_group)
            raise StoreDamaged(f"{damaged} It was dropped: run the job again to redo it.") from None
        store.update_status(complete=True)
        self.reporter.advance(n_tokens)
        self.phases["reduce+index"] = time.perf_counter() - t

    def summary(self, *, resumed: bool) -> RunSummary:
        store, ran = self.store, [r for r in self.results if not r.skipped]
        return RunSummary(
            store=self.spec.store,
            n_seq=store.n_seq,
            n_tokens=store.n_seq * self.spec.context_length,
            shards_total=store.n_shards,
            shards_run=sum(r.shards for r in ran),
            shards_skipped=sum(len(store.group_shards(g)) for g in self.done) + sum(r.shards for r in self.results if r.skipped),
            workers=self.n_workers,
            seconds_activate=self.phases["activate"],
            seconds_total=time.perf_counter() - self.t0,
            resumed=resumed,
            phases=self.phases,
            nodes=max(1, len({r.node for r in ran})),
            tokenize_tasks=self.tokenize_tasks,
            seconds_startup=self.startup,
            reduce_parts=self.reduced,
            group_results=ran,
        )


def dry_run(spec: JobSpec, *, address: str | None = None, workers: int | None = None, overwrite: bool = False,
            use_ray: bool = True, job_path: str | None = None) -> list[str]:
    """What ``run_job`` would do, as lines of text; nothing is written and Ray is not started."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    local_workers = _local_worker_count(spec, workers, use_ray) if address is None else None
    check_before_loading(spec, job_path)
    planned = plan(spec, overwrite=overwrite, job_path=job_path, local_workers=local_workers)
    return planned.describe(spec)


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


def mark_tokenized(store: Store, spec: JobSpec, n_seq: int) -> None:
    """Record the corpus's length and its accumulation groups (a function of the job and the
    length alone); last, so a crash before it re-tokenizes."""
    model = store.model
    group = group_size(spec, model.hook_widths, model.vocab_size, n_seq)
    store.update_status(tokenized=True, n_seq=n_seq, shards_per_group=group)


def _swap_in(staging: str, url: str) -> None:
    """Put a complete replacement store in the old one's place: the old one is renamed aside,
    the new one renamed into place, then the old one deleted (each step checked to be a store)."""
    path = os.path.realpath(local_path(url))
    aside = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.actscope-old")
    Store.remove(aside)  # a stale one, if an earlier swap was cut short
    if inspect_target(url) != Target.STORE:
        raise StoreError(f"{url} changed while the job ran; the new store is kept at {staging}.")
    os.rename(path, aside)
    os.rename(staging, path)
    Store.remove(aside)


def _local_worker_count(spec: JobSpec, override: int | None, use_ray: bool) -> int:
    """Workers on this machine for an embedded run (the memory check shares it between them).
    CPU workers are capped at the cores: more would only share them, each holding a model (the
    tables are the same whatever the count)."""
    import torch

    if not use_ray:
        return 1
    on_gpu = spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())
    wanted = override if override is not None else spec.workers
    if wanted == "auto":
        return max(torch.cuda.device_count(), 1) if on_gpu else os.cpu_count() or 1
    return wanted if on_gpu else min(wanted, os.cpu_count() or 1)


class RaySession:
    """Embedded Ray (or a connection to ``address``), started on first use and shut down at the
    end only if this job started it (a caller's Ray, or the one a Ray job runs in, stays up)."""

    def __init__(self, address: str | None):
        self.address = address
        self._started = False

    def ensure(self) -> None:
        import ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Ray starts its workers at niceness 15, below the driver and Ray's own processes; a
        # worker's torch threads then stall whenever those run (a shard took 6.3 s instead of
        # 5.6 s on 2 cores). The workers are the job: run them at the driver's priority.
        os.environ.setdefault("RAY_worker_niceness", "0")
        kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if self.address is None:
            ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
        else:
            ray.init(address=self.address, **kwargs)
        self._started = True

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


class LocalEncoder:
    """Encodes every batch in this process."""

    tasks = 0

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batches: Iterator[list[str]]) -> Iterator[Encoded]:
        return encode_here(batches, self.tokenizer)


class TaskEncoder:
    """Encodes batches of documents on Ray CPU tasks, anywhere in the cluster, and hands them back
    in corpus order (so packing, here, is the same as with one process). A bounded window of
    tasks is in flight, so memory stays flat however large the corpus.

    The first ``LOCAL_BATCHES`` batches are encoded here while the first tasks start (their
    processes import torch and load the tokenizer, a few seconds); a corpus no larger than that
    never waits for them."""

    LOCAL_BATCHES = 8

    def __init__(self, spec: JobSpec, tokenizer, ray_session: RaySession, cpus: float = 1):
        """``cpus``: what each task asks of Ray; 0 while the workers run beside the tokenize phase
        (on a machine of CPUs they hold all of them, and a task asking for one would wait for
        ever: the window of tasks in flight bounds them instead)."""
        self.spec, self.tokenizer, self.ray_session, self.cpus = spec, tokenizer, ray_session, cpus
        self.tasks = 0

    def __call__(self, batches: Iterator[list[str]]) -> Iterator[Encoded]:
        head = list(itertools.islice(batches, self.LOCAL_BATCHES + 1))
        local, rest = head[: self.LOCAL_BATCHES], itertools.chain(head[self.LOCAL_BATCHES :], batches)
        if len(head) <= self.LOCAL_BATCHES:
            yield from encode_here(local, self.tokenizer)
            return
        import ray

        self.ray_session.ensure()
        task = ray.remote(num_cpus=self.cpus)(encode_task)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))

        def submit(texts: list[str]):
            self.tasks += 1
            return task.remote(self.spec.model, self.spec.model_revision, texts)

        in_flight = deque(submit(texts) for texts in itertools.islice(rest, window))
        yield from encode_here(local, self.tokenizer)
        for texts in rest:
            in_flight.append(submit(texts))
            yield ray.get(in_flight.popleft())
        while in_flight:
            yield ray.get(in_flight.popleft())


def _worker_count(spec: JobSpec, override: int | None, use_ray: bool, address: str | None, ray_session: RaySession) -> int:
    if address is None:
        return _local_worker_count(spec, override, use_ray)
    if override is not None:
        return override
    if spec.workers != "auto":
        return spec.workers
    import ray

    ray_session.ensure()
    resources = ray.cluster_resources()
    # The GPUs present now (an autoscaling cluster may have none yet: then its CPUs, at least 1).
    return int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)))


#: Below this many bytes of partials, the reduce's parts run in the driver: starting Ray task
#: processes (each imports torch) costs seconds, more than merging a small job.
RAY_REDUCE_BYTES = 256 << 20


class _OverlapProgress:
    """Progress while the tokenize and activate phases overlap: the tokenize bar first, then the
    activate bar, which starts with the tokens of the groups done meanwhile."""

    def __init__(self, reporter: Reporter, ctx: int):
        self.reporter, self.ctx = reporter, ctx
        self._lock = threading.Lock()
        self._early, self._switched = 0, False

    def advance(self, tokens: int) -> None:
        with self._lock:
            if self._switched:
                self.reporter.advance(tokens)
            else:
                self._early += tokens

    def tokenized(self, n_seq: int) -> None:
        with self._lock:
            self.reporter.phase("activate", n_seq * self.ctx, self._early)
            self._switched = True


