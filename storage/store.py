"""The store: one Zarr v3 group per job.

```
<store>/
  zarr.json         attrs: schema_version, spec, fingerprint, model, status
  tokens            int32 [n_seq, ctx]    token ids
  doc_ids           int64 [n_seq, ctx]    document each token came from
  doc_pos           int32 [n_seq, ctx]    the token's index within its document
  kinds             uint8 [n_seq, ctx]    TEXT, SPECIAL (BOS/EOS/CLS/SEP) or PAD
  acts/<hook>       f16 [n_seq, ctx, width]  for the hooks stored densely
  shards/<id>/      one shard's partial statistics; its attrs' commit record is written last
  index/*.parquet   the tables, written by the index step
```
All arrays are chunked by shard along the sequence axis, so a shard's worker owns its chunks.
A shard is trusted only once its commit record exists; the job is complete only once
``status.complete`` is set, after the index is written.
"""

from __future__ import annotations

import os
import posixpath
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np
import zarr
import zarr.errors

from storage.errors import StoreError
from storage.spec import JobSpec

SCHEMA_VERSION = 1

# Token kinds, as stored in the `kinds` array.
TEXT, SPECIAL, PAD = 0, 1, 2

_ZSTD = zarr.codecs.ZstdCodec(level=1)
# Dense activations: chunks of one shard's sequences by this many neurons, so reading one neuron
# touches one column of chunks and reading one sequence one row of them.
DENSE_NEURON_CHUNK = 128


def _join(url: str, *parts: str) -> str:
    if "://" in url:
        return posixpath.join(url.rstrip("/"), *parts)
    return os.path.join(url, *parts)


# Object stores whose fsspec filesystem caches directory listings. Workers on other machines
# commit shards while the driver watches, so the driver must list afresh every time.
_LISTING_CACHES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


