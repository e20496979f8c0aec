"""Beyond one process: stores on object storage (a real S3-compatible server), a real multi-node
Ray cluster on this machine, and the failures a cluster has. Every run is compared with a clean
in-process run of the same job: the tables must be identical."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import psutil
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import actscope
from actscope.jobs import scheduler
from actscope.jobs.cli import app
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.queries.catalog import TABLES
from actscope.storage.errors import StoreError
from actscope.storage.store import Store, shard_key
from tests.conftest import tree_digest, write_job

pytestmark = pytest.mark.slow
# Many small units of work, for the fault tests: with every statistic the plan would put all 47
# shards in one accumulation group (its state per token), so only bottom examples are kept here;
# groups of every statistic are exact-tested in test_execution and test_reference.
JOB = {"shard_size": 2, "dataset": {"max_tokens": 3000}, "statistics": ["bottom"]}


def tables(store_url: str) -> dict:
    store = Store.open(store_url)
    out = {}
    for name in TABLES:
        with fsspec.open(store.table_url(name), "rb") as f:
            out[name] = pq.read_table(f).to_pydict()
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory, tiny_model, corpus_dir):
    root = tmp_path_factory.mktemp("cluster-clean")
    spec = load_job(write_job(root, "clean", tiny_model, corpus_dir, **JOB))
    run_job(spec, use_ray=False)
    return tables(spec.store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    """A failed test must not leave its job running (and loading the machine) behind."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _actscope(*args: str, env: dict | None = None) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "actscope", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "250", **(env or {})}, start_new_session=True,
    )
    _STARTED.append(proc)
    return proc


