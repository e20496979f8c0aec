"""Execution on a real local Ray: the same tables whatever the number of workers, and after a kill."""

from __future__ import annotations

import functools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from actscope.jobs import runner, scheduler
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.pipeline import corpus
from actscope.pipeline.worker import ShardWorker
from actscope.queries.catalog import TABLES  # every table must match
from actscope.storage.errors import ActscopeError, StoreError
from actscope.storage.store import Store, shard_key
from tests.conftest import tree_digest
from tests.saes import write_sae

# Whole jobs run, killed and resumed: end to end, not the fast tier.
pytestmark = pytest.mark.slow


def tables(store_url: str) -> dict:
    """Every table as columns of Python values; NaN (the skew of a dead SAE latent) as "nan", so
    that equal tables compare equal."""
    store = Store.open(store_url)

    def plain(values: list) -> list:
        return ["nan" if isinstance(v, float) and math.isnan(v) else v for v in values]

    return {name: {c: plain(v) for c, v in pq.read_table(store.table_url(name)).to_pydict().items()} for name in TABLES}


def arrays_digest(store_url: str) -> str:
    """Digest of the token arrays, dense activations and shard partials (not the attrs, which
    record how the run went)."""
    root = store_url
    return "".join(
        tree_digest(os.path.join(root, part)) for part in ("tokens", "doc_ids", "kinds", "acts", "shards")
        if os.path.exists(os.path.join(root, part))
    )


def test_one_and_two_ray_workers_give_identical_results(make_job, ray_session, monkeypatch, tmp_path):
    """Also: tokenizing on Ray tasks (batches encoded anywhere, packed in order, beside workers
    started during the plan) writes the same token arrays as tokenizing in the driver."""
    saes = [{"name": "res-sae", "path": str(write_sae(tmp_path / "sae", d_in=64, d_sae=96, architecture="topk", k=6))}]
    one = load_job(make_job("one", workers=1, saes=saes))  # SAE latents too: the same whatever the workers
    two = load_job(make_job("two", workers=2, saes=saes))
    s1 = run_job(one)  # the test corpus is one batch: encoded in the driver
    # Many small batches, all but the first two encoded on Ray tasks.
    monkeypatch.setattr(corpus, "DOCUMENTS_PER_BATCH", 8)
    monkeypatch.setattr(runner.TaskEncoder, "LOCAL_BATCHES", 2)
    monkeypatch.setattr(runner, "RAY_REDUCE_BYTES", 0)  # the reduce's parts as Ray tasks, against the driver's
    monkeypatch.setattr(runner, "_start_early", lambda spec, address: True)  # workers started during the plan, as on a cluster
    s2 = run_job(two)
    assert (s1.tokenize_tasks, s2.tokenize_tasks > 3) == (0, True)
    assert (s1.workers, s2.workers) == (1, 2) and s2.reduce_parts
    assert s2.shards_run == s2.shards_total > 2
    assert tables(one.store) == tables(two.store)
    # Same bytes on disk too: partials, dense chunks and tokens (shard files are written by
    # whichever worker got the shard, so equal bytes mean the work is worker-independent).
    assert arrays_digest(one.store) == arrays_digest(two.store)


def test_rerun_resumes_and_a_shard_written_twice_is_harmless(make_job, ray_session):
    spec = load_job(make_job("again", workers=2))
    run_job(spec)
    before = tables(spec.store)
    digest = arrays_digest(spec.store)
    again = run_job(spec)
    assert again.shards_run == 0 and again.resumed
    worker = ShardWorker(spec.store)
    assert worker(0).skipped
    # Force a second write of a committed shard, as a retried task would.
    store = Store.open(spec.store, writable=True)
    store.group["shards/000000"].attrs["committed"] = False
    assert not worker(0).skipped
    assert arrays_digest(spec.store) == digest
    assert tables(spec.store) == before


