"""What a job will cost in memory, before it runs: the plan refuses a job that cannot fit.

The estimate is of the dominant terms, each a formula in the job's sizes (w: a hook's width,
k: ``top_k``, T: tokens per shard = ``shard_size * context_length``, B: tokens per batch,
V: vocabulary size):

- top and bottom examples: ``8 w k`` bytes each (int64 keys), plus ``8 B w`` once per shard
  while the first batch is ranked (for the sites reduced at once: one on a GPU);
- moments ``48 w``; histogram ``8 w * N_BINS``; band samples ``20 w * 32 * samples_per_band``;
  random samples ``4 w * random_samples``;
- token sums ``8 w * min(R, G)`` (float64 rows of the tracked ids present in the group of G
  tokens; R = V, or the N most frequent tokens where ``tracked_token_count`` chooses them);
  an SAE's are sparse: ``16`` bytes per (token id, latent) pair at which the latent fired, twice
  while pieces are folded, so ``32 * min(V w, G L)`` for L latents firing per token (a top-k
  SAE's k; for the others the plan assumes ``L <= ASSUMED_L0``);
- a batch's activations ``4 B w`` (float32; ``6 B w`` with the forward's half-precision values), and ``2 T w`` of host buffer per dense hook (an
  SAE's stored latents: ``14 T L`` of (token, latent, value) entries; ``8 + 6 L`` bytes a token
  in the store);
- co-activation ``8`` bytes per neuron pair on the device (float32 co-moments, int32 counts),
  ``8`` more per pair for the shard's result on the host and ``16`` per pair of the largest site
  pair while it is converted; a latent x neuron pair is the same; pairs of latents (two sparse
  sites) are kept only where they met: ``68`` bytes per distinct pair (24 on the device, twice
  while folded, and 20 in the result), at most ``min(N_i N_j, G / stride * L_i L_j)`` pairs
  (half of it within one SAE) for the group's G tokens;
- the model's weights.

A worker needs the sum; the machine running the plan checks it against its own memory when the
job's workers run here (embedded Ray or ``--local``), and against one GPU's when ``device``
resolves to CUDA here. On a cluster the numbers are printed, not checked (the plan does not see
the workers' devices).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from actscope.pipeline.coactivation import dense_pair_sizes, job_site_pairs, sparse_sites
from actscope.pipeline.sampling import N_BANDS
from actscope.storage.bins import N_BINS
from actscope.storage.record import ModelRecord
from actscope.storage.spec import JobSpec


@dataclass
class Estimate:
    """Bytes a worker holds at its peak, by part."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        return sorted(self.parts.items(), key=lambda item: -item[1])[:n]


def worker_memory(spec: JobSpec, widths: dict[str, int], vocab_size: int, weight_bytes: int, group_tokens: int | None = None,
                  l0: dict[str, int] | None = None, reducing: int | None = None) -> Estimate:
    """``group_tokens``: tokens in one accumulation group; unknown before the corpus is
    tokenized, so by default the token sums are counted for the whole vocabulary. ``l0``: the
    latents an SAE fires a token at most, where known (:func:`latents_per_token`). ``reducing``:
    the sites a worker reduces at once (one on a GPU, a thread each on a CPU; None: all), whose
    first batches are ranked at the same time."""
    shard_tokens = spec.shard_size * spec.context_length
    sparse_group = group_tokens or shards_per_group(spec, widths, vocab_size, 1 << 40) * shard_tokens
    group_tokens = group_tokens or vocab_size
    batch_tokens = min(spec.batch_size, spec.shard_size) * spec.context_length
    parts: dict[str, int] = {"model weights": weight_bytes, "process": PROCESS_BASELINE}
    fires = lambda site: fires_per_token(l0, site, widths[site])

    def add(name: str, size: int) -> None:
        parts[name] = parts.get(name, 0) + int(size)

    for hook, w in widths.items():
        sides = 2 if spec.computes("bottom") else 1
        add("top/bottom examples", sides * 8 * w * spec.top_k * (2 if spec.examples == "document" else 1))
        add("moments", 48 * w)
        if spec.computes("histogram"):
            add("histograms", 8 * w * N_BINS)
        if spec.computes("samples"):
            add("samples", 20 * w * N_BANDS * spec.samples_per_band + 4 * w * spec.random_samples)
        if spec.computes("tokens") and spec.sae(hook):
            add("token sums", 2 * sparse_token_bytes(w, vocab_size, sparse_group, fires(hook)))
        elif spec.computes("tokens"):
            add("token sums", 8 * w * min(token_rows(spec, widths, vocab_size), group_tokens))
        # The batch's values of every site at once: float32 for the statistics, and the forward's
        # own half-precision tensors beside them.
        add("activations", (4 + (2 if spec.dtype != "float32" else 0)) * batch_tokens * w)
        if hook in spec.dense and spec.sae(hook):
            add("dense buffers", 14 * shard_tokens * fires(hook))  # (token, latent, value) entries
        elif hook in spec.dense:
            add("dense buffers", 2 * shard_tokens * w)
    at_once = sorted(widths.values(), reverse=True)[: reducing or len(widths)]
    add("batch ranking", 8 * batch_tokens * sum(at_once))
    hooks = spec.coactivation_hooks()
    if hooks:
        sizes = dense_pair_sizes(spec, widths)
        if sizes:
            add("co-activation", 16 * sum(sizes) + 16 * max(sizes))
        met = latent_pair_entries(spec, widths, sparse_group, l0)
        if met:
            add("co-activation of latents", 68 * met)
    add("shard tokens", 64 * shard_tokens + 5 * max(group_tokens, shard_tokens))
    return Estimate(parts)


