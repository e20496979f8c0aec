"""Job files: YAML → a validated ``JobSpec``. Paths in the file are relative to the working
directory, as with any command-line tool."""

from __future__ import annotations

from pathlib import Path

import yaml

from storage.errors import JobSpecError
from storage.spec import JobSpec


def load_job(path: str | Path, **overrides) -> JobSpec:
    """Read and validate a job file; ``overrides`` replace top-level fields (e.g. workers)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise JobSpecError(f"{path}: no such job file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise JobSpecError(f"{path}: cannot read the job file: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err)
        raise JobSpecError(f"{path}: malformed YAML{at}: {problem}") from None
    if isinstance(data, dict):
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return JobSpec.from_dict(data, source=str(path))