def test_partially_done_job_resumes_to_identical_tables(make_job, tmp_path):
    # Enough tokens for several groups of shards (each of several shards at this job's state),
    # and an SAE's latents among the units.
    saes = [{"name": "res-sae", "path": str(write_sae(tmp_path / "sae", d_in=64, d_sae=96, architecture="jumprelu"))}]
    clean = load_job(make_job("clean", dataset={"max_tokens": 16000}, saes=saes))
    run_job(clean, use_ray=False)
    partial = load_job(make_job("partial", dataset={"max_tokens": 16000}, saes=saes))
    # Run plan + tokenize, then only some shards, as a crashed job would have.
    from actscope.jobs import runner

    planned = runner.plan(partial)
    model, tokenizer = planned.model, planned.tokenizer
    store = Store.create(partial.store, spec=partial, fingerprint=model.fingerprint, model=model)
    from actscope.pipeline.model import Framing

    encoder = functools.partial(corpus.encode_here, tokenizer=tokenizer)
    n_seq = corpus.tokenize_corpus(store, partial, Framing.from_tokenizer(tokenizer), encoder)
    for hook in partial.dense:
        store.create_dense(hook, model.hook_widths[hook], n_seq)
    runner.mark_tokenized(store, partial, n_seq)
    assert store.n_groups >= 3 and store.shards_per_group > 1, "the test needs three groups of several shards"
    worker = ShardWorker(partial.store)
    for group in (0, 2):
        worker(group)
    # A half-written group with no commit record: its files exist, but it must be redone.
    store.group["shards"].require_group(shard_key(store.shards_per_group)).create_array("junk", shape=(2,), dtype="int8")
    summary = run_job(partial, use_ray=False)
    done = len(store.group_shards(0)) + len(store.group_shards(2))
    assert summary.resumed and summary.shards_skipped == done and summary.shards_run == summary.shards_total - done
    # Every shard is counted by exactly one committed group, and the groups are those of the plan.
    covered = [shard for g in range(store.n_groups) for shard in range(*store.shard_record(g)["shards"])]
    assert covered == list(range(store.n_shards))
    assert tables(partial.store) == tables(clean.store)


def _committed(store_url: str) -> int:
    """Shards committed so far in a store another process is creating (0 while it is not whole)."""
    try:
        store = Store.open(store_url)
        return len(store.committed_shards()) if store.status.tokenized else 0
    except (KeyError, FileNotFoundError, StoreError):
        return 0


