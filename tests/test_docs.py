"""The README and its reference pages document every job field, every command and every table
column; the README's links lead somewhere, and its Python block runs as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from actscope.jobs.cli import app
from actscope.storage.spec import DatasetSpec, JobSpec

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
#: The README and the reference pages it links to: every field, command and column is in one of them.
DOCS = README + "".join(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))


def _spec_fields():
    from actscope.storage.spec import CoactivationSpec, SAESpec

    for prefix, model in (("", JobSpec), ("dataset.", DatasetSpec), ("saes[].", SAESpec), ("coactivation.", CoactivationSpec)):
        for name, field in model.model_fields.items():
            if name != "dataset":
                yield f"{prefix}{name}", field.description


@pytest.mark.parametrize("field, description", list(_spec_fields()), ids=[field for field, _ in _spec_fields()])
def test_every_job_field_is_documented_in_the_specs_words(field, description):
    """docs/job-file.md's table says of each field what its ``Field(description=...)`` says (the
    words the spec gives everywhere else: its JSON schema, its errors)."""
    import re

    rows = dict(re.findall(r"^\| `([^`]+)` \| .*? \| (.*) \|$", (ROOT / "docs" / "job-file.md").read_text(), re.MULTILINE))
    assert rows.get(field, "").replace("\\|", "|") == description


@pytest.mark.parametrize("command", [c.name or c.callback.__name__ for c in app.registered_commands])
def test_every_command_is_documented(command):
    assert f"`actscope {command}" in README


def test_the_minimal_job_in_the_readme_is_valid():
    import yaml

    block = README.split("## Your own job\n", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
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


def test_the_readmes_links_lead_to_files():
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"



def test_ci_runs_exactly_the_readmes_test_command():
    commands = [block.split("```", 1)[0].strip() for block in README.split("## Two commands", 1)[1].split("```bash\n")[1:3]]
    assert commands[1].endswith("python -m pytest -n 2 --dist loadfile") and commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
