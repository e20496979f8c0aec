"""Moments, range and density of every neuron, on the device, merged exactly across shards.

Per neuron: count, mean and the central sums M2, M3, M4, min, max, and the number of tokens
above the site's threshold. Each batch's sums are taken in float32 around the batch's own mean;
everything after that is float64. Batches and shards combine with the pairwise formulas of Chan
et al. and Pébay (2008), which stay accurate where raw power sums cancel catastrophically (a
kurtosis from sum(x^4) is useless once the mean is large against the spread).

Shapes: ``acts`` is [tokens, neurons]; every statistic is [neurons].
"""

from __future__ import annotations

import numpy as np
import torch

CPU_BLOCK_ROWS = 64
FIELDS = ("count", "mean", "m2", "m3", "m4", "min", "max", "n_active")


def combine(a: dict, b: dict) -> dict:
    """Merge two sets of statistics (torch tensors or numpy arrays alike)."""
    na, nb = a["count"], b["count"]
    n = na + nb
    if isinstance(n, np.ndarray):
        safe = np.where(n > 0, n, 1).astype(np.float64)
        minimum, maximum = np.fmin(a["min"], b["min"]), np.fmax(a["max"], b["max"])
    else:
        safe = torch.where(n > 0, n, 1).double()
        minimum, maximum = torch.fmin(a["min"], b["min"]), torch.fmax(a["max"], b["max"])
    na, nb = na * 1.0, nb * 1.0
    delta = b["mean"] - a["mean"]
    mean = a["mean"] + delta * nb / safe
    m2 = a["m2"] + b["m2"] + delta**2 * na * nb / safe
    m3 = (
        a["m3"] + b["m3"]
        + delta**3 * na * nb * (na - nb) / safe**2
        + 3 * delta * (na * b["m2"] - nb * a["m2"]) / safe
    )
    m4 = (
        a["m4"] + b["m4"]
        + delta**4 * na * nb * (na * na - na * nb + nb * nb) / safe**3
        + 6 * delta**2 * (na * na * b["m2"] + nb * nb * a["m2"]) / safe**2
        + 4 * delta * (na * b["m3"] - nb * a["m3"]) / safe
    )
    return {
        "count": a["count"] + b["count"], "mean": mean, "m2": m2, "m3": m3, "m4": m4,
        "min": minimum, "max": maximum, "n_active": a["n_active"] + b["n_active"],
    }


class RunningMoments:
    """Statistics of each neuron over the counted tokens seen so far."""

    def __init__(self, width: int, device: torch.device, threshold: float = 0.0):
        self.threshold = threshold
        zeros = torch.zeros(width, dtype=torch.float64, device=device)
        self.state = {
            "count": torch.zeros(width, dtype=torch.int64, device=device),
            "mean": zeros, "m2": zeros, "m3": zeros, "m4": zeros,
            "min": torch.full((width,), torch.nan, dtype=torch.float32, device=device),
            "max": torch.full((width,), torch.nan, dtype=torch.float32, device=device),
            "n_active": torch.zeros(width, dtype=torch.int64, device=device),
        }

    def update(self, acts: torch.Tensor, first_index: int, counted: torch.Tensor | None) -> None:
        x = (acts if counted is None else acts[counted]).float()
        n, width = x.shape
        if n == 0:
            return
        # One batch's central sums in float32 around its own mean, summed per block of rows and
        # then over blocks; batches and shards then combine in float64. On a CPU the blocks are
        # 64 rows, so that every pass after the first reads from cache (a third of the time of
        # whole-batch passes). On a GPU one block is the whole batch.
        mean = x.mean(0)
        rows = CPU_BLOCK_ROWS if x.device.type == "cpu" else n
        sums = torch.empty((6, -(-n // rows), width), dtype=torch.float32, device=x.device)
        for i, block in enumerate(x.split(rows)):
            d = block - mean
            d2 = d * d
            torch.sum(d2, 0, out=sums[0, i])
            torch.sum(d.mul_(d2), 0, out=sums[1, i])
            torch.sum(d2.square_(), 0, out=sums[2, i])
            torch.amin(block, 0, out=sums[3, i])
            torch.amax(block, 0, out=sums[4, i])
            # 1 above the threshold, else 0: sign and clamp are fast float passes, where a
            # comparison to bool and its count take three times as long here.
            torch.sum(torch.sub(block, self.threshold, out=d).sign_().clamp_(min=0), 0, out=sums[5, i])
        m2, m3, m4, active = sums[[0, 1, 2, 5]].sum(1).double()
        batch = {
            "count": torch.full_like(self.state["count"], n),
            "mean": mean.double(), "m2": m2, "m3": m3, "m4": m4,
            "min": sums[3].amin(0), "max": sums[4].amax(0),
            "n_active": active.long(),
        }
        self.state = combine(self.state, batch)

    def update_nonzero(self, nz) -> None:
        """The same batch statistics from its non-zero entries (``pipeline.nonzero``): a unit's
        central sums are its entries' plus ``zeros * (0 - mean)^p``, in float64."""
        n = nz.n
        if n == 0:
            return
        zeros = (n - nz.per_unit()).double()
        mean = nz.per_unit(nz.values) / n
        d = nz.values.double() - mean[nz.units]
        d2 = d * d
        batch = {
            "count": torch.full_like(self.state["count"], n), "mean": mean,
            "m2": nz.per_unit(d2) + zeros * mean**2,
            "m3": nz.per_unit(d2 * d) - zeros * mean**3,
            "m4": nz.per_unit(d2 * d2) + zeros * mean**4,
            "min": nz.per_unit_extreme(largest=False), "max": nz.per_unit_extreme(largest=True),
            "n_active": torch.bincount(nz.units[nz.values > self.threshold], minlength=nz.width) + (zeros.long() if self.threshold < 0 else 0),
        }
        self.state = combine(self.state, batch)

    def result(self) -> dict[str, np.ndarray]:
        return {name: value.cpu().numpy() for name, value in self.state.items()}


def merge_moments(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Fold shards' statistics in the order given (the reducer passes shard order, so the result
    is the same bits whatever the number of workers)."""
    merged = parts[0]
    for part in parts[1:]:
        merged = combine(merged, part)
    return merged


def describe(stats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """count, mean, std (population), min, max, frac_active, skew and excess kurtosis (the
    definitions of scipy.stats.skew and kurtosis with their defaults: biased, Fisher)."""
    n = stats["count"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        var = stats["m2"] / n
        skew = np.sqrt(n) * stats["m3"] / stats["m2"] ** 1.5
        kurtosis = n * stats["m4"] / stats["m2"] ** 2 - 3.0
        frac_active = stats["n_active"] / n
    flat = stats["m2"] <= 0
    return {
        "count": stats["count"], "mean": stats["mean"], "std": np.sqrt(var),
        "min": stats["min"], "max": stats["max"], "frac_active": frac_active,
        "skew": np.where(flat, np.nan, skew), "kurtosis": np.where(flat, np.nan, kurtosis),
    }
