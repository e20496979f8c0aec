"""The shard worker: one model, many shards.

A plain callable class (Ray wraps it as an actor; tests call it directly). ``__init__`` loads the
model once; ``__call__(shard)`` runs the shard's sequences through it in batches, folds every
batch into on-device reductions, writes the shard's dense activations and partial statistics,
and commits the shard last. Everything a shard writes is a function of its tokens alone, so a
retried or duplicated shard writes the same bytes.
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from actscope.pipeline import sampling
from actscope.pipeline.coactivation import RunningCoactivation
from actscope.pipeline.logits import logit_effects
from actscope.pipeline.model import job_forward, load_job_model, resolve_device
from actscope.pipeline.nonzero import NonZeros
from actscope.pipeline.reducers import Group, HookStatistics
from actscope.pipeline.tokenstats import tracked_tokens
from actscope.storage.lease import Fence
from actscope.storage.store import COACTIVATION, PAD, TEXT, Store


@dataclass(frozen=True)
class GroupResult:
    """What running one accumulation group did."""

    group: int
    n_tokens: int  # positions processed, padding included
    seconds: float
    skipped: bool  # already committed by an earlier run or attempt
    node: str = "local"  # the Ray node that ran it
    shards: int = 1  # shards in the group
    seconds_write: float = 0.0  # writing and committing the group's partials (a cost per group)
    peak_rss: int = 0  # the worker process's peak resident bytes so far
    device_peak: int = 0  # on CUDA: the most device memory torch had allocated so far


def _node() -> str:
    import sys

    ray = sys.modules.get("ray")  # only inside a Ray worker is there a node to name
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"


class ShardWorker:
    def __init__(self, store_url: str | None = None, *, threads: int | None = None, fence: Fence | None = None):
        """``store_url``: the store to work on, opened (and the model loaded) now. None: a worker
        started while the job is still being planned, before its store exists (the process
        start and imports, seconds, overlap the plan); ``open`` then gives it the store."""
        if threads:
            torch.set_num_threads(threads)
        self.store: Store | None = None
        if store_url is not None:
            self.open(store_url, fence)

    def open(self, store_url: str, fence: Fence | None = None) -> bool:
        """Open the store and load the model; True once done (the scheduler's signal that the
        actor can take work). ``fence``: the run's lease, checked before every commit."""
        self.store = Store.open(store_url, writable=True, fence=fence)
        self.spec = self.store.spec
        self.device = resolve_device(self.spec.device)
        self.forward = job_forward(self.spec, self.store.model, self.device)
        self.widths = {h: int(w) for h, w in self.store.model.hook_widths.items()}
        self._tracked: list = []  # the token ids whose sums are kept, once read ([None]: every token)
        self._writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="dense-writer")
        # On a CPU with several torch threads, the hooks' reductions run side by side, one thread
        # each (see one_thread), which was faster than each reduction on every thread (RESULTS.md,
        # "Numbers behind code comments").
        cpu_threads = torch.get_num_threads() if self.device.type == "cpu" else 1
        parallel = cpu_threads > 1 and len(self.spec.sites) > 1
        self._reducers = ThreadPoolExecutor(cpu_threads, thread_name_prefix="reducer") if parallel else None
        return True

    def __call__(self, group: int, span: tuple[int, int] | None = None) -> GroupResult:
        """Run accumulation group ``group``: its shards in order into one set of accumulators,
        each shard's dense chunks written as it ends, the group's partials committed last.
        ``span``: the group's sequences, given while the corpus is still being tokenized (the
        store's status does not know its length yet); by default the store's."""
        start = time.perf_counter()
        first, last = span if span is not None else self.store.group_range(group)
        n_tokens = (last - first) * self.spec.context_length
        size = self.spec.shard_size
        shards = range(first // size, -(-last // size))
        if self.store.is_committed(group):
            return GroupResult(group, n_tokens, 0.0, skipped=True, node=_node(), shards=len(shards))
        partials, quality = self._reduce(first, last, [(s * size, min((s + 1) * size, last)) for s in shards])
        record = {"first_seq": first, "last_seq": last, "n_tokens": n_tokens, "shards": [shards[0], shards[-1] + 1]}
        if quality:
            record["saes"] = quality  # L0 and variance explained on the group's first batch
        written = time.perf_counter()
        self.store.write_partial(group, partials, record)
        end = time.perf_counter()
        return GroupResult(
            group, n_tokens, end - start, skipped=False, node=_node(), shards=len(shards), seconds_write=end - written,
            peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            device_peak=torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else 0,
        )

    def _tracked_tokens(self, first: int, last: int) -> torch.Tensor | None:
        """The job's tracked token ids (``tokenstats.tracked_tokens``), read once: from the first
        group's sequences, which are this group's when it is the first (its length may not be
        in the store's status yet) and a whole group's otherwise."""
        if not self._tracked:
            span = (first, last) if first == 0 else (0, self.store.shards_per_group * self.spec.shard_size)
            ids = tracked_tokens(self.store, span)
            self._tracked.append(None if ids is None else torch.from_numpy(ids).to(self.device))
        return self._tracked[0]

    def _reduce(self, first: int, last: int, shards: list[tuple[int, int]]):
        """Every statistic over sequences [first, last), shard by shard (the dense arrays'
        chunks), into one set of accumulators."""
        spec, ctx = self.spec, self.spec.context_length
        # The group's token ids (5 bytes a token) size the token sums; everything else is read a
        # shard at a time.
        ids = self.store.read_tokens(first, last, ("tokens", "kinds"))
        group_tokens = torch.from_numpy(ids["tokens"].astype(np.int64)).reshape(-1)
        group_kinds = torch.from_numpy(ids["kinds"]).reshape(-1)
        group_counted = group_kinds != PAD if spec.include_special_tokens else group_kinds == TEXT
        del ids
        tokens, counted, tracked = group_tokens.to(self.device), group_counted.to(self.device), self._tracked_tokens(first, last)
        stats = {h: HookStatistics(spec, Group(h, self.widths[h], tokens, counted, first * ctx, tracked)) for h in spec.sites}
        del tokens, counted
        del group_tokens, group_kinds, group_counted
        # Once the job's co-activation is merged (and the groups' copies dropped), a group written
        # again (a retried task) must not bring its copy back.
        merged = self.store.has_merged_coactivation()
        coact = RunningCoactivation(spec, self.widths, self.device) if spec.coactivation_hooks() and not merged else None
        quality: dict[str, dict] = {}
        for lo, hi in shards:
            self._reduce_shard(lo, hi, first * ctx, stats, coact, quality)
        partials = {hook: s.result() for hook, s in stats.items()}
        if coact is not None:
            partials[COACTIVATION] = coact.result()
        return partials, quality

    def _measure_saes(self, flat: dict[str, torch.Tensor], mask: torch.Tensor | None) -> dict[str, dict]:
        """Each SAE's L0 and reconstruction sums (``Encoder.quality``) on one batch's counted
        tokens; a transcoder's reconstruction only where its output hook is recorded."""
        out = {}
        pick = (lambda t: t) if mask is None else (lambda t: t[mask])
        for name, encoder in getattr(self.forward, "encoders", {}).items():
            info = encoder.info
            target_hook = info.hook_out if info.transcoder else info.hook
            target = pick(flat[target_hook]) if target_hook in flat else None
            out[name] = encoder.quality(pick(flat[info.hook]), pick(flat[name]), target)
        return out

    def _reduce_shard(self, first: int, last: int, group_offset: int, stats: dict, coact, quality: dict) -> None:
        """Fold sequences [first, last) (one shard) into ``stats`` and ``coact``; write the
        shard's dense chunks whole (they belong to this shard alone), one hook per thread.
        ``quality``: filled with the SAEs' measures on the group's first batch."""
        spec, ctx = self.spec, self.spec.context_length
        data = self.store.read_tokens(first, last, ("tokens", "kinds", "doc_ids"))
        tokens = torch.from_numpy(data["tokens"].astype(np.int64)).to(self.device)
        kinds = torch.from_numpy(data["kinds"]).to(self.device)
        docs = torch.from_numpy(data["doc_ids"]).to(self.device).reshape(-1)
        counted = kinds != PAD if spec.include_special_tokens else kinds == TEXT
        attention = (kinds != PAD).long()
        offset = first * ctx  # global index of the shard's first token
        shard = torch.arange(offset, offset + tokens.numel(), device=self.device)
        priority = sampling.priority(shard, spec.seed)
        local = offset - group_offset  # the shard's first token, counted from the group's
        dense = {h: np.empty((last - first, ctx, self.widths[h]), dtype=np.float16) for h in spec.dense if h in spec.hooks}
        stored = {name: [] for name in spec.dense if spec.sae(name)}  # latents kept sparse: (token, latent, value) per batch
        for b0 in range(0, last - first, spec.batch_size):
            b1 = min(b0 + spec.batch_size, last - first)
            acts = self.forward(tokens[b0:b1], attention[b0:b1])
            span = slice(b0 * ctx, b1 * ctx)
            mask = counted[b0:b1].reshape(-1)
            batch = Batch(
                first=local + b0 * ctx,
                counted=None if bool(mask.all()) else mask,  # decided once per batch: one host sync
                global_index=shard[span],
                token_ids=tokens[b0:b1].reshape(-1),
                docs=docs[span],
                priority=priority[span],
            )
            flat = {hook: act.reshape(-1, act.shape[-1]).float() for hook, act in acts.items()}  # float32 once
            if not quality and spec.saes:
                quality.update(self._measure_saes(flat, batch.counted))
            # An SAE's non-zeros over every token, found once: a top-k encoder's from the indices it
            # chose, a stored SAE's by a scan; written below, and its statistics' input.
            nonzeros = dict(getattr(self.forward, "nonzeros", {}))
            nonzeros |= {name: NonZeros.of(flat[name], None) for name in stored if name not in nonzeros}
            with one_thread(self.device):
                if self._reducers is None:
                    for hook, x in flat.items():
                        stats[hook].update(x, batch, nonzeros.get(hook))
                else:
                    for done in [self._reducers.submit(stats[hook].update, x, batch, nonzeros.get(hook)) for hook, x in flat.items()]:
                        done.result()
            for hook, array in dense.items():
                array[b0:b1] = acts[hook].to(torch.float16).cpu().numpy()
            for name, pieces in stored.items():
                nz = nonzeros[name]  # row-major: token, then latent
                pieces.append(((nz.rows + b0 * ctx).cpu().numpy(), nz.units.to(torch.int32).cpu().numpy(), nz.values.to(torch.float16).cpu().numpy()))
            if coact is not None:
                coact.update(flat, batch)
        writes = [self._writer.submit(self.store.dense(hook).__setitem__, slice(first, last), array) for hook, array in dense.items()]
        writes += [self._writer.submit(self.store.write_latents, name, first // spec.shard_size, csr_rows(pieces, (last - first) * ctx))
                   for name, pieces in stored.items()]
        for write in writes:
            write.result()

    def write_logit_effects(self) -> bool:
        """Compute the logit effects of every hook from the weights, once per job; True if the
        store now has them (False: the model has no unembedding to compute them with)."""
        if not self.spec.computes("logits"):
            return False
        if not self.store.has_logits():
            # The weights' view the logit effects need is the bridge's (W_out, W_U, the final
            # norm): the bridge forward's own, or loaded once for this.
            bridge = getattr(self.forward, "bridge", None) or load_job_model(self.spec, self.device)
            latents = {  # a transcoder's decoder writes its output hook; without one named, it has no direction
                name: (e.info.hook_out if e.info.transcoder else e.info.hook, e.directions())
                for name, e in getattr(self.forward, "encoders", {}).items() if e.info.hook_out or not e.info.transcoder
            }
            self.store.write_logits(logit_effects(bridge, self.spec.hooks, self.spec.top_logits, latents))
        return True


def csr_rows(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_tokens: int) -> dict[str, np.ndarray]:
    """A shard's batches of (token, latent, value) entries, in token order, as CSR rows."""
    rows = np.concatenate([p[0] for p in pieces]) if pieces else np.zeros(0, np.int64)
    indptr = np.zeros(n_tokens + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_tokens), out=indptr[1:])
    return {
        "indptr": indptr,
        "index": np.concatenate([p[1] for p in pieces]) if pieces else np.zeros(0, np.int32),
        "value": np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0, np.float16),
    }


@contextmanager
def one_thread(device: torch.device):
    """Run the per-hook reductions on one CPU thread. They are passes over cache-sized blocks and
    small gathers, which torch's thread pool slows down (moments ran faster on one thread than
    on two). The forward and co-activation's products keep every
    thread."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Batch:
    """One forward pass's tokens, flattened: what the reducers need besides the activations."""

    first: int  # shard-local index of the first token
    counted: torch.Tensor | None  # [n] bool, None when every token counts
    global_index: torch.Tensor  # [n] int64, the tokens' indices in the job
    token_ids: torch.Tensor  # [n] int64
    docs: torch.Tensor  # [n] int64
    priority: torch.Tensor  # [n] int64, the sampling priority of each token