def _wait_for_shards(store_url: str, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            store = Store.open(store_url)
            if store.status.tokenized and len(store.committed_shards()) >= n:
                return
        except (StoreError, KeyError):  # not created yet, or being created
            pass
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {n} shards committed in {timeout} s")


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, output
    return output


# -- object storage ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def s3():
    """A real S3-compatible server (moto's server mode) on a local port; credentials and the
    endpoint come from the environment, as they would on a cluster."""
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    env = {
        "AWS_ACCESS_KEY_ID": "actscope-test-key", "AWS_SECRET_ACCESS_KEY": "actscope-test-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir("actscope-test")
        yield env
    finally:
        server.terminate()
        server.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# An object store (here a local Python server) is slow per request: fewer, larger shards.
S3_JOB = {"shard_size": 32, "dataset": {"max_tokens": 2000}}


@pytest.fixture(scope="module")
def clean_s3(tmp_path_factory, tiny_model, corpus_dir):
    spec = load_job(write_job(tmp_path_factory.mktemp("s3-clean"), "clean", tiny_model, corpus_dir, **S3_JOB))
    run_job(spec, use_ray=False)
    return tables(spec.store)


@pytest.fixture(scope="module")
def s3_run(s3, ray_session, tmp_path_factory, tiny_model, corpus_dir):
    """The job run with two workers on the session's Ray into the object store: (url, job file,
    summary). The workers get the credentials as a cluster's pods do, in their environment (here
    Ray's ``runtime_env``); the driver has them in its own. The session's Ray is reused: a Ray of
    the job's own costs seconds and shows nothing more (the CLI's run on S3 is tested below)."""
    url = "s3://actscope-test/runs/job.zarr"
    job = write_job(tmp_path_factory.mktemp("s3-run"), "s3job", tiny_model, corpus_dir, store=url, workers=2, **S3_JOB)

    def with_credentials(*args):
        cls, threads = actor_class(*args)
        return cls.options(runtime_env={"env_vars": s3}), threads

    actor_class = scheduler.actor_class
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scheduler, "actor_class", with_credentials)
        summary = run_job(load_job(job))
    return url, job, summary


def test_a_store_on_object_storage_equals_a_local_one(s3_run, clean_s3, tmp_path):
    url, job, summary = s3_run
    assert summary.workers == 2 and summary.shards_run == summary.shards_total
    assert tables(url) == clean_s3
    # Queries and reports read it where it is.
    runner = CliRunner()
    result = runner.invoke(app, ["top", url, "blocks.0.mlp.hook_post", "3", "-k", "2", "--format", "json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", url, "blocks.0.mlp.hook_post", "3", "--out", str(tmp_path / "n.html")])
    assert result.exit_code == 0, result.output
    # Credentials stay in the environment: nothing of them is written into the store.
    fs = fsspec.filesystem("s3")
    for path in fs.find("actscope-test/runs/job.zarr"):
        if path.endswith(".json"):
            assert b"actscope-test-secret" not in fs.cat(path) and b"actscope-test-key" not in fs.cat(path)
    # A re-run finds it complete and changes nothing (in this process: the environment holds the
    # credentials, and a second Ray start would only add time).
    again = run_job(load_job(job), use_ray=False)
    assert again.shards_run == 0 and again.resumed
    assert tables(url) == clean_s3


def test_an_object_store_lease_is_exclusive_fenced_and_taken_over_once_expired(s3_run, monkeypatch):
    """On S3 the lease is an object created only where none is: the CLI's run left none behind;
    a second writer is refused by name; a lease whose owner stopped renewing it is taken over
    once expired (by one run of two), and the old owner's fence then refuses its commits."""
    from actscope.storage import lease as leases

    url, _, _ = s3_run
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert not fs.exists(leases.lease_url(url).removeprefix("s3://"))
    held = leases.Lease.acquire(url)
    with pytest.raises(leases.StoreBusy, match=f"process {os.getpid()}"):
        leases.Lease.acquire(url)
    held.fence.check()
    # Its owner stops renewing (a driver killed with SIGKILL): the lease expires.
    held._stop.set()
    stale = leases.Owner(**{**held.owner.__dict__, "expires": time.time() - 1})
    fs.pipe(leases.lease_url(url).removeprefix("s3://"), stale.encode())
    with pytest.raises(leases.LeaseLost, match="expired"):
        held.fence.check()
    taken = leases.Lease.acquire(url)
    with pytest.raises(leases.StoreBusy):
        leases.Lease.acquire(url)
    with pytest.raises(leases.LeaseLost, match="taken over"):
        held.fence.check()
    taken.fence.check()
    taken.release()
    assert not fs.exists(leases.lease_url(url).removeprefix("s3://"))


# -- a real multi-node cluster ---------------------------------------------------------------

@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        yield c
    finally:
        c.shutdown()


def test_a_job_runs_across_nodes_and_survives_losing_one(cluster, clean, tmp_path, tiny_model, corpus_dir):
    """Two nodes, one worker each; the second node is removed mid-job: its shard goes back to
    the queue and the head's worker finishes the job."""
    node = cluster.add_node(num_cpus=1)
    job = write_job(tmp_path, "nodes", tiny_model, corpus_dir, workers=2, **JOB)
    spec = load_job(job)
    proc = _actscope("run", str(job), "--address", cluster.address)
    # Remove the node only once its worker is running shards (its actor can start later than the
    # head's, which would otherwise do every shard so far alone), and a few shards later.
    _wait_for_running_worker(node, proc)
    _wait_for_shards(spec.store, len(Store.open(spec.store).committed_shards()) + 4, proc)
    cluster.remove_node(node)
    output = _finish(proc)
    assert "2 node(s)" in output, output
    n_tokens = Store.open(spec.store).n_seq * spec.context_length
    assert re.search(rf"tokenize\W+{n_tokens}/{n_tokens} tokens", output), output  # progress counts each token once
    assert tables(spec.store) == clean


def test_a_killed_worker_process_loses_nothing(clean, tmp_path, tiny_model, corpus_dir):
    job = write_job(tmp_path, "killworker", tiny_model, corpus_dir, workers=2, **JOB)
    spec = load_job(job)
    proc = _actscope("run", str(job))
    _wait_for_shards(spec.store, 4, proc)
    driver = psutil.Process(proc.pid)
    workers = [p for p in psutil.process_iter(["cmdline"]) if "ShardWorker" in " ".join(p.info["cmdline"] or [])]
    workers = [p for p in workers if _descends_from(p, driver)]
    assert workers, "no ShardWorker process found"
    workers[0].kill()
    _finish(proc)
    assert tables(spec.store) == clean


def _wait_for_running_worker(node, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until a ShardWorker started by ``node``'s raylet runs a shard (Ray titles the process
    ``ray::ShardWorker.__call__`` while it does)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if any("ShardWorker.__call__" in " ".join(p.cmdline()) for p in raylet.children(recursive=True)):
                return
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"no worker ran a shard on the added node in {timeout} s")


def _descends_from(process: psutil.Process, ancestor: psutil.Process) -> bool:
    try:
        return any(p.pid == ancestor.pid for p in process.parents())
    except psutil.NoSuchProcess:
        return False


# -- a crashed writer ------------------------------------------------------------------------

