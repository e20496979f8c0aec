"""The errors actscope raises for a user's mistake.

Library code raises these; only the CLI turns them into messages and exit codes. Each message
says what was wrong and how to fix it. Anything that is not an ``ActscopeError`` is a bug.
"""

from __future__ import annotations


class ActscopeError(Exception):
    """Base class: an error the user can fix. ``str(err)`` is the whole message; the CLI exits
    with ``exit_code``."""

    exit_code = 2


class JobSpecError(ActscopeError):
    """The job file is malformed: bad YAML, an unknown key, a wrong type or an impossible value."""


class ModelError(ActscopeError):
    """The model cannot be loaded, or a hook name does not exist on it."""


class CorpusError(ActscopeError):
    """The corpus cannot be read, or yields no tokens."""


class StoreError(ActscopeError):
    """The store is missing, incomplete, or belongs to a different job."""


class StoreDamaged(StoreError):
    """A store (or its index) that cannot be read as actscope wrote it, or cannot be reached:
    not the user's mistake, so the CLI exits 1 (still with one line, not a traceback)."""

    exit_code = 1


class QueryError(ActscopeError):
    """A query is refused (writes, file access, several statements) or fails."""


class OutputError(ActscopeError):
    """An output path is refused: inside a store, a folder where a file is meant, or a folder
    that holds something other than an earlier export."""
