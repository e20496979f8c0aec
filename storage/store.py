"""The store: one Zarr v3 group per job.

```
<store>/
  zarr.json         attrs: schema_version, spec, fingerprint, model, status
  tokens            int32 [n_seq, ctx]    token ids
  doc_ids           int64 [n_seq, ctx]    document each token came from
  doc_pos           int32 [n_seq, ctx]    the token's index within its document
  kinds             uint8 [n_seq, ctx]    TEXT, SPECIAL (BOS/EOS/CLS/SEP) or PAD
  acts/<hook>       f16 [n_seq, ctx, width]  for the hooks stored densely
  latents/<sae>/<shard>/  an SAE named in ``dense``, stored sparse, one group per shard: its
                    tokens' latents as CSR rows (``indptr`` int64 [tokens + 1], ``index`` int32
                    latent ids, ``value`` f16), token t of the shard being position t of its
                    sequences flattened; ``scipy.sparse.csr_matrix((value, index, indptr))``
  shards/<id>/      one group of shards' partial statistics (named by its first shard); its
                    attrs' commit record is written last
  coactivation/     the merged co-moments and co-firing counts (once the reduce has merged them,
                    the groups' copies are dropped)
  index/*.parquet   the tables (``storage.tables``)
  index/parts/<part>/*.parquet  the reduce's parts of the tables, while it runs
```
All arrays are chunked by shard along the sequence axis, so a shard's worker owns its chunks.
A shard is trusted only once its commit record exists; the job is complete only once
``status.complete`` is set, after the index is written.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import posixpath
import shutil
import warnings
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
import xxhash
import zarr
import zarr.errors

from actscope.storage import coarrays
from actscope.storage.errors import StoreDamaged, StoreError, first_line, short
from actscope.storage.lease import Fence
from actscope.storage.record import ModelRecord, StoreStatus
from actscope.storage.spec import JobSpec
from actscope.storage.urls import filesystem, local_path, storage_options

SCHEMA_VERSION = 2  # 2: commit records carry checksums of what they commit

#: The co-activation partials' pseudo-hook (hook names all contain "hook").
COACTIVATION = "coactivation"

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


def _zarr_url(url: str) -> str:
    """What zarr is given: local paths as paths (zarr's local store creates folders; fsspec's
    ``file://`` filesystem does not), other URLs as they are."""
    path = local_path(url)
    return path if path is not None else url


def _open_group(url: str, mode: str) -> zarr.Group | None:
    """The Zarr group at ``url``, or None where there is none. A damaged one (unparsable
    metadata) or an unreachable store is a StoreError, not a traceback."""
    try:
        return zarr.open_group(store=_zarr_url(url), mode=mode, storage_options=storage_options(url))
    except (FileNotFoundError, NotADirectoryError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, zarr.errors.MetadataValidationError, KeyError, TypeError, ValueError) as err:
        raise StoreDamaged(f"{url}: its zarr.json is damaged and cannot be read ({first_line(err)}).") from None
    except PermissionError as err:
        raise StoreError(f"{url}: permission denied ({first_line(err)}).") from None
    except Exception as err:  # noqa: BLE001 - fsspec back ends raise their own errors (connection refused, auth, ...)
        raise StoreDamaged(f"{url}: cannot reach the store ({type(err).__name__}: {first_line(err)}).") from None


class Target(StrEnum):
    """What ``inspect_target`` finds at a store's path."""

    ABSENT = "absent"  # nothing, or an empty folder
    STORE = "store"  # an actscope store


def inspect_target(url: str) -> Target:
    """What is at ``url``: ``Target.ABSENT`` (nothing, or an empty folder), ``Target.STORE`` (an
    actscope store). Anything else is refused with a StoreError: actscope creates stores only
    where nothing is, and replaces only its own."""
    path = local_path(url)
    if path is not None:
        if os.path.islink(path) and not os.path.exists(path):
            raise StoreError(f"store: {url} is a symbolic link to nothing ({os.readlink(path)}); give a real path.")
        if not os.path.lexists(path):
            return Target.ABSENT
        if not os.path.isdir(path):
            raise StoreError(f"store: {url} is a file, not a store; actscope creates stores only where nothing is.")
        try:
            entries = sorted(os.listdir(path))
        except OSError as err:
            raise StoreError(f"store: cannot read {url} ({first_line(err)}).") from None
    else:
        try:
            fs, root = filesystem(url)
            if not fs.exists(root):
                return Target.ABSENT
            if not fs.isdir(root):
                raise StoreError(f"store: {url} is a file, not a store; actscope creates stores only where nothing is.")
            entries = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
        except StoreError:
            raise
        except Exception as err:  # noqa: BLE001 - each fsspec back end raises its own errors
            raise StoreDamaged(f"store: cannot reach {url} ({type(err).__name__}: {first_line(err)}).") from None
    if not entries:
        return Target.ABSENT
    group = _open_group(url, "r") if "zarr.json" in entries else None
    if group is not None and "schema_version" in group.attrs:
        return Target.STORE
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise StoreError(
        f"store: {url} is not an actscope store and not empty ({len(entries)} entries: {shown}). "
        "actscope creates stores only where nothing is and never touches other files: give a new path or an empty folder."
    )


def shard_key(shard: int) -> str:
    return f"{shard:06d}"


class Store:
    """A job's Zarr group, with the few operations the pipeline and the queries need.

    ``fence``: the lease of the run that writes it (``storage.lease``); every commit checks it
    first, so a writer that lost the store to another run commits nothing more."""

    def __init__(self, url: str, group: zarr.Group, fence: Fence | None = None):
        self.url = url
        self.group = group
        self.fence = fence

    def _fenced(self) -> None:
        if self.fence is not None:
            self.fence.check()

    # -- opening and creating -------------------------------------------------------------

    @classmethod
    def open(cls, url: str, *, writable: bool = False, fence: Fence | None = None) -> Store:
        """Open an existing actscope store, or explain why ``url`` is not one; a writer passes
        its lease's ``fence``."""
        group = _open_group(url, "r+" if writable else "r")
        if group is None:
            raise StoreError(f"No actscope store at {url}. Run a job first: actscope run JOB.yaml")
        attrs = group.attrs
        if "schema_version" not in attrs:
            raise StoreError(f"{url} is a Zarr group but not an actscope store (no schema_version).")
        if attrs["schema_version"] != SCHEMA_VERSION:
            raise StoreError(
                f"{url} has store schema {short(attrs['schema_version'])}; this actscope reads "
                f"schema {SCHEMA_VERSION}. Re-run the job into a new store, or with --overwrite to replace it."
            )
        missing = [key for key in ("spec", "fingerprint", "model", "status") if key not in attrs]
        if missing or not all(isinstance(attrs[k], dict) for k in ("spec", "model", "status")):
            what = f"lacks {', '.join(missing)}" if missing else "has attributes of the wrong types"
            raise StoreDamaged(f"{url} is damaged: its zarr.json {what}. Run the job again into a new store.")
        return cls(url, group, fence)

    @classmethod
    def exists(cls, url: str) -> bool:
        """Whether a Zarr group (an actscope store or not) is at ``url``."""
        return _open_group(url, "r") is not None

    @classmethod
    def create(cls, url: str, *, spec: JobSpec, fingerprint: str, model: ModelRecord | Mapping[str, Any], fence: Fence | None = None) -> Store:
        """Create a fresh store where nothing is (no path, or an empty folder). Never deletes:
        replacing a store is ``remove`` first, by a caller that has checked it may."""
        if inspect_target(url) != Target.ABSENT:
            raise StoreError(f"{url} is not empty: a new store is created only where nothing is.")
        # The attributes go in with the group's own metadata, in one write: a run killed here leaves
        # either no store or a whole (empty) one, never a group that is not yet an actscope store.
        attributes = {
            "schema_version": SCHEMA_VERSION,
            "spec": spec.to_dict(),
            "fingerprint": fingerprint,
            "model": ModelRecord.from_attrs(model).to_attrs(),
            "status": StoreStatus().to_attrs(),
        }
        try:
            group = zarr.open_group(store=_zarr_url(url), mode="w-", attributes=attributes, storage_options=storage_options(url))
        except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
            raise StoreError(f"{url} is not empty: a new store is created only where nothing is.") from None
        group.require_group("shards")
        group.require_group("acts")
        return cls(url, group, fence)

    @classmethod
    def remove(cls, url: str) -> None:
        """Delete the actscope store at ``url`` (of any schema version), and nothing that is not one."""
        if inspect_target(url) != Target.STORE:  # refuses anything that is neither nothing nor a store
            return
        path = local_path(url)
        if path is not None:
            shutil.rmtree(path)
            return

        fs, root = filesystem(url)
        fs.rm(root, recursive=True)

    def refuse_links(self) -> None:
        """Refuse a local store that holds a symbolic link anywhere inside it: actscope never
        makes one, and writing or deleting through it would reach files that are not the store's
        (a link planted at ``index/`` once had the tables written into a user's folder)."""
        root = local_path(self.url)
        if root is None:  # object stores have no links
            return
        folders = [root]
        while folders:
            with os.scandir(folders.pop()) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        raise StoreDamaged(
                            f"{self.url}: {os.path.relpath(entry.path, root)} is a symbolic link (to {os.readlink(entry.path)}); "
                            f"actscope never writes or deletes through a link in a store. Remove the link (rm '{entry.path}'), "
                            "or run the job into a new store."
                        )
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)

    # -- attributes -----------------------------------------------------------------------

    @property
    def spec(self) -> JobSpec:
        return JobSpec.from_dict(self.group.attrs["spec"], source=f"{self.url} (stored spec)")

    @property
    def fingerprint(self) -> str:
        return self.group.attrs["fingerprint"]

    @property
    def model(self) -> ModelRecord:
        return ModelRecord.from_attrs(self.group.attrs["model"])

    @property
    def status(self) -> StoreStatus:
        return StoreStatus.from_attrs(self.group.attrs["status"])

    def update_status(self, **changes: Any) -> None:
        self._fenced()
        self.group.attrs["status"] = dataclasses.replace(self.status, **changes).to_attrs()

    @property
    def n_seq(self) -> int:
        return int(self.status.n_seq)

    @property
    def n_shards(self) -> int:
        size = self.spec.shard_size
        return (self.n_seq + size - 1) // size

    def shard_range(self, shard: int) -> tuple[int, int]:
        size = self.spec.shard_size
        return shard * size, min((shard + 1) * size, self.n_seq)

    # -- accumulation groups: the unit of work, commit and retry --------------------------
    #
    # A group is a fixed run of consecutive shards (the plan sizes it so that the partial state
    # written per group is about 1 KB per corpus token at most). A worker runs a group's shards
    # in order into one set of accumulators and commits them once; shards stay the unit of the
    # token and dense arrays' chunks. Groups are fixed by the plan, so the results do not depend
    # on how many workers ran them or which were retried.

    @property
    def shards_per_group(self) -> int:
        return int(self.status.shards_per_group or 1)  # decided once the corpus is tokenized

    @property
    def n_groups(self) -> int:
        size = self.shards_per_group
        return (self.n_shards + size - 1) // size

    def group_shards(self, group: int) -> range:
        size = self.shards_per_group
        return range(group * size, min((group + 1) * size, self.n_shards))

    def group_range(self, group: int) -> tuple[int, int]:
        shards = self.group_shards(group)
        return self.shard_range(shards[0])[0], self.shard_range(shards[-1])[1]

    def _group_path(self, group: int) -> str:
        return f"shards/{shard_key(group * self.shards_per_group)}"  # named by its first shard

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
                dimension_names=("seq", "pos"),
                overwrite=True,
            )

    def append_tokens(self, block: Mapping[str, np.ndarray]) -> None:
        for name in self.TOKEN_ARRAYS:
            self.group[name].append(block[name], axis=0)

    def read_tokens(self, start: int, stop: int, names: tuple[str, ...] = ("tokens", "kinds")) -> dict[str, np.ndarray]:
        return {name: read_checked(self.group[name], (slice(start, stop),)) for name in names}

    def read_rows(self, seqs: list[int], names: tuple[str, ...] = ("tokens", "kinds")) -> dict[str, np.ndarray]:
        """Whole sequences ``seqs`` (sorted), each array read once for all of them."""
        rows = np.asarray(seqs, dtype=np.int64)
        return {name: read_checked(self.group[name], (rows, slice(None)), orthogonal=True) for name in names}

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
            # Named, so that xarray.open_zarr(store, group="acts") reads them as they are.
            dimension_names=("seq", "pos", "neuron"),
            overwrite=True,
        )

    def dense(self, hook: str) -> zarr.Array:
        return self.group[f"acts/{hook}"]

    def write_latents(self, name: str, shard: int, rows: dict[str, np.ndarray]) -> None:
        """One shard's latents of SAE ``name``, as CSR rows (``indptr``, ``index``, ``value``);
        the same bytes whenever the shard is written again."""
        group = self.group.require_group(f"latents/{name}/{shard_key(shard)}")
        for key, array in rows.items():
            group.create_array(key, shape=array.shape, dtype=array.dtype, chunks=(max(len(array), 1),), compressors=_ZSTD, overwrite=True)[...] = array

    def read_latents(self, name: str, shard: int) -> dict[str, np.ndarray]:
        """One shard's stored latents of SAE ``name``: ``indptr``, ``index``, ``value``."""
        group = self.group[f"latents/{name}/{shard_key(shard)}"]
        return {key: group[key][...] for key in ("indptr", "index", "value")}

    # -- per-shard partial statistics -----------------------------------------------------

    def write_partial(self, group: int, arrays: Mapping[str, Mapping[str, np.ndarray]], record: Mapping[str, Any]) -> None:
        """Write one group's partial statistics, then its commit record (last, atomically)."""
        _write_committed(self.group.require_group(self._group_path(group)), arrays, record, self._fenced)

    def is_committed(self, group: int) -> bool:
        try:
            return bool(self.group[self._group_path(group)].attrs.get("committed"))
        except KeyError:
            return False

    def committed_groups(self) -> set[int]:
        if "shards" not in self.group:  # a run killed while it created the store
            return set()
        size, shards = self.shards_per_group, self.group["shards"]
        with _leftovers_ignored():
            return {int(key) // size for key, sub in shards.groups() if sub.attrs.get("committed") and int(key) % size == 0}

    def committed_shards(self) -> set[int]:
        """The shards of the committed groups."""
        return {shard for group in self.committed_groups() for shard in self.group_shards(group)}

    def read_partial(self, group: int, hook: str) -> dict[str, np.ndarray]:
        """One hook's committed partials of ``group``, checked against the commit record."""
        where = self._group_path(group)
        try:
            group = self.group[f"{where}/{hook}"]
            with _leftovers_ignored():
                arrays = {name: array[...] for name, array in group.arrays()}
        except Exception:  # noqa: BLE001 - committed bytes that do not even decode are damaged
            raise DamagedPartial(f"{where}/{hook}") from None
        return _verified(arrays, self.group[where].attrs, hook, f"{where}/{hook}")

    def uncommit(self, group: int) -> None:
        """Drop a group's commit record (its partials are redone by the next run)."""
        attrs = self.group[self._group_path(group)].attrs
        attrs.update({"committed": False, "checksums": {}})

    def shard_record(self, group: int) -> dict[str, Any]:
        return dict(self.group[self._group_path(group)].attrs)

    def sae_quality(self) -> dict[str, dict[str, float]]:
        """Each SAE's L0 (non-zero latents a token) and fraction of variance unexplained, over
        the first batch of every committed group (``fvu`` absent where unmeasured: a transcoder
        whose output hook is not recorded), with the ``tokens`` and ``groups`` measured."""
        sums: dict[str, dict[str, float]] = {}
        for group in sorted(self.committed_groups()):
            for name, measured in self.shard_record(group).get("saes", {}).items():
                total = sums.setdefault(name, {"groups": 0})
                total["groups"] += 1
                for key, value in measured.items():
                    total[key] = total.get(key, 0.0) + value
        out = {}
        for name, total in sums.items():
            out[name] = {"tokens": int(total.get("tokens", 0)), "groups": total["groups"]}
            if total.get("tokens"):
                out[name]["l0"] = total["active"] / total["tokens"]
            if total.get("sst"):
                out[name]["fvu"] = total["sse"] / total["sst"]
        return out

    # -- logit effects (from the weights, once per job) -----------------------------------

    def write_logits(self, arrays: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        _write_committed(self.group.require_group("logits"), arrays, {"hooks": sorted(arrays)}, self._fenced)

    def has_logits(self) -> bool:
        return "logits" in self.group and bool(self.group["logits"].attrs.get("committed"))

    def read_logits(self, hooks: list[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
        """The logit effects of ``hooks`` (default: every hook that has them)."""
        if not self.has_logits():
            return {}
        group = self.group["logits"]
        return {
            hook: _verified({name: a[...] for name, a in group[hook].arrays()}, group.attrs, hook, f"logits/{hook}")
            for hook in group.attrs["hooks"] if hooks is None or hook in hooks
        }

    # -- co-activation, merged by the reduce --------------------------------------------

    def has_merged_coactivation(self) -> bool:
        return COACTIVATION in self.group and bool(self.group[COACTIVATION].attrs.get("committed"))

    def coactivation_partials(self) -> list[PartialArrays]:
        """The co-activation partials to merge, in group order; once merged, the merged one
        alone (shaped as one group's partial)."""
        if self.has_merged_coactivation():
            return [PartialArrays(self.group[COACTIVATION])]
        return [PartialArrays(self.group[f"{self._group_path(g)}/{COACTIVATION}"]) for g in range(self.n_groups)]

    def merged_coactivation(self) -> PartialArrays | None:
        """The merged co-activation group once the reduce has prepared it, else None."""
        if COACTIVATION in self.group and self.group[COACTIVATION].attrs.get("prepared"):
            return PartialArrays(self.group[COACTIVATION])
        return None

    def prepare_merged_coactivation(self, vectors: Mapping[str, np.ndarray], matrices: Mapping[str, tuple[tuple[int, int], str]]) -> None:
        """Create the merged group: ``vectors`` written whole, ``matrices`` ({name: (shape,
        dtype)}) empty, to be filled a block of rows at a time. Done once: a prepared group is
        kept, with whatever rows a stopped reduce had written (they are written again)."""
        if self.merged_coactivation() is not None:
            return
        group = self.group.require_group(COACTIVATION)
        for name, value in vectors.items():
            group.create_array(name, data=np.ascontiguousarray(value), overwrite=True)
        for name, (shape, dtype) in matrices.items():
            chunks = tuple(min(d, 512) for d in shape)
            group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=partial_compressors(name), overwrite=True)
        group.attrs["prepared"] = True

    def write_merged_coactivation(self, name: str, rows: slice, value: np.ndarray) -> None:
        """Rows of a merged matrix (blocks of 512 rows: each block is its own chunks, so parts
        write theirs concurrently)."""
        self.group[f"{COACTIVATION}/{name}"][rows, :] = value

    def commit_merged_coactivation(self) -> None:
        """Mark the merged co-activation complete, then drop the groups' copies (N x N each): the
        store keeps one, not one per group."""
        self._fenced()
        self.group[COACTIVATION].attrs["committed"] = True
        for g in range(self.n_groups):
            where = self._group_path(g)
            if where not in self.group:
                continue
            sub = self.group[where]
            if COACTIVATION in sub:
                del sub[COACTIVATION]
                checksums = dict(sub.attrs.get("checksums") or {})
                if checksums.pop(COACTIVATION, None) is not None:  # the record names what the group holds
                    sub.attrs["checksums"] = checksums

    def reset_reduce(self) -> None:
        """Forget an unfinished reduce (its parts, an uncommitted merged co-activation): the
        groups it merged have changed."""
        self.clear_parts()
        if COACTIVATION in self.group and not self.group[COACTIVATION].attrs.get("committed"):
            del self.group[COACTIVATION]

    # -- the reduce's parts ---------------------------------------------------------------

    def part_url(self, part: str, table: str) -> str:
        return _join(self.index_url, "parts", part, f"{table}.parquet")

    def part_done(self, part: str) -> bool:
        fs, path = filesystem(_join(self.index_url, "parts", part, "DONE"))
        return fs.exists(path)

    def mark_part_done(self, part: str) -> None:
        """Written after every table of the part: a part with this file is not run again."""
        self._fenced()
        fs, path = filesystem(_join(self.index_url, "parts", part, "DONE"))
        fs.makedirs(fs._parent(path), exist_ok=True)
        with fs.open(path, "wb") as f:
            f.write(b"done\n")

    def clear_parts(self) -> None:
        """Drop the reduce's parts (stale once a group is redone; spent once the tables exist)."""
        fs, path = filesystem(_join(self.index_url, "parts"))
        if fs.exists(path):
            fs.rm(path, recursive=True)

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


def read_checked(array: zarr.Array, selection: tuple, *, orthogonal: bool = False) -> np.ndarray:
    """``array[selection]`` (``orthogonal``: an index array on the first axis); a chunk whose bytes
    cannot be decoded (damaged on disk, a write cut short by a crash) is ``StoreDamaged`` naming
    the array and the chunk, not a codec's error with neither."""
    try:
        return array.get_orthogonal_selection(selection) if orthogonal else array[selection]
    except (RuntimeError, ValueError, TypeError) as err:
        raise StoreDamaged(f"{array.store_path}: {_damaged_chunk(array, selection) or 'a chunk'} cannot be decoded ({first_line(err)}); "
                           "the store is damaged: run the job again into a new store.") from None


def _damaged_chunk(array: zarr.Array, selection: tuple) -> str | None:
    """The first chunk of ``selection``'s rows that does not decode, as ``chunk (i, j, ...)``."""
    rows = selection[0]
    per = array.chunks[0]
    if isinstance(rows, slice):
        first = (rows.start or 0) // per
        chunk_rows = range(first, -(-(rows.stop if rows.stop is not None else array.shape[0]) // per))
    else:
        chunk_rows = sorted({int(r) // per for r in np.asarray(rows).ravel()})
    grid = [range(-(-size // chunk)) for size, chunk in zip(array.shape[1:], array.chunks[1:])]
    for row in chunk_rows:
        for rest in itertools.product(*grid):
            try:
                array.get_block_selection((row, *rest))
            except Exception:  # noqa: BLE001 - the one that fails is the answer
                return f"chunk {(row, *rest)}"
    return None


class PartialArrays:
    """Named arrays of one partial (a group's co-activation, or the merged one), read whole or
    by blocks of rows and columns; Zarr stays behind this class."""

    def __init__(self, group: zarr.Group):
        self._group = group

    def names(self) -> list[str]:
        with _leftovers_ignored():
            return sorted(self._group.array_keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return self._group[name].shape

    def read(self, name: str, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        return self._group[name][rows, cols]

    def read_vector(self, name: str, span: slice = slice(None)) -> np.ndarray:
        return self._group[name][span]

    def read_many(self, names: list[str]) -> dict[str, np.ndarray]:
        """The named arrays, whole, read concurrently (each read is mostly waiting on storage)."""
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="partial-reader") as pool:
            return dict(zip(names, pool.map(lambda name: self._group[name][...], names)))


def _write_committed(group: zarr.Group, arrays: Mapping[str, Mapping[str, np.ndarray]], record: Mapping[str, Any], fenced) -> None:
    """Write ``{hook: {name: array}}`` under ``group``, then, once ``fenced()`` has passed, its
    commit record (last, atomically); a committed group is left as it is."""
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
    # every thread), a shard's partials take about a quarter less time than written in turn.
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="partial-writer") as pool:
        for done in [pool.submit(write, hook, name, value) for hook, stats in arrays.items() for name, value in stats.items()]:
            done.result()
    fenced()
    group.attrs.update({**record, "checksums": {hook: checksum(stats) for hook, stats in arrays.items()}, "committed": True})


def checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """A digest of named arrays (names, dtypes, shapes and bytes), for commit records."""
    digest = xxhash.xxh3_128()  # about 10x sha256's speed: a shard's co-moments are gigabytes at real widths
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
        digest.update(memoryview(value).cast("B"))
    return digest.hexdigest()


def _verified(arrays: dict[str, np.ndarray], record: Mapping[str, Any], hook: str, where: str) -> dict[str, np.ndarray]:
    expected = (record.get("checksums") or {}).get(hook)
    if expected is None or checksum(arrays) != expected:
        raise DamagedPartial(where)
    return arrays


class DamagedPartial(StoreDamaged):
    """Committed partial statistics whose bytes are not those their commit record names."""

    def __init__(self, where: str):
        self.where = where
        self.first_shard = int(where.split("/")[1]) if where.startswith("shards/") else None
        super().__init__(f"{where}: the committed partial statistics do not match their commit record's checksum (changed or damaged after the commit).")


def partial_compressors(name: str):
    """Co-moment matrices (``m2.*``, N x N float32) are stored raw: zstd saves 7 % of their bytes
    and costs a third of a shard's write. Everything else compresses well (counts, NaN-padded
    samples) and goes through zstd."""
    return None if coarrays.is_comoment(name) else _ZSTD


def _partial_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """One chunk for a small array; 512 x 512 tiles for a large matrix (co-activation), so that
    the merge reads one block of rows or columns without reading the rest."""
    if len(shape) == 2 and shape[0] * shape[1] > 2**20:
        return (512, 512)
    return tuple(max(d, 1) for d in shape)
