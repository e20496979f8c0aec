"""actscope: activation caching and exact per-unit statistics for TransformerLens models,
queryable with SQL.

The public API, for notebooks and scripts::

    import actscope

    spec = actscope.load_job("runs/demo/job.yaml")      # a validated JobSpec (or JobSpecError)
    summary = actscope.run(spec)                         # runs or resumes the job; a RunSummary
    with actscope.connect(spec.store) as catalog:        # read-only, locked-down SQL
        catalog.top("blocks.5.mlp.hook_post", 1302, k=10)

The subpackages keep the layers apart: ``actscope.storage`` (the store, the spec, the errors;
imports nothing else of actscope), ``actscope.pipeline`` (tokenize, forward, reduce),
``actscope.queries`` (SQL, pages, exports) and ``actscope.jobs`` (job files, the runner, the CLI).
``run`` and ``connect`` import their layers when called, so ``import actscope`` stays light (no
torch, no Ray).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from actscope.storage.errors import (
    ActscopeError,
    CorpusError,
    JobSpecError,
    ModelError,
    OutputError,
    QueryError,
    StoreError,
)
from actscope.storage.spec import DatasetSpec, JobSpec

if TYPE_CHECKING:
    from actscope.jobs.runner import RunSummary
    from actscope.queries.catalog import Catalog

__version__ = "0.1.0"


def load_job(path: str | Path, **overrides) -> JobSpec:
    """Read and validate a job file (YAML); ``overrides`` replace top-level fields, e.g.
    ``workers=2``. A malformed file raises :class:`JobSpecError` naming the field and why."""
    from actscope.jobs.jobfile import load_job as _load

    return _load(path, **overrides)


def run(job: JobSpec | str | Path, **options) -> RunSummary:
    """Run (or resume) a job to completion: a :class:`JobSpec` or the path of a job file.
    ``options`` are :func:`actscope.jobs.runner.run_job`'s: ``address`` (a Ray cluster),
    ``workers``, ``overwrite``, ``threads``, ``reporter``."""
    from actscope.jobs.runner import run_job

    if isinstance(job, JobSpec):
        return run_job(job, **options)
    return run_job(load_job(job), job_path=str(job), **options)


def connect(store: str | Path, *, timeout: float = 60.0, max_rows: int = 100_000) -> Catalog:
    """A read-only, locked-down SQL catalog over a finished store: a local path or any fsspec
    URL (``s3://``, ``gs://``, ``file://``). ``timeout`` (seconds) and ``max_rows`` bound every
    query, as the CLI's options do."""
    from actscope.queries import connect as _connect

    return _connect(str(store), timeout=timeout, max_rows=max_rows)


__all__ = [
    "ActscopeError",
    "CorpusError",
    "DatasetSpec",
    "JobSpec",
    "JobSpecError",
    "ModelError",
    "OutputError",
    "QueryError",
    "StoreError",
    "connect",
    "load_job",
    "run",
]
