"""Corpus text made safe to show: it is untrusted and may hold anything."""

from __future__ import annotations


def visible(text: str) -> str:
    """Corpus text with newlines, tabs and control characters made visible (``↵``, ``→``, ``\\x07``)."""
    text = text.replace("\n", "↵").replace("\t", "→").replace("\r", "␍")
    return "".join(ch if ch.isprintable() or ch == " " else f"\\x{ord(ch):02x}" for ch in text)
