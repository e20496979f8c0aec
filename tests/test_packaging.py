"""The distribution is one package, ``actscope``: the wheel holds nothing else at its top level,
and an installed copy imports from any folder while the layers' folder names do not."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(out)],
        check=True, capture_output=True, text=True,
    )
    (found,) = out.glob("actscope-*.whl")
    return found


def test_the_wheel_holds_only_actscope(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"actscope", wheel.name.split("-py3")[0] + ".dist-info"}
    for layer in ("pipeline", "jobs", "storage", "queries"):
        assert f"actscope/{layer}/__init__.py" in names
    assert "actscope/queries/templates/neuron.html" in names  # the pages' templates travel as package data
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "actscope = actscope.jobs.cli:main" in entry


def test_installed_actscope_imports_anywhere_and_the_old_names_do_not(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin") == ["actscope"]
    # A user's folder with files named like the old top-level packages hides nothing now.
    work = tmp_path / "notebooks"
    (work / "queries").mkdir(parents=True)
    (work / "pipeline.py").write_text("raise SystemExit('the user file was imported')\n")
    code = (
        "import actscope, importlib.util, sys\n"
        "assert actscope.__file__.startswith(sys.argv[1]), actscope.__file__\n"
        "from actscope.queries.report import export\n"
        "print(callable(actscope.connect), callable(actscope.run), callable(actscope.load_job))\n"
        "for name in ('storage', 'jobs'):\n"
        "    assert importlib.util.find_spec(name) is None, name\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True", "True"]
    # `import actscope` stays light: no torch, no Ray until a job runs.
    light = "import actscope, sys; print(sorted({'torch', 'ray', 'transformer_lens'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", light], cwd=work, env=env, capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
