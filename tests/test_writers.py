"""One writer per store: runs started at once on one store, ``--overwrite`` racing, a run against a
store being replaced, and the fence that stops a writer which lost its lease.

What only these catch: two real processes (``actscope run --local``) reaching the same store in
the same instant, where the lease's OS lock is all that keeps them apart."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.queries.catalog import TABLES
from actscope.storage.errors import StoreError
from actscope.storage.lease import Lease, LeaseLost, StoreBusy, lease_url
from actscope.storage.store import Store
from tests.conftest import write_job

# Small, so that six processes at once stay cheap; the property needs no size.
SMALL = {"dataset": {"max_tokens": 1200}, "shard_size": 8}


def tables(store_url: str) -> dict:
    store = Store.open(store_url)
    return {name: pq.read_table(store.table_url(name)).to_pydict() for name in TABLES}


def _start(job: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "actscope", "run", str(job), "--local", *args], stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "250"}, start_new_session=True,
    )


def _outcomes(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        out.append((proc.returncode, output))
    return out


def _one_wrote_one_was_refused(pair: list[tuple[int, str]]) -> None:
    codes = sorted(code for code, _ in pair)
    assert codes == [0, 2], pair
    refused = next(output for code, output in pair if code == 2)
    assert "is being written by process" in " ".join(refused.split()), refused


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, tiny_model, corpus_dir):
    """Two jobs (``new``, ``old``: another top_k), each run once cleanly: their tables."""
    root = tmp_path_factory.mktemp("writers-clean")
    clean = {}
    for name, top_k in (("new", 8), ("old", 4)):
        spec = load_job(write_job(root, name, tiny_model, corpus_dir, top_k=top_k, **SMALL))
        run_job(spec, use_ray=False)
        clean[name] = (spec.store, tables(spec.store))
    return clean


@pytest.mark.slow
def test_runs_started_at_once_on_one_store_leave_one_writer(jobs, tmp_path, tiny_model, corpus_dir):
    """Three pairs on new stores, then three ``--overwrite`` pairs on another job's stores, all
    pairs at once: in each pair one run writes and the other exits 2 naming the store as busy;
    every store's tables equal a clean run's, and no staging folder is left behind."""
    job_files = [write_job(tmp_path, f"race{i}", tiny_model, corpus_dir, top_k=8, **SMALL) for i in range(3)]
    pairs = [[_start(job), _start(job)] for job in job_files]
    for pair in pairs:
        _one_wrote_one_was_refused(_outcomes(pair))
    for job in job_files:
        assert tables(load_job(job).store) == jobs["new"][1]

    # --overwrite pairs: each store holds the old job, and both runs replace it at once.
    for job in job_files:
        store = load_job(job).store
        shutil.rmtree(store)
        shutil.copytree(jobs["old"][0], store)
    pairs = [[_start(job, "--overwrite"), _start(job, "--overwrite")] for job in job_files]
    for pair in pairs:
        _one_wrote_one_was_refused(_outcomes(pair))
    for job in job_files:
        assert tables(load_job(job).store) == jobs["new"][1]
    assert sorted(os.listdir(tmp_path)) == sorted([f"race{i}.{ext}" for i in range(3) for ext in ("yaml", "zarr")])


@pytest.mark.slow
def test_a_run_against_a_store_being_replaced_is_refused(jobs, tmp_path, tiny_model, corpus_dir):
    """While an ``--overwrite`` builds the replacement (stopped mid-way by SIGSTOP, so the race is
    certain), a run of the old job on the same store exits 2 and touches nothing; the replacement
    then finishes and equals a clean run."""
    old = tmp_path / "old.yaml"  # the old job, on the same store path as the new one
    shutil.move(write_job(tmp_path, "replaced", tiny_model, corpus_dir, top_k=4, **SMALL), old)
    new = write_job(tmp_path, "replaced", tiny_model, corpus_dir, top_k=8, **SMALL)
    shutil.copytree(jobs["old"][0], load_job(new).store)
    staging = tmp_path / ".replaced.zarr.actscope-new"
    replacing = _start(new, "--overwrite")
    deadline = time.monotonic() + 120
    while not (staging / "zarr.json").exists():
        assert replacing.poll() is None and time.monotonic() < deadline, replacing.stdout.read()
        time.sleep(0.02)
    os.kill(replacing.pid, signal.SIGSTOP)
    try:
        [(code, output)] = _outcomes([_start(old)])
    finally:
        os.kill(replacing.pid, signal.SIGCONT)
    assert code == 2 and "is being written by process" in " ".join(output.split()), output
    [(code, output)] = _outcomes([replacing])
    assert code == 0, output
    assert tables(load_job(new).store) == jobs["new"][1]


def test_a_writer_that_lost_its_lease_commits_nothing(make_job, tmp_path):
    """The fence: once another run holds the lease (the lock file was removed and taken again,
    as a careless clean-up would), the first writer's commits are refused and nothing is
    committed; a second writer meanwhile is refused by name."""
    spec = load_job(make_job("fenced"))
    lease = Lease.acquire(spec.store)
    with pytest.raises(StoreBusy, match=f"process {os.getpid()}"):
        Lease.acquire(spec.store)
    store = Store.create(spec.store, spec=spec, fingerprint="f", model={}, fence=lease.fence)
    store.update_status(n_seq=1)
    os.unlink(lease_url(spec.store))
    with Lease.acquire(spec.store):
        with pytest.raises(LeaseLost, match="taken over by process"):
            store.write_partial(0, {"blocks.0.mlp.hook_post": {"count": np.zeros(3)}}, {})
        with pytest.raises(LeaseLost):
            store.update_status(complete=True)
    assert not store.is_committed(0) and not Store.open(spec.store).status.complete
    lease.release()
    assert not Path(lease_url(spec.store)).exists()


def test_a_lock_file_that_is_a_link_is_refused(make_job, tmp_path):
    """The lock file is opened without following links: a link planted there is refused, and
    the file it points to is untouched."""
    spec = load_job(make_job("linked-lock"))
    victim = tmp_path / "notes.txt"
    victim.write_text("mine")
    os.symlink(victim, lease_url(spec.store))
    with pytest.raises(StoreError, match="symbolic link"):
        Lease.acquire(spec.store)
    assert victim.read_text() == "mine"
