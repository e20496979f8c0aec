"""SQL and reports over a finished store. ``queries.connect(store)`` is the entry point."""

from queries.catalog import Catalog, Result


def connect(store_url: str, *, timeout: float = 60.0) -> Catalog:
    """A read-only, locked-down SQL catalog over the store's tables."""
    return Catalog(store_url, timeout=timeout)


__all__ = ["Catalog", "Result", "connect"]