def test_killed_run_resumes_to_identical_tables(make_job, tmp_path):
    clean = load_job(make_job("clean-kill", shard_size=4, dataset={"max_tokens": 8000}))
    run_job(clean, use_ray=False)
    job = make_job("killed", shard_size=4, dataset={"max_tokens": 8000})
    spec = load_job(job)
    cmd = [sys.executable, "-m", "actscope", "run", str(job), "--local"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240  # a wait, not a timing: a loaded machine plans and tokenizes slowly
        while time.monotonic() < deadline:
            if _committed(spec.store) >= 5:
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    store = Store.open(spec.store)
    assert not store.status.complete, "the job finished before it could be killed"
    assert 5 <= len(store.committed_shards()) < store.n_shards
    summary = run_job(spec, use_ray=False)
    assert summary.resumed and summary.shards_skipped >= 5
    assert tables(spec.store) == tables(clean.store)


def test_a_reduce_stopped_midway_resumes_from_its_parts(make_job, monkeypatch):
    """The reduce's parts are its units of work: a reduce that fails after some parts keeps them
    (and every group), the next run runs only the others, and the tables are the clean run's."""
    clean = load_job(make_job("reduce-clean"))
    run_job(clean, use_ray=False)
    spec = load_job(make_job("reduce-stopped"))
    done: list[str] = []

    def fails_after_three(store_url, part, fence):
        if len(done) == 3:
            raise StoreError("stopped")
        result = runner_part(store_url, part, fence)
        done.append(result.key)
        return result

    runner_part = runner.run_part
    monkeypatch.setattr(runner, "run_part", fails_after_three)
    with pytest.raises(StoreError, match="stopped"):
        run_job(spec, use_ray=False)
    monkeypatch.setattr(runner, "run_part", runner_part)
    store = Store.open(spec.store)
    assert not store.status.complete and all(store.part_done(key) for key in done)
    again = run_job(spec, use_ray=False)
    assert again.shards_run == 0 and {p.key for p in again.reduce_parts}.isdisjoint(done)
    assert len(done) == 3 and again.reduce_parts, "the job should have more parts than were run"
    assert tables(spec.store) == tables(clean.store)
    # The parts are gone once the tables exist, and one merged co-activation set remains.
    assert not os.path.exists(os.path.join(spec.store, "index", "parts"))
    assert store.has_merged_coactivation() and not any("coactivation" in g for _, g in store.group["shards"].groups())


def test_workers_start_on_groups_while_the_corpus_is_tokenized(make_job, ray_session, monkeypatch):
    """Groups are fixed before the corpus is tokenized, so the workers run the first ones while
    the rest is read: the corpus here is read slowly, and waits for a first group to be committed
    before it goes on. The tables and partials are those of a run that tokenized first."""
    clean = load_job(make_job("overlap-clean", dense=[]))
    run_job(clean, use_ray=False)
    spec = load_job(make_job("overlap", dense=[], workers=2))
    monkeypatch.setattr(corpus, "DOCUMENTS_PER_BATCH", 2)
    monkeypatch.setattr(runner.TaskEncoder, "LOCAL_BATCHES", 2)
    read = corpus.read_batches
    committed_while_reading = []

    def slowly(dataset, **options):
        for batch in read(dataset, **options):
            if not committed_while_reading and _group_written(spec.store):
                # A group's sequences are in the store: read on once a worker has committed it.
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline and not _some_group_committed(spec.store):
                    time.sleep(0.05)
                committed_while_reading.append(_some_group_committed(spec.store))
            yield batch

    monkeypatch.setattr(corpus, "read_batches", slowly)
    summary = run_job(spec)
    assert committed_while_reading == [True] and summary.shards_run == summary.shards_total
    assert tables(spec.store) == tables(clean.store)
    assert arrays_digest(spec.store) == arrays_digest(clean.store)


def _group_written(store_url: str) -> bool:
    try:
        store = Store.open(store_url)
        return store.group["tokens"].shape[0] >= store.shards_per_group * store.spec.shard_size
    except (KeyError, FileNotFoundError, StoreError):
        return False


def _some_group_committed(store_url: str) -> bool:
    try:
        return bool(Store.open(store_url).committed_groups())
    except (KeyError, FileNotFoundError, StoreError):
        return False


def test_workers_started_during_the_plan_are_let_go_when_it_fails(make_job, ray_session, tmp_path, monkeypatch):
    """Workers start while the job is planned (on a cluster or GPUs; forced here), touching
    nothing until given the store; a plan that then finds a mistake reports it, creates no
    store, and hands their CPUs back to Ray."""
    started = []
    actor_class = scheduler.actor_class
    monkeypatch.setattr(runner, "_start_early", lambda spec, address: True)
    monkeypatch.setattr(scheduler, "actor_class", lambda *args: started.append(args) or actor_class(*args))
    total = ray_session.cluster_resources()["CPU"]
    # An unknown hook name is seen only once the model is loaded (in the plan, not in
    # check_before_loading), so the workers have started by then.
    spec = load_job(make_job("bad-hook", workers=2, hooks=["blocks.0.mlp.hook_posst"], dense=None))
    with pytest.raises(ActscopeError, match="hook_posst"):
        run_job(spec)
    assert not Path(spec.store).exists() and started
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and ray_session.available_resources().get("CPU", 0) < total:
        time.sleep(0.1)
    assert ray_session.available_resources().get("CPU", 0) == total
