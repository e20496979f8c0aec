"""Submitting through the Ray Jobs API of a real Ray head started here (``ray start --head``
with its dashboard): a deterministic submission id, no duplicate while it runs, status and logs,
and the same tables as a local run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from actscope.jobs.cli import app
from actscope.jobs.jobfile import load_job
from actscope.jobs.runner import run_job
from actscope.jobs.submit import submission_base
from tests.conftest import write_job
from tests.test_cluster import _free_port, tables

pytestmark = pytest.mark.slow
# The submission is what is tested here (every statistic is exact-tested elsewhere): top-k and
# moments only, so the submitted job and its clean twin run in seconds.
JOB = {"shard_size": 16, "dataset": {"max_tokens": 3000}, "workers": 1, "statistics": []}


@pytest.fixture
def head():
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port, dashboard = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp}",
         # Its own agent ports: an embedded Ray of another test may hold the default ones.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                assert proc.poll() is None and time.monotonic() < deadline, "the Ray head did not start"
                time.sleep(0.25)
        yield address
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # `ray start --block` stops what it started
            try:
                proc.wait(timeout=2)  # its graceful stop can take half a minute (the 8 s waited before always ran out)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_submit_resumes_rather_than_duplicates(head, tmp_path, tiny_model, corpus_dir):
    job = write_job(tmp_path, "submitted", tiny_model, corpus_dir, **JOB)
    spec = load_job(job)
    runner = CliRunner()
    first = runner.invoke(app, ["submit", str(job), "--address", head])
    assert first.exit_code == 0, first.output
    submission_id = submission_base(spec)
    assert submission_id in first.output and "submitted" in first.output
    again = runner.invoke(app, ["submit", str(job), "--address", head])
    assert again.exit_code == 0 and submission_id in again.output and "submitted:" not in again.output, again.output

    deadline = time.monotonic() + 300
    while True:
        state = runner.invoke(app, ["status", str(job), "--address", head])
        assert state.exit_code == 0, state.output
        if "SUCCEEDED" in state.output or "FAILED" in state.output:
            break
        assert time.monotonic() < deadline, state.output
        time.sleep(0.5)
    logs = runner.invoke(app, ["logs", submission_id, "--address", head])
    assert "SUCCEEDED" in state.output, logs.output
    assert "done:" in logs.output
    done = runner.invoke(app, ["submit", str(job), "--address", head])
    assert "already finished" in done.output

    clean = load_job(write_job(tmp_path, "clean", tiny_model, corpus_dir, **JOB))
    run_job(clean, use_ray=False)
    assert tables(spec.store) == tables(clean.store)


def test_a_malformed_job_is_refused_before_the_cluster_sees_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nhooks: 3\n")
    result = CliRunner().invoke(app, ["submit", str(bad), "--address", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "hooks" in result.output and "Traceback" not in result.output
