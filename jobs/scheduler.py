"""Where the activate and reduce phases run: groups to a pool of workers (``GroupScheduler``, over
Ray actors or any ``Pool``), in this process (``execute_here``), and the reduce's parts as Ray
tasks (``reduce_on_ray``).

The scheduler's rules are plain Python over a ``Pool`` (start a worker, give it a group, wait, read
a result), so they are unit-tested with a fake pool (``tests/test_scheduler.py``) as well as by
killing real Ray workers (``tests/test_cluster.py``, ``tests/test_execution.py``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

from actscope.pipeline.reduce import Part, PartDone, PartKind, run_part
from actscope.pipeline.worker import GroupResult, ShardWorker
from actscope.storage.errors import ActscopeError, StoreError
from actscope.storage.lease import Fence
from actscope.storage.spec import JobSpec
from actscope.storage.store import Store

#: Times a group is given to a worker before a run stops (each loss of its worker counts).
MAX_SHARD_ATTEMPTS = 4

Span = tuple[int, int]  # a group's first and last sequence (exclusive)


class GroupFeed:
    """The groups a run dispatches, in order, each with its sequences: every pending group of a
    tokenized store (``of``), or, while the corpus is being tokenized, each group as soon as its
    sequences are written, and the last one once the corpus's length is known."""

    def __init__(self, spec: JobSpec, shards_per_group: int):
        self.seqs = shards_per_group * spec.shard_size  # sequences in a group
        self._lock = threading.Lock()
        self._written, self._total, self._next = 0, None, 0
        self._only: set[int] | None = None
        self.error: BaseException | None = None
        self.cancelled = False

    @classmethod
    def of(cls, store: Store, groups: list[int]) -> GroupFeed:
        feed = cls(store.spec, store.shards_per_group)
        feed._only = set(groups)
        feed.finish(store.n_seq)
        return feed

    def written(self, n_seq: int) -> None:
        if self.cancelled:
            raise StoreError("the run stopped")  # ends the tokenizer thread
        with self._lock:
            self._written = n_seq

    def finish(self, n_seq: int) -> None:
        with self._lock:
            self._written = self._total = n_seq

    def fail(self, err: BaseException) -> None:
        self.error = err

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def finished(self) -> bool:
        """Every group has been taken (the corpus is tokenized)."""
        with self._lock:
            return self._total is not None and self._next * self.seqs >= self._total

    def take(self) -> list[tuple[int, Span]]:
        """The groups that became ready since the last call: (group, (first, last sequence))."""
        with self._lock:
            out = []
            while True:
                first = self._next * self.seqs
                last = first + self.seqs if self._total is None else min(first + self.seqs, self._total)
                if (self._total is not None and first >= self._total) or (self._total is None and last > self._written):
                    return out
                if self._only is None or self._next in self._only:
                    out.append((self._next, (first, last)))
                self._next += 1


class WorkerLost(Exception):
    """The worker behind a call is gone (its process killed, its node removed)."""


class Pool(Protocol):
    """Workers as the scheduler sees them. A ``ref`` names a call in flight."""

    def start(self, actor: Any = None) -> tuple[Hashable, Any]:
        """Start a worker (or give ``actor``, started earlier, the store): (ref done once it has
        loaded its model, the worker)."""

    def run(self, actor: Any, group: int, span: Span) -> Hashable: ...

    def logits(self, actor: Any) -> Hashable: ...

    def wait(self, refs: list[Hashable], timeout: float | None) -> list[Hashable]:
        """Some of ``refs`` that are done (none if ``timeout`` passes first)."""

    def get(self, ref: Hashable) -> Any:
        """The call's result; ``WorkerLost`` if its worker died."""

    def kill(self, actor: Any) -> None: ...


