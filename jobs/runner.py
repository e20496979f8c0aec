"""Run a cache job: plan → tokenize → activate (Ray workers) → reduce → index.

Each phase reads only what the previous one wrote to the store, so a crashed or killed job
restarts at its first unfinished shard. Nothing touches an existing store until the job is known
to be valid and to belong to it (same fingerprint), unless the user asks to overwrite it.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from pipeline.capacity import Estimate, gib, machine_memory, partial_bytes, shards_per_group, worker_memory
from pipeline.corpus import Encoded, check_corpus, encode_here, encode_task, tokenize_corpus
from pipeline.fingerprint import data_files, fingerprint
from pipeline.index import build_index
from pipeline.model import Framing, hook_widths, load_job_model, load_tokenizer, validate_hooks
from pipeline.reduce import merge_shards
from pipeline.worker import ShardWorker
from storage.errors import ActscopeError, JobSpecError, StoreDamaged, StoreError
from storage.spec import JobSpec
from storage.store import DamagedPartial, Store, inspect_target, local_path


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

    @property
    def tokens_per_second(self) -> float:
        run_tokens = self.n_tokens * self.shards_run / max(self.shards_total, 1)
        return run_tokens / self.seconds_activate if self.seconds_activate else 0.0


@dataclass
class Plan:
    """What a run will do, decided before anything is written.

    ``action``: ``create`` (nothing at the store's path), ``resume`` (the same job's store), or
    ``replace`` (``--overwrite`` of another job's store: the new one is built at ``build_url``
    beside it and swapped in when it is complete; on an object store, where folders cannot be
    renamed, the old one is deleted just before the new one is created)."""

    action: str
    build_url: str
    model: dict
    tokenizer: object
    memory: Estimate
    memory_limit: int | None  # bytes one worker may use where the plan can see its device
    existing: Store | None = None

    def describe(self, spec: JobSpec) -> list[str]:
        verbs = {"create": "create a new store at", "resume": "resume the store at", "replace": "replace the store at"}
        lines = [f"{verbs[self.action]} {spec.store}" + (f" (built at {self.build_url}, swapped in when complete)" if self.build_url != spec.store else "")]
        lines.append(f"model: {self.model['name']} ({self.model['architecture']}, {self.model['n_layers']} layers, vocabulary {self.model['vocab_size']:,})")
        for hook, width in self.model["hook_widths"].items():
            lines.append(f"hook: {hook} ({width:,} units{', dense' if hook in spec.dense else ''})")
        partial = partial_bytes(spec, self.model["hook_widths"], self.model["vocab_size"])
        shard_tokens = spec.shard_size * spec.context_length
        if spec.dataset.max_tokens:
            n_shards = -(-spec.dataset.max_tokens // shard_tokens)
            group = shards_per_group(spec, self.model["hook_widths"], self.model["vocab_size"], n_shards)
            grouping = f"groups of {group} shard(s) ({group * shard_tokens:,} tokens) for {spec.dataset.max_tokens:,} tokens"
        else:
            grouping = "groups sized once the corpus is tokenized"
        lines.append(f"partial state: at most {gib(partial)} per group, written once per group ({grouping})")
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
    model = {
        "name": spec.model,
        "architecture": type(bridge.original_model).__name__,
        "n_layers": int(bridge.cfg.n_layers),
        "d_model": int(bridge.cfg.d_model),
        "vocab_size": len(tokenizer),
        "hook_widths": hook_widths(bridge, spec.hooks),
        "framing": framing.to_dict(),
    }
    weight_bytes = sum(p.numel() * p.element_size() for p in bridge.original_model.parameters())
    del bridge
    gc.collect()
    memory = worker_memory(spec, model["hook_widths"], model["vocab_size"], weight_bytes)
    limit = _memory_limit(spec, local_workers)
    if limit is not None and memory.total > limit:
        raise JobSpecError(_too_big(memory, limit, local_workers))
    check_corpus(spec.dataset, tokenizer)
    model["fingerprint"] = fingerprint(spec)

    def decided(action: str, build_url: str, existing: Store | None = None) -> Plan:
        return Plan(action, build_url, model, tokenizer, memory, limit, existing)

    if inspect_target(spec.store) == "absent":  # refuses anything that is neither nothing nor a store
        return decided("create", spec.store)
    try:
        existing = Store.open(spec.store)
    except StoreError:
        if not overwrite:
            raise
        existing = None  # an actscope store of another schema, or a damaged one: --overwrite replaces it
    if existing is not None and existing.fingerprint == model["fingerprint"]:
        _check_stored_spec(existing, spec)
        return decided("resume", spec.store, existing)
    staging = staging_url(spec.store)
    if not overwrite:
        raise StoreError(_mismatch(existing, spec, staging))
    if staging is None:
        return decided("replace", spec.store)
    if inspect_target(staging) == "store":
        partial = Store.open(staging)
        if partial.fingerprint == model["fingerprint"]:
            _check_stored_spec(partial, spec)
            return decided("replace", staging, partial)  # an earlier --overwrite of this job, unfinished
    return decided("replace", staging)


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
        "Ways out: a larger coactivation.stride does not help memory, but coactivation.pairs: within or adjacent, "
        "fewer coactivation.hooks, or statistics without coactivation do; fewer or narrower hooks; a smaller "
        "shard_size, batch_size or top_k; fewer workers on one machine; or a device with more memory."
    )


def _plan_while_ray_starts(spec: JobSpec, ray_session: RaySession | None, **options) -> Plan:
    """``plan`` on a thread while Ray starts on this one (``ray.init`` installs signal handlers,
    so it stays on the main thread). A mistake in the job is reported before any error of Ray's."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="plan") as pool:
        planning = pool.submit(plan, spec, **options)
        try:
            if ray_session is not None:
                ray_session.ensure()
        finally:
            planned = planning.result()
    return planned