def storage_options(url: str) -> dict[str, Any] | None:
    """fsspec options for ``url``; credentials are never here: each filesystem reads them from
    its usual environment (AWS_* variables, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ...)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return {"use_listings_cache": False} if protocol in _LISTING_CACHES else None


def shard_key(shard: int) -> str:
    return f"{shard:06d}"


class Store:
    """A job's Zarr group, with the few operations the pipeline and the queries need."""

    def __init__(self, url: str, group: zarr.Group):
        self.url = url
        self.group = group

    # -- opening and creating -------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, writable: bool = False) -> Store:
        """Open an existing actscope store, or explain why ``url`` is not one."""
        try:
            group = zarr.open_group(store=url, mode="r+" if writable else "r", storage_options=storage_options(url))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            raise StoreError(f"No actscope store at {url}. Run a job first: actscope run JOB.yaml") from None
        if "schema_version" not in group.attrs:
            raise StoreError(f"{url} is a Zarr group but not an actscope store (no schema_version).")
        if group.attrs["schema_version"] != SCHEMA_VERSION:
            raise StoreError(
                f"{url} has store schema {group.attrs['schema_version']}; this actscope reads "
                f"schema {SCHEMA_VERSION}. Re-run the job into a new store."
            )
        return cls(url, group)

    @classmethod
    def exists(cls, url: str) -> bool:
        try:
            zarr.open_group(store=url, mode="r", storage_options=storage_options(url))
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            return False
        return True

    @classmethod
    def create(cls, url: str, *, spec: JobSpec, fingerprint: str, model: Mapping[str, Any]) -> Store:
        """Create a fresh store, replacing what is at ``url`` (the caller has checked it may)."""
        # The attributes go in with the group's own metadata, in one write: a run killed here leaves
        # either no store or a whole (empty) one, never a group that is not yet an actscope store.
        attributes = {
            "schema_version": SCHEMA_VERSION,
            "spec": spec.to_dict(),
            "fingerprint": fingerprint,
            "model": dict(model),
            "status": {"tokenized": False, "n_seq": 0, "complete": False},
        }
        group = zarr.open_group(store=url, mode="w", attributes=attributes, storage_options=storage_options(url))
        group.require_group("shards")
        group.require_group("acts")
        return cls(url, group)

    # -- attributes -----------------------------------------------------------------------

    @property
    def spec(self) -> JobSpec:
        return JobSpec.from_dict(self.group.attrs["spec"], source=f"{self.url} (stored spec)")

    @property
    def fingerprint(self) -> str:
        return self.group.attrs["fingerprint"]

    @property
    def model(self) -> dict[str, Any]:
        return dict(self.group.attrs["model"])

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.group.attrs["status"])

    def update_status(self, **changes: Any) -> None:
        self.group.attrs["status"] = {**self.status, **changes}

    @property
    def n_seq(self) -> int:
        return int(self.status["n_seq"])

    @property
    def n_shards(self) -> int:
        size = self.spec.shard_size
        return (self.n_seq + size - 1) // size

    def shard_range(self, shard: int) -> tuple[int, int]:
        size = self.spec.shard_size
        return shard * size, min((shard + 1) * size, self.n_seq)

    # -- tokens ---------------------------------------------------------------------------

    TOKEN_ARRAYS: ClassVar[dict[str, str]] = {"tokens": "int32", "doc_ids": "int64", "doc_pos": "int32", "kinds": "uint8"}

    def reset_token_arrays(self) -> None:
        spec = self.spec
        for name, dtype in self.TOKEN_ARRAYS.items():
            self.group.create_array(
                name,
                shape=(0, spec.context_length),
                dtype=dtype,
                chunks=(spec.shard_size, spec.context_length),
                compressors=_ZSTD,
                fill_value=0,
                overwrite=True,
            )

    def append_tokens(self, block: Mapping[str, np.ndarray]) -> None:
        for name in self.TOKEN_ARRAYS:
            self.group[name].append(block[name], axis=0)

    def read_tokens(self, start: int, stop: int, names: tuple[str, ...] = ("tokens", "kinds")) -> dict[str, np.ndarray]:
        return {name: self.group[name][start:stop] for name in names}

    # -- dense activations ----------------------------------------------------------------

    def create_dense(self, hook: str, width: int, n_seq: int) -> None:
        spec = self.spec
        self.group.create_array(
            f"acts/{hook}",
            shape=(n_seq, spec.context_length, width),
            dtype="float16",
            chunks=(spec.shard_size, spec.context_length, min(width, DENSE_NEURON_CHUNK)),
            compressors=_ZSTD,
            fill_value=0,
            overwrite=True,
        )

    def dense(self, hook: str) -> zarr.Array:
        return self.group[f"acts/{hook}"]

    # -- per-shard partial statistics -----------------------------------------------------

    def write_partial(self, shard: int, arrays: Mapping[str, Mapping[str, np.ndarray]], record: Mapping[str, Any]) -> None:
        """Write one shard's partial statistics, then its commit record (last, atomically)."""
        _write_committed(self.group.require_group("shards").require_group(shard_key(shard)), arrays, record)

    def is_committed(self, shard: int) -> bool:
        try:
            return bool(self.group[f"shards/{shard_key(shard)}"].attrs.get("committed"))
        except KeyError:
            return False

    def committed_shards(self) -> set[int]:
        if "shards" not in self.group:  # a run killed while it created the store
            return set()
        shards = self.group["shards"]
        with _leftovers_ignored():
            return {int(key) for key, sub in shards.groups() if sub.attrs.get("committed")}

    def read_partial(self, shard: int, hook: str) -> dict[str, np.ndarray]:
        group = self.group[f"shards/{shard_key(shard)}/{hook}"]
        with _leftovers_ignored():
            return {name: array[...] for name, array in group.arrays()}

    def shard_record(self, shard: int) -> dict[str, Any]:
        return dict(self.group[f"shards/{shard_key(shard)}"].attrs)

    # -- logit effects (from the weights, once per job) -----------------------------------

    def write_logits(self, arrays: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        _write_committed(self.group.require_group("logits"), arrays, {"hooks": sorted(arrays)})

    def has_logits(self) -> bool:
        return "logits" in self.group and bool(self.group["logits"].attrs.get("committed"))

    def read_logits(self) -> dict[str, dict[str, np.ndarray]]:
        if not self.has_logits():
            return {}
        group = self.group["logits"]
        return {hook: {name: a[...] for name, a in group[hook].arrays()} for hook in group.attrs["hooks"]}

    # -- the index ------------------------------------------------------------------------

    @property
    def index_url(self) -> str:
        return _join(self.url, "index")

    def table_url(self, table: str) -> str:
        return _join(self.index_url, f"{table}.parquet")


@contextmanager
def _leftovers_ignored():
    """Listing a group: a writer killed mid-write leaves a temporary file or a group without
    metadata behind (and a running one has them for a moment). They are not members, and nothing
    to warn a user of."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Object at .* is not recognized", zarr.errors.ZarrUserWarning)
        yield


def _write_committed(group: zarr.Group, arrays: Mapping[str, Mapping[str, np.ndarray]], record: Mapping[str, Any]) -> None:
    """Write ``{hook: {name: array}}`` under ``group``, then its commit record (last,
    atomically); a committed group is left as it is."""
    if group.attrs.get("committed"):
        return

    def write(hook: str, name: str, value: np.ndarray) -> None:
        group.create_array(
            f"{hook}/{name}",
            data=np.ascontiguousarray(value),
            chunks=_partial_chunks(value.shape),
            compressors=partial_compressors(name),
            overwrite=True,
        )

    for hook in arrays:
        group.require_group(hook)
    # A shard writes some 70 arrays, each a few milliseconds of metadata and chunk writes, mostly
    # waiting on the file system or object store. Written concurrently (Zarr's event loop serves
    # every thread), a 4-hook shard's partials with co-activation took 0.23-0.27 s, not 0.27-0.37.
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="partial-writer") as pool:
        for done in [pool.submit(write, hook, name, value) for hook, stats in arrays.items() for name, value in stats.items()]:
            done.result()
    group.attrs.update({**record, "committed": True})


def partial_compressors(name: str):
    """Co-moment matrices (``m2.*``, N x N float32) are stored raw: zstd saves 7 % of their bytes
    and costs a third of a shard's write. Everything else compresses well (counts, NaN-padded
    samples) and goes through zstd."""
    return None if name.startswith("m2.") else _ZSTD


def _partial_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One chunk for a small array; 512 x 512 tiles for a large matrix (co-activation), so that
    the merge reads one block of rows or columns without reading the rest."""
    if len(shape) == 2 and shape[0] * shape[1] > 2**20:
        return (512, 512)
    return tuple(max(d, 1) for d in shape)