class GroupScheduler:
    """Groups to a pool of workers, one group at a time each.

    Losing a worker loses at most the group it was on: the group goes back to the front of the
    queue for the surviving workers, and a replacement is started, which joins the pool once it
    has loaded its model. A group given out ``max_attempts`` times stops the run (committed
    groups are kept); so does losing every worker with none starting."""

    def __init__(self, pool: Pool, feed: GroupFeed, n_workers: int, logits: bool, *, prestarted: list | None = None,
                 on_ready: Callable[[], None] = lambda: None, max_attempts: int = MAX_SHARD_ATTEMPTS):
        self.pool, self.feed, self.logits, self.max_attempts = pool, feed, logits, max_attempts
        self.queue: deque[tuple[int, Span]] = deque(feed.take())  # in group order
        self.attempts: dict[int, int] = {}
        self.running: dict[Hashable, tuple[Any, int, Span]] = {}
        self.idle: list = []
        wanted = n_workers if not feed.finished else min(n_workers, max(len(self.queue), 1 if logits else 0))
        # Workers started during the plan first (given the store now), then new ones as needed.
        prestarted = prestarted if prestarted is not None else []
        self.starting: dict[Hashable, Any] = dict(pool.start(actor) for actor in prestarted[:wanted])
        for actor in prestarted[wanted:]:
            pool.kill(actor)
        prestarted.clear()
        self.starting.update(pool.start() for _ in range(wanted - len(self.starting)))
        self._first = set(self.starting)  # the first workers: ``on_ready`` as each has loaded its model
        self._on_ready = on_ready

    def results(self) -> Iterator[GroupResult]:
        """Every group's result, as each finishes; then the logit effects, where asked."""
        while (step := self._step()) is not None:
            if step is not _NOTHING:
                yield step
        if self.logits:
            self._write_logits()

    def close(self) -> None:
        for actor in self.idle + list(self.starting.values()) + [actor for actor, _, _ in self.running.values()]:
            self.pool.kill(actor)
        self.idle, self.starting, self.running = [], {}, {}

    def _step(self):
        """One event: a result, ``_NOTHING`` (a worker started or was lost, or nothing yet), or
        None once every group is done."""
        if self.feed.error is not None:
            raise self.feed.error
        self.queue.extend(self.feed.take())
        while self.idle and self.queue:
            actor, (group, span) = self.idle.pop(), self.queue.popleft()
            self.attempts[group] = self.attempts.get(group, 0) + 1
            self.running[self.pool.run(actor, group, span)] = (actor, group, span)
        if not self.queue and not self.running and self.feed.finished:
            return None
        if not self.running and not self.starting:
            if self.idle:  # waiting for the tokenizer to finish a group
                time.sleep(0.05)
                return _NOTHING
            raise StoreError("every worker was lost and none could be started; committed groups are kept: run the job again.")
        done = self.pool.wait([*self.running, *self.starting], None if self.feed.finished else 0.1)
        if not done:
            return _NOTHING
        ref = done[0]
        if ref in self.starting:
            self._started(ref)
            return _NOTHING
        actor, group, span = self.running.pop(ref)
        try:
            result = self.pool.get(ref)
        except WorkerLost:
            if self.attempts[group] >= self.max_attempts:
                raise StoreError(f"group {group} lost its worker {self.attempts[group]} times; committed groups are kept: run the job again.") from None
            self.queue.appendleft((group, span))
            ref, actor = self.pool.start()
            self.starting[ref] = actor
            return _NOTHING
        self.idle.append(actor)
        return result

    def _started(self, ref: Hashable) -> None:
        actor = self.starting.pop(ref)
        try:
            self.pool.get(ref)
        except WorkerLost:
            return  # it could not start (its node went away); the others go on
        self.idle.append(actor)
        if ref in self._first:
            self._on_ready()

    def _write_logits(self) -> None:
        """One worker computes the logit effects from its copy of the weights (on its device)."""
        for _ in range(self.max_attempts):
            try:
                if not self.idle:  # one still starting (no group was pending), or one more
                    ref, actor = self.starting.popitem() if self.starting else self.pool.start()
                    self.pool.get(ref)
                    self.idle.append(actor)
                self.pool.get(self.pool.logits(self.idle[0]))
                return
            except WorkerLost:  # an idle worker can die too (its process killed, its node gone)
                if self.idle:
                    self.idle.pop(0)
        raise StoreError("the logit effects lost their worker every time; committed groups are kept: run the job again.")


_NOTHING = object()


