"""Where a store is: local paths and URLs, and the fsspec filesystem of each (imported by the
store and by its lease, which must not import the store)."""

from __future__ import annotations

import os
from typing import Any

import fsspec

# Object stores whose fsspec filesystem caches directory listings. Workers on other machines
# commit shards while the driver watches, so the driver must list afresh every time.
_LISTING_CACHES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


def local_path(url: str) -> str | None:
    """The local file system path of ``url`` (a plain path, ``~`` expanded, or a ``file://``
    URL), else None."""
    if url.startswith("file://"):
        return url[len("file://") :] or "/"
    return None if "://" in url else os.path.expanduser(url)


def storage_options(url: str) -> dict[str, Any] | None:
    """fsspec options for ``url``; credentials are never here: each filesystem reads them from
    its usual environment (AWS_* variables, ~/.aws, GOOGLE_APPLICATION_CREDENTIALS, ...)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return {"use_listings_cache": False} if protocol in _LISTING_CACHES else None


def filesystem(url: str):
    """(fsspec filesystem, path) of ``url``, with ``storage_options``."""
    return fsspec.core.url_to_fs(url, **(storage_options(url) or {}))
