"""The names of the co-activation arrays, in a group's partials and in the merged state: a
stored-data contract, named here alone (``pipeline.coactivation`` writes and reads them, the store
picks their compression). Sites are numbered by their order in the job (``i``, ``j``).

Per site ``i``: ``mean.i`` (each unit's mean), ``active.i`` (tokens it fires on), and, merged,
``variance.i``. Per pair of dense sites ``i <= j``: ``m2.i.j`` (co-moments about the means,
float32 [N_i, N_j]) and ``both.i.j`` (co-firing counts). Per pair with sparse latents: the
sorted pairs ``pairs.i.j.{key,sum,both}`` of a group, and, merged, CSR rows of both orientations
``csr.i.j.{indptr,col,sum,both}``.
"""

from __future__ import annotations

PAIR_PARTS = ("key", "sum", "both")  # a group's sorted pairs of sparse latents
CSR_PARTS = ("indptr", "col", "sum", "both")  # the merged rows of sparse latents


def mean(i: int) -> str:
    return f"mean.{i}"


def active(i: int) -> str:
    return f"active.{i}"


def variance(i: int) -> str:
    return f"variance.{i}"


def m2(i: int, j: int) -> str:
    return f"m2.{i}.{j}"


def both(i: int, j: int) -> str:
    return f"both.{i}.{j}"


def pairs(i: int, j: int, part: str) -> str:
    return f"pairs.{i}.{j}.{part}"


def csr(i: int, j: int, part: str) -> str:
    return f"csr.{i}.{j}.{part}"


def is_comoment(name: str) -> bool:
    """A co-moment matrix (``m2.i.j``): stored raw (zstd saves 7 % of its bytes and costs a third
    of a group's write)."""
    return name.startswith("m2.")


def is_square(name: str) -> bool:
    """An N x N matrix of a dense pair of sites (co-moments or co-firing counts)."""
    return name.startswith(("m2.", "both."))


def is_pair_keys(name: str) -> bool:
    """The sorted keys or columns of sparse pairs (a group's or the merged CSR's)."""
    return name.startswith("pairs.") and name.endswith(".key") or name.startswith("csr.") and name.endswith(".col")