#: A worker process before its model and state: Python with torch, transformers, TransformerLens,
#: zarr and Ray imported (RESULTS.md, "Worker memory": 0.36-0.40 GiB measured).
PROCESS_BASELINE = 512 << 20


#: The latents an SAE fires per token that the plan assumes (SAEs in use fire 20 to 150; one that
#: fires more holds proportionally more), unless its architecture says (top-k: k).
ASSUMED_L0 = 128


def latents_per_token(model: ModelRecord) -> dict[str, int]:
    """Each SAE's latents firing per token at most, where its architecture fixes it (``topk``
    and ``abstopk`` fire k), from the plan's model record; the others are assumed
    ``ASSUMED_L0``."""
    return {
        name: int(info["k"]) for name, info in model.saes.items()
        if info.get("architecture") in ("topk", "abstopk") and info.get("k")
    }


def fires_per_token(l0: dict[str, int] | None, site: str, width: int) -> int:
    """The latents of ``site`` the plan counts a token: its known L0 (``l0``), else
    ``ASSUMED_L0``, at most its width."""
    return min((l0 or {}).get(site, ASSUMED_L0), width)


def sparse_token_bytes(w: int, vocab_size: int, tokens: int, l0: int = ASSUMED_L0) -> int:
    """Bytes of an SAE's sparse token sums over ``tokens`` tokens, at most: 16 per distinct
    (token id, latent) pair that fired (``l0`` latents a token)."""
    return 16 * min(vocab_size * w, tokens * min(l0, w))