def test_a_truncated_chunk_from_a_crashed_writer_is_rewritten_on_resume(clean, tmp_path, tiny_model, corpus_dir):
    """The driver and its writer are killed mid-job; the next shard's chunks are left cut short, as
    a writer killed mid-write leaves them, with no commit record. On resume the shard is redone
    whole and the store ends byte-identical to one that never crashed."""
    reference = load_job(write_job(tmp_path, "reference", tiny_model, corpus_dir, **JOB))
    run_job(reference, use_ray=False)
    job = write_job(tmp_path, "crashed", tiny_model, corpus_dir, **JOB)
    spec = load_job(job)
    proc = _actscope("run", str(job), "--local")
    _wait_for_shards(spec.store, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store.open(spec.store)
    victim = min(set(range(store.n_shards)) - store.committed_shards())
    root, victim_key, done_key = Path(spec.store), shard_key(victim), shard_key(min(store.committed_shards()))
    hook = "blocks.0.mlp.hook_post"
    cut = [
        (root / "acts" / hook / "c" / "0" / "0" / "0", root / "acts" / hook / "c" / str(victim) / "0" / "0"),
        *[(p, root / "shards" / victim_key / p.relative_to(root / "shards" / done_key))
          for p in (root / "shards" / done_key).rglob("*") if p.is_file() and "/c/" in str(p)][:3],
    ]
    for source, target in cut:
        target.parent.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    first, _ = store.shard_range(victim)
    with pytest.raises(Exception):  # noqa: B017 - which error a cut chunk raises is the codec's business
        store.dense(hook)[first]  # the chunk is unreadable now
    summary = run_job(spec, use_ray=False)
    assert summary.resumed and summary.shards_skipped >= 3
    assert tables(spec.store) == clean
    for part in ("tokens", "acts", "shards"):
        assert tree_digest(root / part) == tree_digest(Path(reference.store) / part), part


def test_queries_read_an_object_store_index_without_network_access(s3_run, clean_s3, tmp_path, monkeypatch):
    """The catalog caches the index locally (downloaded once, checked on every connect, never
    stale); the locked-down connection still refuses the rest."""
    monkeypatch.setenv("ACTSCOPE_CACHE", str(tmp_path / "cache"))
    url = "s3://actscope-test/runs/copied.zarr"  # a copy of the CLI's store, changed below
    fs = fsspec.filesystem("s3")
    fs.copy(s3_run[0].removeprefix("s3://"), url.removeprefix("s3://"), recursive=True)
    assert tables(url) == clean_s3
    with actscope.connect(url) as c:
        assert c.sql("SELECT count(*) FROM neuron_stats").rows[0][0] == 256 + 64
        with pytest.raises(Exception, match="Refused|only"):
            c.sql("SELECT * FROM read_csv('/etc/passwd')")
        files = dict(c.files)
    assert all(path.startswith(str(tmp_path / "cache")) for path in files.values())
    stamps = {t: os.stat(p).st_mtime_ns for t, p in files.items()}
    with actscope.connect(url) as c:  # unchanged: served from the cache, nothing downloaded
        assert {t: os.stat(p).st_mtime_ns for t, p in c.files.items()} == stamps
    # The store changes (a table rewritten in place): the next connect reads the new bytes.
    store = Store.open(url)
    fs.pipe(store.table_url("vocab"), fs.cat(store.table_url("token_stats")))
    with actscope.connect(url) as c:
        assert c.sql("SELECT count(*) FROM vocab").rows[0][0] == len(clean_s3["token_stats"]["neuron"])


# Only what the store's path rules need: one hook, no optional statistics, few shards.
SMALL_S3 = {"shard_size": 32, "dataset": {"max_tokens": 600}, "hooks": ["blocks.0.mlp.hook_post"], "statistics": []}


def test_object_store_paths_follow_the_local_rules(s3, tmp_path, tiny_model, corpus_dir):
    """A prefix holding a user's objects is never a store; --overwrite replaces an actscope store
    there (deleted only once the new job is validated) and nothing else."""
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.pipe("actscope-test/userfiles/notes.txt", b"keep me")
    runner = CliRunner()
    job = write_job(tmp_path, "users", tiny_model, corpus_dir, store="s3://actscope-test/userfiles", **SMALL_S3)
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["run", str(job), "--local", *extra])
        assert result.exit_code == 2 and "not an actscope store and not empty" in " ".join(result.output.split()), result.output
    assert fs.cat("actscope-test/userfiles/notes.txt") == b"keep me"
    url = "s3://actscope-test/runs/replaced.zarr"
    first = write_job(tmp_path, "first", tiny_model, corpus_dir, store=url, top_k=3, dense=[], **SMALL_S3)
    assert runner.invoke(app, ["run", str(first), "--local"]).exit_code == 0
    bad = write_job(tmp_path, "bad", tiny_model, corpus_dir, store=url, top_k=4, context_length=65, dense=[], **SMALL_S3)
    result = runner.invoke(app, ["run", str(bad), "--local", "--overwrite"])
    assert result.exit_code == 2 and "positions" in result.output
    assert Store.open(url).spec.top_k == 3  # a job that fails validation deletes nothing
    second = write_job(tmp_path, "second", tiny_model, corpus_dir, store=url, top_k=4, dense=[], **SMALL_S3)
    result = runner.invoke(app, ["run", str(second), "--local", "--overwrite"])
    assert result.exit_code == 0, result.output
    with actscope.connect(url) as catalog:
        assert catalog.sql("SELECT max(rank) FROM top_examples").rows == [(4,)]