def _finished(url: str) -> bool:
    try:
        return Store.exists(url) and bool(Store.open(url).status["complete"])
    except StoreError:
        return False  # not an actscope store: the plan says so


def _planning_device():
    import torch

    return torch.device("cpu")


def _mismatch(existing: Store, spec: JobSpec, staging: str | None = None) -> str:
    try:
        old = existing.spec.result_fields()
    except Exception:  # noqa: BLE001 - an unreadable old spec is still a mismatch
        old = {}
    new = spec.result_fields()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    what = f"fields that differ: {', '.join(changed)}" if changed else "the model or corpus files differ"
    unfinished = ""
    if staging is not None and os.path.isdir(staging):
        unfinished = f" An unfinished replacement is at {staging}: --overwrite resumes it."
    return (
        f"{spec.store} holds a different job ({what}). Nothing was changed. "
        f"Use a new store path, or pass --overwrite to replace it (the old store stays until the new one is complete).{unfinished}"
    )


def run_job(
    spec: JobSpec,
    *,
    address: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    use_ray: bool = True,
    threads: int | None = None,
    reporter: Reporter | None = None,
    job_path: str | None = None,
) -> RunSummary:
    """Run (or resume) ``spec`` to completion and return what was done. ``threads``: torch threads
    per CPU worker (default: the cores split between the workers); ``job_path``: the job file,
    which the store may not be."""
    reporter = reporter or _Silent()
    # Inside a Ray job (actscope submit, a KubeRay RayJob) Ray names the cluster in RAY_ADDRESS.
    address = address or os.environ.get("RAY_ADDRESS") or None
    t0 = time.perf_counter()
    phases = {}
    ray_session = RaySession(address)
    local_workers = _local_worker_count(spec, workers, use_ray) if address is None else None
    created = None
    try:
        # Ray starts (3 s embedded: its own processes, mostly waiting) while the plan loads the
        # model on this process's thread; a finished store never waits for Ray.
        planned = _plan_while_ray_starts(
            spec, ray_session if use_ray and not _finished(spec.store) else None,
            overwrite=overwrite, job_path=job_path, local_workers=local_workers,
        )
        phases["plan"] = time.perf_counter() - t0
        model, tokenizer, url = planned.model, planned.tokenizer, planned.build_url
        resumed = planned.action == "resume"
        if planned.existing is not None:
            store = Store.open(url, writable=True)
        else:
            if planned.action == "replace" and inspect_target(url) == "store":
                Store.remove(url)  # an actscope store: the old job's on an object store, or a stale replacement
            store = created = Store.create(url, spec=spec, fingerprint=model["fingerprint"], model=model)
        tokenize_tasks = 0
        if not store.status["tokenized"]:
            t = time.perf_counter()
            reporter.phase("tokenize", None)
            encoder = TaskEncoder(spec, tokenizer, ray_session) if use_ray else LocalEncoder(tokenizer)
            n_seq = tokenize_corpus(store, spec, Framing.from_tokenizer(tokenizer), encoder, progress=reporter.advance)
            tokenize_tasks = encoder.tasks
            for hook in spec.dense:
                store.create_dense(hook, model["hook_widths"][hook], n_seq)
            mark_tokenized(store, spec, n_seq)
            phases["tokenize"] = time.perf_counter() - t
        created = None  # tokenized: from here on a failure keeps the store, to resume

        n_shards = store.n_shards
        done = store.committed_groups()
        pending = [g for g in range(store.n_groups) if g not in done]
        n_tokens = store.n_seq * spec.context_length
        n_workers = _worker_count(spec, workers, use_ray, address, ray_session)
        t = time.perf_counter()
        done_seqs = sum(store.group_range(g)[1] - store.group_range(g)[0] for g in done)
        reporter.phase("activate", n_tokens, done_seqs * spec.context_length)
        results = []
        ready: list[float] = []  # when each of the first workers had loaded its model
        logits = spec.computes("logits") and not store.has_logits()
        if pending or logits:
            if use_ray:
                ray_session.ensure()
                execute = _execute_on_ray(url, pending, n_workers, logits, threads, ready)
            else:
                execute = _execute_here(url, pending, logits, threads, ready)
            for result in execute:
                results.append(result)
                reporter.advance(result.n_tokens)
        phases["activate"] = time.perf_counter() - t
        startup = max(ready) - t if ready else 0.0
    except ActscopeError:
        if created is not None:  # a store this run made and could not even tokenize: leave nothing
            Store.remove(created.url)
        raise
    finally:
        ray_session.close()

    if not store.status["complete"] or pending:
        t = time.perf_counter()
        reporter.phase("reduce", n_tokens)
        try:
            merged = merge_shards(store)
        except DamagedPartial as damaged:
            if damaged.first_shard is not None:
                store.uncommit(damaged.first_shard // store.shards_per_group)
            raise StoreDamaged(f"{damaged} It was dropped: run the job again to redo it.") from None
        build_index(store, merged, tokenizer)
        store.update_status(complete=True)
        reporter.advance(n_tokens)
        phases["reduce+index"] = time.perf_counter() - t
    if url != spec.store:
        _swap_in(url, spec.store)

    return RunSummary(
        store=spec.store,
        n_seq=store.n_seq,
        n_tokens=n_tokens,
        shards_total=n_shards,
        shards_run=sum(r.shards for r in results if not r.skipped),
        shards_skipped=sum(len(store.group_shards(g)) for g in done) + sum(r.shards for r in results if r.skipped),
        workers=n_workers,
        seconds_activate=phases["activate"],
        seconds_total=time.perf_counter() - t0,
        resumed=resumed,
        phases=phases,
        nodes=max(1, len({r.node for r in results if not r.skipped})),
        tokenize_tasks=tokenize_tasks,
        seconds_startup=startup,
    )


def dry_run(spec: JobSpec, *, address: str | None = None, workers: int | None = None, overwrite: bool = False,
            use_ray: bool = True, job_path: str | None = None) -> list[str]:
    """What ``run_job`` would do, as lines of text; nothing is written and Ray is not started."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    local_workers = _local_worker_count(spec, workers, use_ray) if address is None else None
    planned = plan(spec, overwrite=overwrite, job_path=job_path, local_workers=local_workers)
    return planned.describe(spec)


def mark_tokenized(store: Store, spec: JobSpec, n_seq: int) -> None:
    """Record the corpus's length and its accumulation groups (a function of the job and the
    length alone); last, so a crash before it re-tokenizes."""
    model = store.model
    n_shards = -(-n_seq // spec.shard_size)
    group = shards_per_group(spec, model["hook_widths"], model["vocab_size"], n_shards)
    store.update_status(tokenized=True, n_seq=n_seq, shards_per_group=group)


def _swap_in(staging: str, url: str) -> None:
    """Put a complete replacement store in the old one's place: the old one is renamed aside,
    the new one renamed into place, then the old one deleted (each step checked to be a store)."""
    path = os.path.realpath(local_path(url))
    aside = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.actscope-old")
    Store.remove(aside)  # a stale one, if an earlier swap was cut short
    if inspect_target(url) != "store":
        raise StoreError(f"{url} changed while the job ran; the new store is kept at {staging}.")
    os.rename(path, aside)
    os.rename(staging, path)
    Store.remove(aside)


def _local_worker_count(spec: JobSpec, override: int | None, use_ray: bool) -> int:
    """Workers on this machine for an embedded run (the memory check shares it between them)."""
    if override is not None:
        return override
    if not use_ray:
        return 1
    if spec.workers != "auto":
        return spec.workers
    import torch

    return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else os.cpu_count() or 1


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

    def __init__(self, spec: JobSpec, tokenizer, ray_session: RaySession):
        self.spec, self.tokenizer, self.ray_session = spec, tokenizer, ray_session
        self.tasks = 0

    def __call__(self, batches: Iterator[list[str]]) -> Iterator[Encoded]:
        head = list(itertools.islice(batches, self.LOCAL_BATCHES + 1))
        local, rest = head[: self.LOCAL_BATCHES], itertools.chain(head[self.LOCAL_BATCHES :], batches)
        if len(head) <= self.LOCAL_BATCHES:
            yield from encode_here(local, self.tokenizer)
            return
        import ray

        self.ray_session.ensure()
        task = ray.remote(num_cpus=1)(encode_task)
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
    if override is not None:
        return override
    if spec.workers != "auto":
        return spec.workers
    if not use_ray:
        return 1
    import torch

    if address is None:
        return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else os.cpu_count() or 1
    import ray

    ray_session.ensure()
    resources = ray.cluster_resources()
    # The GPUs present now (an autoscaling cluster may have none yet: then its CPUs, at least 1).
    return int(resources.get("GPU", 0)) or max(1, int(resources.get("CPU", 1)))


def _execute_here(store_url: str, shards: list[int], logits: bool, threads: int | None, ready: list[float]):
    worker = ShardWorker(store_url, threads=threads)
    ready.append(time.perf_counter())
    for shard in shards:
        yield worker(shard)
    if logits:
        worker.write_logit_effects()


MAX_SHARD_ATTEMPTS = 4


def _execute_on_ray(store_url: str, shards: list[int], n_workers: int, logits: bool, threads: int | None, ready: list[float]):
    """Shards to a pool of actors, one model each; only shard ids and small results travel.
    Then one actor computes the logit effects from its copy of the weights (on its device).

    Losing a worker (its process killed, its node removed) loses at most the shard it was on:
    the shard goes back to the queue for the surviving actors, and a replacement actor is
    started, which joins the pool once Ray has placed it and it has loaded its model. A shard
    that fails ``MAX_SHARD_ATTEMPTS`` times stops the job (committed shards are kept)."""
    import ray
    from ray.exceptions import RayActorError

    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    device = Store.open(store_url).spec.device
    # device: cuda asks for GPU actors even before an autoscaler has added GPU nodes.
    if device == "cuda" or (device == "auto" and gpus):
        options = {"num_gpus": 1, "num_cpus": 1}
    else:
        # Fractional CPUs, so actors never hold every logical CPU (Ray deadlocks then), and
        # torch threads split the machine's cores between the actors.
        options = {"num_cpus": min(1.0, cpus / n_workers) * 0.99}
        threads = threads or max(1, (os.cpu_count() or 1) // n_workers)
    # No Ray-level restarts or retries: the loop below requeues a lost shard itself, so a
    # shard never waits for a dead actor to come back.
    actor_class = ray.remote(max_restarts=0, max_task_retries=0, **options)(ShardWorker)

    def start() -> tuple:
        actor = actor_class.remote(store_url, threads=threads)
        return actor.ready.remote(), actor

    queue = list(reversed(shards))  # popped from the end: shard order
    attempts = {shard: 0 for shard in shards}
    starting = dict(start() for _ in range(min(n_workers, max(len(shards), 1))))
    first = set(starting)  # the first workers: ``ready`` gets the time each had loaded its model
    running: dict = {}  # task -> (actor, shard)
    idle: list = []
    while queue or running:
        while idle and queue:
            actor, shard = idle.pop(), queue.pop()
            attempts[shard] += 1
            running[actor.__call__.remote(shard)] = (actor, shard)
        if not running and not starting:
            raise StoreError("every worker was lost and none could be started; committed shards are kept: run the job again.")
        [ref], _ = ray.wait([*running, *starting], num_returns=1)
        if ref in starting:
            actor = starting.pop(ref)
            try:
                ray.get(ref)
                idle.append(actor)
                if ref in first:
                    ready.append(time.perf_counter())
            except RayActorError:
                pass  # it could not start (its node went away); the others go on
            continue
        actor, shard = running.pop(ref)
        try:
            result = ray.get(ref)
        except RayActorError:
            if attempts[shard] >= MAX_SHARD_ATTEMPTS:
                raise StoreError(f"shard {shard} lost its worker {attempts[shard]} times; committed shards are kept: run the job again.") from None
            queue.append(shard)
            ref, actor = start()
            starting[ref] = actor
            continue
        idle.append(actor)
        yield result
    for attempt in range(MAX_SHARD_ATTEMPTS if logits else 0):
        if not idle:  # every actor was lost: one more to compute them
            ref, actor = start()
            ray.get(ref)
            idle.append(actor)
        try:
            ray.get(idle[0].write_logit_effects.remote())
            break
        except RayActorError:  # an idle actor can die too (its process killed, its node gone)
            idle.pop(0)
            if attempt == MAX_SHARD_ATTEMPTS - 1:
                raise StoreError("the logit effects lost their worker every time; committed shards are kept: run the job again.") from None
    for actor in idle + list(starting.values()):
        ray.kill(actor)
