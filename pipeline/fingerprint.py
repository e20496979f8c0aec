"""A job's fingerprint: what its results depend on, hashed.

The result-determining spec fields and every byte of the model's files (weights, config,
tokenizer), the SAEs' files and the corpus's files. Two runs with the same fingerprint produce the
same tables, so a run may resume a store only when the fingerprints agree. Hub models and datasets
are identified by id and revision (the files are not on this machine to hash).

Files are hashed whole with xxh3 (17 GB/s in memory here: about a second for 16 GB of weights,
whatever the disk adds): a model changed in place at the same size (a fine-tune saved over its
checkpoint) is always seen. A file's digest is cached under ``$XDG_CACHE_HOME/actscope`` keyed on
its path, size, inode and modification and change times, so repeat plans read nothing again.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile

import xxhash

from actscope.storage.spec import JobSpec


def _cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "actscope", "file-digests.json")


class _DigestCache:
    """File digests keyed on what changes whenever a file's bytes do (the change time cannot be
    set by a program, unlike the modification time)."""

    LIMIT = 100_000  # entries kept; the oldest go first

    def __init__(self):
        self.path = _cache_path()
        try:
            with open(self.path) as f:
                self.entries = json.load(f)
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}
        self.changed = False

    @staticmethod
    def key(path: str) -> str:
        st = os.stat(path)
        return f"{os.path.realpath(path)}|{st.st_size}|{st.st_dev}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"

    def digest(self, path: str) -> str:
        key = self.key(path)
        found = self.entries.get(key)
        if found is None:
            digest = xxhash.xxh3_128()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(8 << 20), b""):
                    digest.update(block)
            found = self.entries[key] = digest.hexdigest()
            self.changed = True
        return found

    def save(self) -> None:
        """Written whole to a temporary name and renamed: runs at once never see half of it."""
        if not self.changed:
            return
        entries = dict(list(self.entries.items())[-self.LIMIT :])
        with contextlib.suppress(OSError):  # a cache that cannot be written only costs time
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=".file-digests-")
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, self.path)


def _tree(path: str) -> list[str]:
    files = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        files.extend(os.path.join(root, name) for name in sorted(names))
    return files


def data_files(spec: JobSpec) -> list[str]:
    """The corpus's local files, in a stable order (globs expanded)."""
    found = []
    for pattern in spec.dataset.data_files or []:
        found.extend(sorted(glob.glob(pattern, recursive=True)) or [pattern])
    return found


#: Corpus files named one by one in a store's record; more are recorded as one digest.
CORPUS_NAMED = 64


def sources(spec: JobSpec) -> dict[str, str]:
    """A digest of every local file the results depend on, by what it is: ``model/FILE``,
    ``sae/NAME/FILE``, ``corpus/FILE`` (paths relative to their folder, or as given): what a
    refusal to resume names when one changed."""
    cache = _DigestCache()
    out = {}
    if os.path.isdir(spec.model):
        for path in _tree(spec.model):
            out[f"model/{os.path.relpath(path, spec.model)}"] = cache.digest(path)
    for sae in spec.saes:  # an SAE's weights decide its latents as the model's decide the neurons
        if os.path.isdir(sae.path):
            for path in _tree(sae.path):
                out[f"sae/{sae.name}/{os.path.relpath(path, sae.path)}"] = cache.digest(path)
    corpus = {f"corpus/{path}": cache.digest(path) for path in data_files(spec) if os.path.isfile(path)}
    if len(corpus) > CORPUS_NAMED:  # the record stays small: a large corpus is one entry
        whole = hashlib.sha256(json.dumps(corpus, sort_keys=True).encode()).hexdigest()[:32]
        corpus = {f"corpus ({len(corpus):,} files)": whole}
    cache.save()
    return out | corpus


def fingerprint(spec: JobSpec, files: dict[str, str]) -> str:
    """The job's fingerprint from its result fields and its files' digests (``sources``)."""
    digest = hashlib.sha256()
    digest.update(json.dumps(spec.result_fields(), sort_keys=True).encode())
    for name in sorted(files):
        digest.update(f"{name}:{files[name]};".encode())
    return digest.hexdigest()[:32]


def changed_sources(old: dict[str, str] | None, new: dict[str, str]) -> list[str]:
    """The files that differ between two ``sources`` records (added, removed or changed)."""
    if old is None:
        return []
    return sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
