"""The README documents every job field, every command and every table column."""

from __future__ import annotations

from pathlib import Path

import pytest

from actscope.jobs.cli import app
from actscope.storage.spec import DatasetSpec, JobSpec

README = (Path(__file__).parent.parent / "README.md").read_text()


@pytest.mark.parametrize("field", [*JobSpec.model_fields, *(f"dataset.{f}" for f in DatasetSpec.model_fields)])
def test_every_job_field_is_documented(field):
    if field == "dataset":
        return
    assert f"| `{field}` |" in README


@pytest.mark.parametrize("command", [c.name or c.callback.__name__ for c in app.registered_commands])
def test_every_command_is_documented(command):
    assert f"`actscope {command}" in README


def test_the_minimal_job_in_the_readme_is_valid():
    import yaml

    block = README.split("## A job\n\n```yaml\n", 1)[1].split("```", 1)[0]
    spec = JobSpec.from_dict(yaml.safe_load(block))
    assert spec.hooks == ["blocks.0.mlp.hook_post", "blocks.1.hook_resid_post"]


@pytest.mark.slow
def test_the_readme_python_block_runs_as_written_after_the_demo(tmp_path, monkeypatch):
    """The README's Python block, run from a folder where the demo has run (a short one, in
    this process): its paths, hooks and calls are the demo's, so it can never drift again."""
    from actscope.jobs.demo import write_demo_job
    from actscope.jobs.jobfile import load_job
    from actscope.jobs.runner import run_job

    monkeypatch.chdir(tmp_path)
    run_job(load_job(write_demo_job("runs/demo", max_tokens=1000, workers=1)), use_ray=False)
    block = README.split("## Python\n", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md (Python block)", "exec"), namespace)  # noqa: S102 - the README is ours: running it as written is the test
    assert namespace["summary"].resumed and namespace["rows"] and namespace["doc"]["neuron"] == 1302