def latent_pair_entries(spec: JobSpec, widths: dict[str, int], tokens: int, l0: dict[str, int] | None = None) -> int:
    """Distinct (latent, latent) pairs of the sparse site pairs over ``tokens`` corpus tokens, at
    most: every pair of latents firing together at a co-activation token is new, up to all of
    them (a site with itself keeps one triangle). ``l0``: latents a token where known."""
    hooks, sparse = spec.coactivation_hooks(), sparse_sites(spec)
    chosen = -(-tokens // spec.coactivation.stride)
    total = 0
    for i, j in job_site_pairs(spec, widths):
        if i in sparse and j in sparse:
            wi, wj = widths[hooks[i]], widths[hooks[j]]
            pairs = min(wi * wj, chosen * fires_per_token(l0, hooks[i], wi) * fires_per_token(l0, hooks[j], wj))
            total += (pairs + wi) // 2 if i == j else pairs
    return total


#: The partial state a group of shards may write per corpus token (the plan's target).
PARTIAL_BYTES_PER_TOKEN = 1024


def partial_bytes(spec: JobSpec, widths: dict[str, int], vocab_size: int) -> int:
    """Bytes one group's partial statistics take in the store, at most: the same terms as the
    worker's, without its buffers (token sums counted for the whole vocabulary). An SAE's sparse
    token sums are not counted: they grow with the group's tokens (16 L bytes a token at most)
    rather than being written once per group, so the group's size cannot amortise them; nor are
    the pairs of latents that met (20 bytes each), for the same reason."""
    rows = token_rows(spec, widths, vocab_size)
    total = sum(hook_partial_bytes(spec, w, rows, sparse=bool(spec.sae(site))) for site, w in widths.items())
    return total + 8 * sum(dense_pair_sizes(spec, widths))


def hook_partial_bytes(spec: JobSpec, w: int, token_rows: int, *, sparse: bool = False) -> int:
    """One hook's share of ``partial_bytes`` (co-activation aside), for a hook of width ``w``
    whose token sums have ``token_rows`` rows (``sparse``: an SAE's, whose token sums are not
    counted)."""
    sides = 2 if spec.computes("bottom") else 1
    total = sides * 12 * w * spec.top_k * (2 if spec.examples == "document" else 1) + 48 * w
    if spec.computes("histogram"):
        total += 8 * w * N_BINS
    if spec.computes("samples"):
        total += 20 * w * N_BANDS * spec.samples_per_band + 4 * w * spec.random_samples
    if spec.computes("tokens") and not sparse:
        total += 8 * w * token_rows
    return total


#: The bytes the token sums of a job's neurons (not SAE latents, whose sums are sparse) may take,
#: on a worker and in each group's partials, before ``tracked_tokens: auto`` keeps the most
#: frequent tokens only (GPT-2 small's 12 MLP hooks over its whole vocabulary would take 13.8 GiB;
#: with ``pairs: auto``'s co-moments, two workers of such a job fit a 24 GiB machine).
TOKEN_SUMS_BUDGET = 2 << 30


def tracked_token_count(spec: JobSpec, widths: dict[str, int], vocab_size: int) -> int:
    """The plan's choice for ``tracked_tokens``: 0 where every token's sums are kept, else N,
    the number of the most frequent tokens kept. A function of the job, the widths and the
    vocabulary alone (never of a machine's memory), so that a job's results are the same
    wherever it runs; the plan records it in the store."""
    choice = spec.tracked_tokens
    if not spec.computes("tokens") or choice == "all":
        return 0
    if choice != "auto":
        return 0 if choice >= vocab_size else choice
    units = sum(w for site, w in widths.items() if not spec.sae(site))
    if 8 * units * vocab_size <= TOKEN_SUMS_BUDGET:
        return 0
    return max(1, TOKEN_SUMS_BUDGET // (8 * units))


def token_rows(spec: JobSpec, widths: dict[str, int], vocab_size: int) -> int:
    """Rows of a neuron hook's token sums: the tracked tokens, or the whole vocabulary."""
    return tracked_token_count(spec, widths, vocab_size) or vocab_size


#: Groups a corpus is cut into at least, where their state fits ``SMALL_JOB_PARTIALS`` in all:
#: so that several workers share even a job too short for the per-token target.
MIN_GROUPS = 8
SMALL_JOB_PARTIALS = 4 << 30


def shards_per_group(spec: JobSpec, widths: dict[str, int], vocab_size: int, n_shards: int) -> int:
    """Shards per accumulation group, from the job and its corpus's length alone (never from the
    worker count: the groups fix the float sums). A group holds the fewest shards whose tokens
    bring its partial state to at most ``PARTIAL_BYTES_PER_TOKEN`` a token (the state does not
    grow with the corpus and is written once per group, so the store holds state x groups, not
    state x shards); a short job is still cut into up to ``MIN_GROUPS`` groups while their state
    stays within ``SMALL_JOB_PARTIALS`` in all, or within the per-token target."""
    shard_tokens = spec.shard_size * spec.context_length
    state = max(partial_bytes(spec, widths, vocab_size), 1)
    size = -(-state // (PARTIAL_BYTES_PER_TOKEN * shard_tokens))
    groups = -(-n_shards // size)
    budget = max(PARTIAL_BYTES_PER_TOKEN * n_shards * shard_tokens, SMALL_JOB_PARTIALS)
    groups = max(groups, min(MIN_GROUPS, n_shards, budget // state))
    size = -(-n_shards // max(groups, 1))
    return max(1, min(size, (1 << 31) // shard_tokens))  # token indices within a group stay 32-bit


def store_bytes(spec: JobSpec, widths: dict[str, int], vocab_size: int, n_tokens: int, group_shards: int,
                l0: dict[str, int] | None = None) -> Estimate:
    """Bytes the store will hold for ``n_tokens`` corpus tokens, by part, at most (uncompressed:
    zstd makes the tables and token arrays smaller). ``partial state`` is its peak, during the
    reduce: every group's partials, the merged co-moments (4 + 4 bytes per pair) and the parts'
    tables; once the index is written, the groups' co-activation copies are dropped."""
    shard_tokens = spec.shard_size * spec.context_length
    groups = -(-n_tokens // (group_shards * shard_tokens))
    units = sum(widths.values())
    parts: dict[str, int] = {"token arrays": 17 * n_tokens}
    fires = lambda site: fires_per_token(l0, site, widths[site])
    dense = sum((8 + 6 * fires(h)) * n_tokens if spec.sae(h) else 2 * widths[h] * n_tokens for h in spec.dense)
    if dense:
        parts["dense activations"] = dense
    hooks = spec.coactivation_hooks()
    pairs = sum(dense_pair_sizes(spec, widths))
    # pairs of latents: each group's (20 bytes a pair), and the merged rows of both orientations (48)
    met = groups * 20 * latent_pair_entries(spec, widths, group_shards * shard_tokens, l0) + 48 * latent_pair_entries(spec, widths, n_tokens, l0)
    per_unit = 2 * spec.top_k * 22 + N_BINS * 30 + N_BANDS * spec.samples_per_band * 30 + spec.random_samples * 22
    per_unit += spec.top_tokens * 22 + 2 * spec.top_logits * 20 + (2 * spec.coactivation.partners * 40 if hooks else 0) + 100
    parts["tables"] = 25 * n_tokens + per_unit * units
    group_tokens = min(group_shards * shard_tokens, n_tokens)
    sparse = sum(  # every group's sparse token sums
        groups * sparse_token_bytes(w, vocab_size, group_tokens, fires(s)) for s, w in widths.items() if spec.sae(s)
    ) if spec.computes("tokens") else 0
    parts["partial state (peak)"] = groups * partial_bytes(spec, widths, vocab_size) + sparse + 8 * pairs + met + per_unit * units
    return Estimate(parts)


def machine_memory() -> int:
    """This machine's physical memory in bytes."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**27 else f"{n / 2**20:,.1f} MiB"
