"""Run a cache job: plan → tokenize → activate (Ray workers) → reduce → index.

``run_job`` takes the store's lease and runs the phases in order (``_Run``); the plan is
``jobs.plan``, tokenizing ``jobs.encoders``, and where groups and the reduce's parts run
``jobs.scheduler``.

Each phase reads only what the previous one wrote to the store, so a crashed or killed job
restarts at its first unfinished shard. Nothing touches an existing store until the job is known
to be valid and to belong to it (same fingerprint), unless the user asks to overwrite it.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from actscope.jobs import scheduler
from actscope.jobs.encoders import LocalEncoder, TaskEncoder
from actscope.jobs.plan import Action, Plan, check_before_loading, group_size, plan
from actscope.jobs.scheduler import RaySession
from actscope.pipeline.capacity import partial_bytes
from actscope.pipeline.corpus import document_chars, tokenize_corpus
from actscope.pipeline.model import Framing
from actscope.pipeline.reduce import PartDone, assemble, plan_parts, run_part
from actscope.pipeline.worker import GroupResult
from actscope.storage.errors import ActscopeError, StoreDamaged, StoreError
from actscope.storage.lease import Fence, Lease
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
    do, and it was measured a wash: the start-up shortened by what the plan lengthened
    (RESULTS.md, "Numbers behind code comments")."""
    import torch

    return address is not None or spec.device == "cuda" or (spec.device == "auto" and torch.cuda.is_available())


def _finished(url: str) -> bool:
    try:
        return Store.exists(url) and bool(Store.open(url).status.complete)
    except StoreError:
        return False  # not an actscope store: the plan says so


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
    worker_memory: int | None = None,
) -> RunSummary:
    """``run_job`` under the lease whose ``fence`` every commit checks: the job's phases in
    order, and the clean-up in one place. ``threads``: torch threads per CPU worker (default:
    the cores split between the workers); ``worker_memory``: each worker's bytes, where the
    user gives them (the plan refuses a job that needs more)."""
    run = _Run(spec, fence, address=address, workers=workers, use_ray=use_ray, threads=threads, reporter=reporter)
    created = None  # a store this run made, removed if the run fails before it is tokenized
    try:
        planned = run.plan(overwrite=overwrite, job_path=job_path, worker_memory=worker_memory)
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

    def plan(self, *, overwrite: bool, job_path: str | None, worker_memory: int | None = None) -> Plan:
        """Ray starts (its own processes, mostly waiting) while the plan builds the model from
        its config on this process's thread, then the workers start (on a cluster or GPUs); a
        finished store never waits for Ray."""
        unfinished = self.use_ray and not _finished(self.spec.store)
        planned = _plan_while_ray_starts(
            self.spec, self.ray if unfinished else None,
            on_ray=self._prestart if unfinished and _start_early(self.spec, self.address) else None,
            overwrite=overwrite, job_path=job_path, local_workers=self.local_workers, worker_memory_limit=worker_memory,
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
            use_ray: bool = True, job_path: str | None = None, worker_memory: int | None = None) -> list[str]:
    """What ``run_job`` would do, as lines of text; nothing is written, Ray is not started and no
    weight is read. ``worker_memory``: plan for workers of that many bytes (elsewhere: GPUs of a
    cluster) rather than for this machine's."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    local_workers = _local_worker_count(spec, workers, use_ray) if address is None and worker_memory is None else None
    check_before_loading(spec, job_path)
    planned = plan(spec, overwrite=overwrite, job_path=job_path, local_workers=local_workers, worker_memory_limit=worker_memory)
    return planned.describe(spec)


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


