"""Submitting a job file to a Ray cluster through the Ray Jobs API (the dashboard's port, 8265).

The submission id comes from the job's fingerprint (its result fields and its store), so
submitting the same job again never starts a second copy: while one runs, the submission
reports it; after one failed or was stopped, a new attempt (``<id>-2``, ``-3``, ...) resumes
from the store's committed shards; after one succeeded, there is nothing to do.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from actscope.storage.errors import ActscopeError
from actscope.storage.spec import JobSpec

ACTIVE = {"PENDING", "RUNNING"}
AGENT_WAIT_S = 60


class SubmitError(ActscopeError):
    pass


def submission_base(spec: JobSpec) -> str:
    payload = json.dumps({**spec.result_fields(), "store": spec.store}, sort_keys=True, default=str)
    return "actscope-" + hashlib.sha256(payload.encode()).hexdigest()[:16]


class SubmissionState(StrEnum):
    SUBMITTED = "submitted"  # a new attempt
    RUNNING = "running"  # an earlier attempt of the same job is still running
    SUCCEEDED = "succeeded"  # an earlier attempt of the same job finished


@dataclass(frozen=True)
class Submission:
    submission_id: str
    state: SubmissionState


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise SubmitError(f"cannot reach the Ray Jobs API at {address}: {str(err).splitlines()[0]}") from None


def _attempts(client, base: str) -> list:
    jobs = [j for j in client.list_jobs() if (j.submission_id or "").split("-")[:2] == base.split("-")[:2]]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def submit(job_file: str, address: str, *, force: bool = False) -> Submission:
    from actscope.jobs.jobfile import load_job

    spec = load_job(job_file)  # a malformed job is refused here, before the cluster sees it
    client = _client(address)
    base = submission_base(spec)
    attempts = _attempts(client, base)
    for job in attempts:
        if str(job.status) in ACTIVE or getattr(job.status, "name", "") in ACTIVE:
            return Submission(job.submission_id, SubmissionState.RUNNING)
    if attempts and _status(attempts[-1]) == "SUCCEEDED" and not force:
        return Submission(attempts[-1].submission_id, SubmissionState.SUCCEEDED)
    submission_id = base if not attempts else f"{base}-{len(attempts) + 1}"
    with tempfile.TemporaryDirectory(prefix="actscope-submit-") as folder:
        shutil.copy(job_file, Path(folder) / "job.yaml")
        request = {
            "entrypoint": "actscope run job.yaml",
            "submission_id": submission_id,
            "runtime_env": {"working_dir": folder, "env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
            "metadata": {"store": spec.store, "actscope_job": Path(job_file).name},
        }
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                client.submit_job(**request)
                break
            except RuntimeError as err:
                # A head that has just started answers before its job agent is up.
                if "try again later" in str(err) and time.monotonic() < deadline:
                    time.sleep(1)
                    continue
                raise SubmitError(f"the cluster at {address} refused the job: {str(err).splitlines()[0]}") from None
    return Submission(submission_id, SubmissionState.SUBMITTED)


def _status(job) -> str:
    return getattr(job.status, "name", None) or str(job.status)


def resolve(target: str, address: str) -> str:
    """A submission id, or the latest attempt of a job file's submission."""
    if not Path(target).is_file():
        return target
    from actscope.jobs.jobfile import load_job

    attempts = _attempts(_client(address), submission_base(load_job(target)))
    if not attempts:
        raise SubmitError(f"{target} has not been submitted to {address}.")
    return attempts[-1].submission_id


def status(target: str, address: str) -> dict:
    client = _client(address)
    submission_id = resolve(target, address)
    try:
        info = client.get_job_info(submission_id)
    except RuntimeError:
        raise SubmitError(f"no job {submission_id} on {address}.") from None
    return {"submission_id": submission_id, "status": _status(info), "message": info.message or "",
            "store": (info.metadata or {}).get("store", "")}


def logs(target: str, address: str) -> str:
    return _client(address).get_job_logs(resolve(target, address))


def follow(target: str, address: str):
    """Yield log text as the job writes it, until it ends."""
    import asyncio

    client = _client(address)
    submission_id = resolve(target, address)
    queue: list[str] = []

    async def tail():
        async for lines in client.tail_job_logs(submission_id):
            queue.append(lines)

    loop = asyncio.new_event_loop()
    task = loop.create_task(tail())
    while not task.done():
        loop.run_until_complete(asyncio.wait([task], timeout=0.5))
        while queue:
            yield queue.pop(0)
    yield from queue
    loop.close()
