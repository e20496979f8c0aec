"""The reduce: every group's partial statistics merged into the job's tables, exactly, as
independent *parts* that run in parallel (Ray tasks in a job, or one after another here).

- A **hook part** folds one hook's partials over the groups, in group order, and writes that hook's
  rows of every per-hook table (examples, stats, histograms, samples, token stats, logit effects).
  Memory: the token sums, ``16 V w`` bytes (the [vocab, width] float64 sums and the means), and
  two groups' partials of the hook.
- The **co-activation** merge runs ``prepare`` first (one part), then one part per block of 512
  rows of each site (``pipeline.coactivation``): ``~100 * 512 * w_j`` bytes for the widest
  partner site; ``prepare`` also folds the pairs of latents that met (``96`` bytes a pair).

Each part writes its rows to ``index/parts/<part>/`` and then a ``DONE`` file; a part that has one
is not run again, so a stopped reduce resumes where it was (a part is its unit of work). The
driver then *assembles* each table from its parts in order (hooks sorted; co-activation by site
and block), a part at a time (``storage.tables.TableWriter``): it never holds more than one
part's rows, and never an N x N matrix. Every merge is a function of the data alone (top-k and
samples by (value or priority, token index), sums in group order), so the tables are the same
whatever the number of workers, the parts' order, and whichever groups or parts were retried.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from actscope.pipeline import coactivation
from actscope.pipeline.capacity import fires_per_token, hook_partial_bytes, latents_per_token, sparse_token_bytes
from actscope.pipeline.index import hook_tables, vocab_table, write_tokens_table
from actscope.pipeline.reducers import HookMerge
from actscope.pipeline.tokenstats import tracked_tokens
from actscope.storage.errors import StoreError
from actscope.storage.lease import Fence
from actscope.storage.store import Store
from actscope.storage.tables import HOOK_TABLES, TableWriter, read_table, write_table


class PartKind(StrEnum):
    HOOK = "hook"  # a hook's tables
    PREPARE = "prepare"  # co-activation: the merged co-moments, before the blocks
    BLOCK = "block"  # co-activation: a block of rows of partners


@dataclass(frozen=True)
class Part:
    """One unit of the reduce. ``memory``: bytes it holds at its peak (the scheduler's request)."""

    key: str
    kind: PartKind
    hook: str = ""
    site: int = 0
    start: int = 0
    memory: int = 0


@dataclass(frozen=True)
class PartDone:
    key: str
    seconds: float
    peak_rss: int  # the process's peak resident bytes so far (a Ray worker runs several parts)


def _all_parts(store: Store) -> tuple[list[Part], list[Part]]:
    """Every part of the store's reduce, in the tables' order: (hook parts, with the
    co-activation ``prepare`` first when there is one; the co-activation blocks)."""
    spec = store.spec
    widths, vocab, groups = store.model.hook_widths, store.model.vocab_size, store.n_groups
    rows = store.model.tracked_tokens or vocab
    first = []
    for n, hook in enumerate(sorted(spec.sites)):
        w = widths[hook]
        if not spec.computes("tokens"):
            tokens = 0
        elif spec.sae(hook):
            tokens = 2 * sparse_token_bytes(w, vocab, store.n_seq * spec.context_length, fires_per_token(latents_per_token(store.model), hook, w))
        else:
            tokens = 16 * rows * w
        memory = tokens + 2 * hook_partial_bytes(spec, w, rows, sparse=bool(spec.sae(hook))) + (64 << 20)
        first.append(Part(f"hook-{n:04d}", PartKind.HOOK, hook=hook, memory=memory))
    later = []
    hooks = spec.coactivation_hooks()
    if hooks:
        total = sum(widths[h] for h in hooks)
        widest = max(widths[h] for h in hooks)
        met = 96 * coactivation.latent_pairs_stored(store)  # pairs of latents, folded and turned into rows
        first.insert(0, Part("coactivation", PartKind.PREPARE, memory=32 * total * groups + 8 * coactivation.BLOCK**2 + met + (64 << 20)))
        memory = 100 * coactivation.BLOCK * widest + 16 * total * groups + 160 * coactivation.SPARSE_CELLS + (64 << 20)
        for site, start in coactivation.blocks(spec, widths):
            later.append(Part(f"coactivation-{site:04d}-{start:08d}", PartKind.BLOCK, site=site, start=start, memory=memory))
    return first, later


def plan_parts(store: Store) -> tuple[list[Part], list[Part]]:
    """(parts that can start now, co-activation blocks that wait for ``prepare``); the parts
    already done are left out. Every group must be committed."""
    missing = sorted(set(range(store.n_groups)) - store.committed_groups())
    if missing:
        raise StoreError(f"{store.url}: {len(missing)} group(s) of shards are not committed yet (first: {missing[0]}). Re-run the job to finish them.")
    first, later = _all_parts(store)
    return [p for p in first if not store.part_done(p.key)], [p for p in later if not store.part_done(p.key)]


def run_part(store_url: str, part: Part, fence: Fence | None = None) -> PartDone:
    """Run one part against the store at ``store_url`` (in any process) and mark it done
    (``fence``: the run's lease, checked before)."""
    t = time.perf_counter()
    store = Store.open(store_url, writable=True, fence=fence)
    spec = store.spec
    if part.kind == PartKind.HOOK:
        merged = {part.hook: merge_hook(store, part.hook)}
        logits = store.read_logits([part.hook])
        for name, table in hook_tables(merged, spec.context_length, logits).items():
            write_table(store.part_url(part.key, name), name, table)
    elif part.kind == PartKind.PREPARE:
        coactivation.prepare(store, spec)
    else:
        table = coactivation.block_table(store, spec, part.site, part.start)
        write_table(store.part_url(part.key, "coactivation"), "coactivation", table)
    store.mark_part_done(part.key)
    return PartDone(part.key, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def assemble(store: Store, tokenizer) -> None:
    """Write every table of the index from the parts (all done), then commit the merged
    co-activation (dropping the groups' copies) and drop the parts."""
    write_tokens_table(store)
    write_table(store.table_url("vocab"), "vocab", vocab_table(tokenizer))
    first, blocks = _all_parts(store)
    hooks = [part for part in first if part.kind == PartKind.HOOK]
    for name, parts in [*((name, hooks) for name in HOOK_TABLES), ("coactivation", blocks)]:
        with TableWriter(store.table_url(name), name) as writer:
            for part in parts:
                writer.write(read_table(store.part_url(part.key, name)))
    if blocks and not store.has_merged_coactivation():
        store.commit_merged_coactivation()
    store.clear_parts()


def merge_hook(store: Store, hook: str) -> dict[str, np.ndarray]:
    """One hook's statistics over every group: {top_values, top_index, bottom_*, count, mean,
    m2, ..., hist, band_*, random_*, token_*}."""
    merge = HookMerge(store.spec, hook, store.model.hook_widths[hook], store.model.vocab_size, tracked_tokens(store))
    for group in range(store.n_groups):
        merge.add(store.read_partial(group, hook))
    return merge.result()
