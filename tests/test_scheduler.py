"""The group scheduler's rules with a fake pool of workers (no Ray): every group runs until it
succeeds, a lost worker's group goes back to the front of the queue and a replacement starts, a
group that keeps losing its worker stops the run, and every worker is let go at the end. The
same rules are checked against real killed Ray workers in test_cluster and test_execution; only
these tests can choose which call fails."""

from __future__ import annotations

from itertools import count
from types import SimpleNamespace

import pytest

from actscope.jobs.scheduler import GroupFeed, GroupScheduler, WorkerLost
from actscope.storage.errors import StoreError


class FakePool:
    """Workers that answer in the order they were called. ``lose``: (group, attempt) pairs whose
    worker dies during that attempt; ``dead_starts``: how many starts fail; ``lose_logits``: how
    many logit calls lose their worker."""

    def __init__(self, lose=(), dead_starts=0, lose_logits=0):
        self.lose, self.dead_starts, self.lose_logits = set(lose), dead_starts, lose_logits
        self.ids = count()
        self.calls: dict[int, tuple] = {}  # ref -> what it is
        self.order: list[int] = []
        self.started: list[str] = []
        self.killed: list[str] = []
        self.tries: dict[int, int] = {}
        self.ran: list[tuple[str, int]] = []

    def _call(self, what) -> int:
        ref = next(self.ids)
        self.calls[ref] = what
        self.order.append(ref)
        return ref

    def start(self, actor=None):
        actor = actor or f"w{len(self.started)}"
        self.started.append(actor)
        return self._call(("start", actor)), actor

    def run(self, actor, group, span):
        return self._call(("run", actor, group, span))

    def logits(self, actor):
        return self._call(("logits", actor))

    def wait(self, refs, timeout):
        return [min(refs, key=self.order.index)]

    def get(self, ref):
        what = self.calls[ref]
        if what[0] == "start":
            if self.dead_starts:
                self.dead_starts -= 1
                raise WorkerLost
            return None
        if what[0] == "logits":
            if self.lose_logits:
                self.lose_logits -= 1
                raise WorkerLost
            return "logits"
        _, actor, group, span = what
        self.tries[group] = self.tries.get(group, 0) + 1
        if (group, self.tries[group]) in self.lose:
            raise WorkerLost
        self.ran.append((actor, group))
        return (group, span)

    def kill(self, actor):
        self.killed.append(actor)


def feed(groups: int, per_group: int = 2) -> GroupFeed:
    f = GroupFeed(SimpleNamespace(shard_size=per_group), 1)
    f.finish(groups * per_group)
    return f


def run(pool, n_groups=5, workers=2, logits=False, **options):
    scheduler = GroupScheduler(pool, feed(n_groups), workers, logits, **options)
    try:
        return list(scheduler.results()), scheduler
    finally:
        scheduler.close()


def test_every_group_runs_once_and_every_worker_is_let_go():
    pool = FakePool()
    results, _ = run(pool)
    assert sorted(results) == [(g, (2 * g, 2 * g + 2)) for g in range(5)]
    assert pool.started == ["w0", "w1"] and sorted(pool.killed) == ["w0", "w1"]
    assert {actor for actor, _ in pool.ran} == {"w0", "w1"}


def test_a_lost_group_goes_back_first_and_a_replacement_starts():
    pool = FakePool(lose={(1, 1)})
    results, scheduler = run(pool)
    assert sorted(r[0] for r in results) == list(range(5))
    assert scheduler.attempts[1] == 2 and all(scheduler.attempts[g] == 1 for g in (0, 2, 3, 4))
    assert pool.started == ["w0", "w1", "w2"]  # the replacement
    assert [g for _, g in pool.ran].index(1) < [g for _, g in pool.ran].index(4)  # requeued at the front
    assert len(pool.killed) == 2 and "w2" in pool.killed  # the lost worker is gone already


def test_a_group_that_keeps_losing_its_worker_stops_the_run():
    pool = FakePool(lose={(2, a) for a in range(1, 5)})
    with pytest.raises(StoreError, match="group 2 lost its worker 3 times"):
        run(pool, max_attempts=3)
    assert pool.tries[2] == 3


def test_workers_that_cannot_start_are_skipped_and_none_left_stops_the_run():
    pool = FakePool(dead_starts=1)
    results, _ = run(pool)  # one of the two never starts: the other runs every group
    assert len(results) == 5 and {actor for actor, _ in pool.ran} == {"w1"}
    with pytest.raises(StoreError, match="every worker was lost"):
        run(FakePool(dead_starts=2))


def test_workers_started_early_are_used_first_and_the_spare_ones_let_go():
    pool = FakePool()
    prestarted = ["early0", "early1", "early2"]
    results, _ = run(pool, n_groups=2, workers=2, prestarted=prestarted)
    assert len(results) == 2 and prestarted == []
    assert pool.started == ["early0", "early1"] and "early2" in pool.killed


def test_logit_effects_survive_a_lost_worker_and_need_one_when_no_group_is_pending():
    pool = FakePool(lose_logits=1)
    ready = []
    results, _ = run(pool, n_groups=3, logits=True, on_ready=lambda: ready.append(1))
    assert len(results) == 3 and len(ready) == 2
    assert [c[0] for c in pool.calls.values()].count("logits") == 2
    idle = FakePool()
    assert run(idle, n_groups=0, workers=4, logits=True)[0] == [] and idle.started == ["w0"]
    with pytest.raises(StoreError, match="logit effects lost their worker"):
        run(FakePool(lose_logits=9), n_groups=1, logits=True)