def actor_class(device: str, n_workers: int, threads: int | None):
    """The Ray actor class of ``ShardWorker`` for this job's device, and the torch threads of
    each actor (CPU actors split the machine's cores)."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    cpus = ray.cluster_resources().get("CPU", 1)
    # device: cuda asks for GPU actors even before an autoscaler has added GPU nodes.
    if device == "cuda" or (device == "auto" and gpus):
        options = {"num_gpus": 1, "num_cpus": 1}
    else:
        # Fractional CPUs, so actors never hold every logical CPU (Ray deadlocks then), and
        # torch threads split the machine's cores between the actors.
        options = {"num_cpus": min(1.0, cpus / n_workers) * 0.99}
        threads = threads or max(1, (os.cpu_count() or 1) // n_workers)
    # No Ray-level restarts or retries: the scheduler requeues a lost group itself, so a group
    # never waits for a dead actor to come back.
    return ray.remote(max_restarts=0, max_task_retries=0, **options)(ShardWorker), threads


def kill_actors(actors: list) -> None:
    """Kill ``actors`` (while their Ray is up: a shut-down Ray took them with it) and forget them."""
    if actors:
        import ray

        if ray.is_initialized():
            for actor in actors:
                ray.kill(actor)
        actors.clear()


class RayPool:
    """``Pool`` over Ray actors of ``ShardWorker``: only group ids and small results travel."""

    def __init__(self, store_url: str, fence: Fence, n_workers: int, threads: int | None):
        import ray
        from ray.exceptions import RayActorError

        self._ray, self._lost = ray, RayActorError
        self.store_url, self.fence = store_url, fence
        self.actor_class, self.threads = actor_class(Store.open(store_url).spec.device, n_workers, threads)

    def start(self, actor=None):
        actor = actor if actor is not None else self.actor_class.remote(threads=self.threads)
        return actor.open.remote(self.store_url, self.fence), actor

    def run(self, actor, group: int, span: Span):
        return actor.__call__.remote(group, span)

    def logits(self, actor):
        return actor.write_logit_effects.remote()

    def wait(self, refs, timeout):
        done, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        return done

    def get(self, ref):
        try:
            return self._ray.get(ref)
        except self._lost:
            raise WorkerLost from None

    def kill(self, actor) -> None:
        self._ray.kill(actor)


def execute_on_ray(store_url: str, fence: Fence, feed: GroupFeed, n_workers: int, logits: bool, threads: int | None,
                   ready: list[float], prestarted: list | None = None) -> Iterator[GroupResult]:
    """Groups to a pool of Ray actors, one model each, as ``feed`` makes them ready (while the
    corpus is tokenized, the actors load their models and start on the first groups); then one
    actor computes the logit effects. ``ready`` gets the time each of the first actors had loaded
    its model; ``prestarted``: actors started during the plan, taken over."""
    scheduler = GroupScheduler(RayPool(store_url, fence, n_workers, threads), feed, n_workers, logits, prestarted=prestarted,
                               on_ready=lambda: ready.append(time.perf_counter()))
    try:
        yield from scheduler.results()
    finally:
        scheduler.close()


def execute_here(store_url: str, fence: Fence, groups: list[int], logits: bool, threads: int | None, ready: list[float]) -> Iterator[GroupResult]:
    """Every group in this process, one worker, in order (``--local``, ``use_ray=False``)."""
    worker = ShardWorker(store_url, threads=threads, fence=fence)
    ready.append(time.perf_counter())
    for group in groups:
        yield worker(group)
    if logits:
        worker.write_logit_effects()


def reduce_on_ray(store_url: str, fence: Fence, first: list[Part], later: list[Part]) -> Iterator[PartDone]:
    """The reduce's parts as Ray tasks, one CPU each, each asking for the memory it will hold
    (Ray then runs as many at once as the nodes' memory allows); the co-activation blocks start
    once ``prepare`` is done. A task whose worker died is retried by Ray (a part is idempotent:
    it writes the same bytes); an error in a part stops the reduce, and the parts done are kept."""
    import ray
    from ray.exceptions import RayTaskError

    # A request above every node's memory would wait forever: ask for at most the largest node's.
    largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    task = ray.remote(num_cpus=1, max_retries=MAX_SHARD_ATTEMPTS - 1)(run_part)

    def submit(part: Part):
        memory = min(part.memory, int(largest * 0.9)) if largest else part.memory
        return task.options(memory=max(memory, 1)).remote(store_url, part, fence)

    running = {submit(part): part for part in first}
    if not any(part.kind == PartKind.PREPARE for part in first):
        running.update({submit(part): part for part in later})
        later = []
    while running:
        [ref], _ = ray.wait(list(running), num_returns=1)
        part = running.pop(ref)
        try:
            done = ray.get(ref)
        except RayTaskError as err:
            if isinstance(err.cause, ActscopeError):
                raise err.cause from None
            raise
        if part.kind == PartKind.PREPARE:
            running.update({submit(block): block for block in later})
        yield done


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
        # worker's torch threads then stall whenever those run (RESULTS.md, "Numbers behind code
        # comments"). The workers are the job: run them at the driver's priority.
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
