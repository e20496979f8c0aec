"""Job files: YAML → a validated ``JobSpec``. Paths in the file are relative to the working
directory, as with any command-line tool."""

from __future__ import annotations

from pathlib import Path

import yaml

from actscope.storage.errors import JobSpecError
from actscope.storage.spec import JobSpec

#: A job file is a few dozen lines; a larger one is refused before it is parsed.
MAX_JOB_BYTES = 1 << 20


class _JobLoader(yaml.SafeLoader):
    """Safe YAML without aliases: a job has no use for them, and nested aliases expand
    exponentially (a "billion laughs" file of 1 kB is gigabytes once expanded)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in a job file; write the value out", event.start_mark
            )
        return super().compose_node(parent, index)


def load_job(path: str | Path, **overrides) -> JobSpec:
    """Read and validate a job file; ``overrides`` replace top-level fields (e.g. workers)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise JobSpecError(f"{path}: is a folder; give the job file (YAML).")
        with path.open("rb") as f:
            raw = f.read(MAX_JOB_BYTES + 1)
        if len(raw) > MAX_JOB_BYTES:
            raise JobSpecError(f"{path}: a job file is at most {MAX_JOB_BYTES:,} bytes; this one is larger.")
        text = raw.decode("utf-8")
    except FileNotFoundError:
        raise JobSpecError(f"{path}: no such job file.") from None
    except UnicodeDecodeError as err:
        raise JobSpecError(f"{path}: the job file is not UTF-8 text (byte {err.start}).") from None
    except OSError as err:
        raise JobSpecError(f"{path}: cannot read the job file: {err.strerror or err}") from None
    try:
        data = yaml.load(text, Loader=_JobLoader)
    except RecursionError:
        raise JobSpecError(f"{path}: malformed YAML: nested too deeply.") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = (getattr(err, "problem", None) or str(err))[:200]
        raise JobSpecError(f"{path}: malformed YAML{at}: {problem}") from None
    if isinstance(data, dict):
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return JobSpec.from_dict(data, source=str(path))
