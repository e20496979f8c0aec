"""A job's fingerprint: what its results depend on, hashed.

The result-determining spec fields, the model's files (weights, config, tokenizer) and the
corpus's files. Two runs with the same fingerprint produce the same tables, so a run may resume a
store only when the fingerprints agree. Hub models and datasets are identified by id and
revision (the files are not on this machine to hash).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from actscope.storage.spec import JobSpec

_SAMPLE = 1 << 20  # bytes hashed from each end of a large file
_SMALL = 16 << 20  # files up to this size are hashed whole


def _hash_file(path: str, digest) -> None:
    size = os.path.getsize(path)
    digest.update(f"{os.path.basename(path)}:{size}:".encode())
    with open(path, "rb") as f:
        if size <= _SMALL:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        else:
            # Weights files: both ends and the size identify a checkpoint in practice, and
            # hashing gigabytes on every run would cost more than the job's start-up.
            digest.update(f.read(_SAMPLE))
            f.seek(size - _SAMPLE)
            digest.update(f.read(_SAMPLE))


def _hash_tree(path: str, digest) -> None:
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            _hash_file(os.path.join(root, name), digest)


def data_files(spec: JobSpec) -> list[str]:
    """The corpus's local files, in a stable order (globs expanded)."""
    found = []
    for pattern in spec.dataset.data_files or []:
        found.extend(sorted(glob.glob(pattern, recursive=True)) or [pattern])
    return found


def fingerprint(spec: JobSpec) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps(spec.result_fields(), sort_keys=True).encode())
    if os.path.isdir(spec.model):
        _hash_tree(spec.model, digest)
    for path in data_files(spec):
        if os.path.isfile(path):
            _hash_file(path, digest)
    for sae in spec.saes:  # an SAE's weights decide its latents as the model's decide the neurons
        if os.path.isdir(sae.path):
            _hash_tree(sae.path, digest)
    return digest.hexdigest()[:32]
