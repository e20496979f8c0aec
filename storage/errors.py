"""The errors actscope raises for a user's mistake.

Library code raises these; only the CLI turns them into messages and exit codes. Each message
says what was wrong and how to fix it. Anything that is not an ``ActscopeError`` is a bug.
"""

from __future__ import annotations

from typing import Any


def first_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message as an error line quotes it: its first line, cut to ``limit``."""
    return (str(err).strip().splitlines() or [""])[0][:limit]


def cause(err: BaseException) -> str:
    """``Type: first line`` of an exception, for "cannot read X (cause)" messages."""
    return f"{type(err).__name__}: {first_line(err)}"


def short(value: Any, limit: int = 60) -> str:
    """A bad value as an error message quotes it: a short prefix of its repr (a list or a
    mapping by its size)."""
    text = repr(value) if not isinstance(value, dict | list) else f"a {type(value).__name__} of {len(value)} item(s)"
    return text if len(text) <= limit else text[:limit] + "..."


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
