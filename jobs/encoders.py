"""Tokenizing the corpus: in this process (``LocalEncoder``) or on Ray tasks (``TaskEncoder``)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

from actscope.jobs.scheduler import RaySession
from actscope.pipeline.corpus import Encoded, encode_here, encode_task
from actscope.storage.spec import JobSpec


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
