"""SQL and reports over a finished store. ``actscope.connect(store)`` (or this module's ``connect``) is the entry point."""

from actscope.queries.catalog import Catalog, Result


def connect(store_url: str, *, timeout: float = 60.0, max_rows: int = 100_000) -> Catalog:
    """A read-only, locked-down SQL catalog over the store's tables; ``timeout`` and
    ``max_rows`` bound every query (as the CLI's options do)."""
    return Catalog(store_url, timeout=timeout, max_rows=max_rows)


__all__ = ["Catalog", "Result", "connect"]
