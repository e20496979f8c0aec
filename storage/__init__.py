"""The store: a Zarr v3 group holding a job's spec, tokens, dense activations, per-shard partial
statistics and the Parquet index. The bottom layer: it imports nothing else of actscope."""

from actscope.storage.errors import (
    ActscopeError,
    CorpusError,
    JobSpecError,
    ModelError,
    OutputError,
    QueryError,
    StoreError,
)
from actscope.storage.spec import DatasetSpec, JobSpec
from actscope.storage.store import Store

__all__ = [
    "ActscopeError",
    "CorpusError",
    "DatasetSpec",
    "JobSpec",
    "JobSpecError",
    "ModelError",
    "OutputError",
    "QueryError",
    "Store",
    "StoreError",
]
