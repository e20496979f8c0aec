"""Deterministic, mergeable samples: a few examples per activation band, and random tokens.

Every token gets a *priority*, a seeded bijective hash of its global index (the same on any shard
split, any worker, any retry). A sample is "the tokens of lowest priority" in some set, which is a
uniform random sample of that set (bottom-k sampling) and merges exactly: the lowest priorities of
a union are the lowest of the parts' lowest.

- **Band samples**: for each neuron, ``samples_per_band`` tokens from each *band* (among the
  tokens whose priority falls in the lowest ``band_sample_rate`` of the range: a seeded 1-in-8
  subsample by default, which cuts the cost per batch eightfold; top and bottom examples cover
  the rare extreme bands exactly), the octaves of
  |activation| over [2**-8, 2**8) of each sign (16 per sign, band 16 + e holds (2**(e-8),
  2**(e-7)] for positive values). Bands are fixed before any data is seen, so a shard decides each
  token's band alone; equal-width bands of (0, max] (as some dashboards draw) would need the final
  max before the pass. Octaves also show weak activations, which one width-max/10 band lumps.
- **Random samples**: the ``random_samples`` counted tokens of lowest priority, one set for the
  whole job, with every neuron's value on them: what each neuron does on a typical token.

Shapes: band samples are [bands, width, s]; random samples [r] tokens and [r, width] values.
"""

from __future__ import annotations

import operator

import numpy as np
import torch

from actscope.pipeline.histogram import E_MAX, E_MIN, PER_OCTAVE_BITS, ZERO, pattern, pattern_bins
from actscope.pipeline.ops import flat_where

_M32 = 0xFFFFFFFF
#: Priority of an empty slot: above every real priority (which fit in 32 bits).
EMPTY = 1 << 33
N_OCTAVES = E_MAX - E_MIN
N_BANDS = 2 * N_OCTAVES


def priority(index, seed: int):
    """A 32-bit bijective mix of ``index`` (torch or numpy int64), seeded; the low 32 bits of the
    index decide it, so priorities are distinct below 2**32 tokens (ties then break by index)."""
    x = (index ^ ((seed * 0x9E3779B1) & _M32)) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def band_of_bin(bins):
    """Histogram bin → band (-1 for the near-zero bin): the bin's octave, per sign."""
    octave = (bins - ZERO - 1) >> PER_OCTAVE_BITS  # positive side: 0..N_OCTAVES-1
    negative = (ZERO - 1 - bins) >> PER_OCTAVE_BITS
    if isinstance(bins, np.ndarray):
        return np.where(bins > ZERO, N_OCTAVES + octave, np.where(bins < ZERO, N_OCTAVES - 1 - negative, -1))
    return torch.where(bins > ZERO, N_OCTAVES + octave, torch.where(bins < ZERO, N_OCTAVES - 1 - negative, -1))


def band_edges() -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of each band by value; the outermost bands reach to -inf and +inf."""
    mag = 2.0 ** np.arange(E_MIN, E_MAX + 1)
    lo = np.concatenate([-mag[::-1][:-1], mag[:-1]])
    hi = np.concatenate([-mag[::-1][1:], mag[1:]])
    lo[0], hi[-1] = -np.inf, np.inf
    return lo, hi


def _cell_table(width: int, device: torch.device) -> torch.Tensor:
    """``band * width`` for each of the 4096 top-12-bit patterns of a float32 (as the histogram's
    table); the near-zero bin, which is no band, maps to the sentinel row ``N_BANDS``."""
    band = band_of_bin(pattern_bins())
    return (torch.where(band >= 0, band, N_BANDS) * width).to(device)


class RunningBandSamples:
    """For each (band, neuron) *cell*, the ``size`` eligible counted tokens of lowest priority
    seen so far; a token is eligible when its priority is below ``rate * 2**32``.

    Per batch only the eligible tokens are read. A (token, neuron) pair is a candidate when its
    priority beats the worst one its cell keeps (one lookup per pair in ``worst``), and only the
    candidates are sorted into the cells they touch.
    """

    def __init__(self, size: int, width: int, device: torch.device, rate: float = 1.0):
        self.size, self.width = size, width
        self.cut = int(rate * 2**32)
        cells = N_BANDS * width
        self.prio = torch.full((cells, size), EMPTY, dtype=torch.int64, device=device)
        self.index = torch.full((cells, size), -1, dtype=torch.int64, device=device)
        self.value = torch.full((cells, size), torch.nan, dtype=torch.float32, device=device)
        # The worst priority each cell keeps, then a sentinel row (the near-zero bin) that no
        # priority beats.
        self.worst = torch.cat([self.prio[:, -1], torch.full((width,), -1, dtype=torch.int64, device=device)])
        self.lut = _cell_table(width, device)
        self.column = torch.arange(width, device=device)
        self.fresh = True

    def update(self, x: torch.Tensor, batch) -> None:
        eligible = batch.priority < self.cut
        if batch.counted is not None:
            eligible &= batch.counted
        rows = eligible.nonzero(as_tuple=True)[0]
        # In order of priority, so that an empty cell fills with the lowest priorities first and
        # later chunks' tokens are mostly skipped.
        rows = rows[torch.argsort(batch.priority[rows])]
        chunks = torch.split(rows, 128) if self.fresh else (rows,)
        self.fresh = False
        for chunk in chunks:
            self._update(torch.index_select(x, 0, chunk), batch.priority[chunk], batch.global_index[chunk])

    def _update(self, x, prio, index) -> None:
        cell = torch.index_select(self.lut, 0, pattern(x).view(-1)).view(x.shape).add_(self.column)
        worst = torch.index_select(self.worst, 0, cell.view(-1)).view(x.shape)
        flat = flat_where(operator.lt, prio.unsqueeze(1), worst)
        if len(flat) == 0:
            return
        token = torch.div(flat, self.width, rounding_mode="floor")
        self._insert(cell.view(-1)[flat], prio[token], index[token], x.reshape(-1)[flat])

    def update_nonzero(self, nz, batch) -> None:
        """The same from a batch's non-zero entries (``pipeline.nonzero``): zeros are in no band,
        so an SAE's latents need no pass over their zeros."""
        prio = batch.priority[nz.rows]
        keep = prio < self.cut
        rows, prio, values = nz.rows[keep], prio[keep], nz.values[keep]
        cell = torch.index_select(self.lut, 0, pattern(values)).add_(nz.units[keep])
        better = prio < torch.index_select(self.worst, 0, cell)
        if bool(better.any()):
            self._insert(cell[better], prio[better], batch.global_index[rows[better]], values[better])

    def _insert(self, new_cell: torch.Tensor, new_prio: torch.Tensor, new_index: torch.Tensor, new_value: torch.Tensor) -> None:
        """Fold candidate (cell, priority, token, value) entries into the cells they touch."""
        touched = torch.unique(new_cell)
        cells = torch.cat([touched.repeat_interleave(self.size), new_cell])
        prios = torch.cat([self.prio[touched].reshape(-1), new_prio])
        indices = torch.cat([self.index[touched].reshape(-1), new_index])
        values = torch.cat([self.value[touched].reshape(-1), new_value])
        order = torch.argsort((cells << 34) | prios)  # cell, then priority (distinct per token)
        cells, prios, indices, values = cells[order], prios[order], indices[order], values[order]
        slot = torch.arange(len(cells), device=cells.device) - torch.searchsorted(cells, cells)
        kept = slot < self.size
        cells, slot = cells[kept], slot[kept]
        self.prio[touched] = EMPTY
        self.index[touched] = -1
        self.value[touched] = torch.nan
        self.prio[cells, slot] = prios[kept]
        self.index[cells, slot] = indices[kept]
        self.value[cells, slot] = values[kept]
        self.worst[touched] = self.prio[touched, -1]

    def result(self) -> dict[str, np.ndarray]:
        shape = (N_BANDS, self.width, self.size)
        return {
            "band_index": self.index.reshape(shape).cpu().numpy(),
            "band_value": self.value.reshape(shape).cpu().numpy(),
        }


class RunningRandomSamples:
    """The ``size`` counted tokens of lowest priority, and every neuron's value on them."""

    def __init__(self, size: int, width: int, device: torch.device):
        self.size = size
        self.prio = torch.full((size,), EMPTY, dtype=torch.int64, device=device)
        self.index = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.value = torch.full((size, width), torch.nan, dtype=torch.float32, device=device)

    def update(self, x: torch.Tensor, batch) -> None:
        chosen = batch.priority < self.prio[-1]
        if batch.counted is not None:
            chosen &= batch.counted
        token = chosen.nonzero(as_tuple=True)[0]
        if len(token) == 0:
            return
        prio = torch.cat([self.prio, batch.priority[token]])
        order = torch.argsort(prio)[: self.size]
        self.prio = prio[order]
        self.index = torch.cat([self.index, batch.global_index[token]])[order]
        self.value = torch.cat([self.value, x[token]])[order]

    def result(self) -> dict[str, np.ndarray]:
        return {"random_index": self.index.cpu().numpy(), "random_value": self.value.cpu().numpy()}


def _lowest(prio: np.ndarray, index: np.ndarray, keep: int, axis: int) -> np.ndarray:
    """Order along ``axis`` by (priority, index), empty slots last; the first ``keep``."""
    order = np.lexsort((index, prio), axis=axis)
    return np.take(order, np.arange(keep), axis=axis)


def merge_band_samples(a: dict, b: dict, seed: int) -> dict:
    index = np.concatenate([a["band_index"], b["band_index"]], axis=2)
    value = np.concatenate([a["band_value"], b["band_value"]], axis=2)
    prio = np.where(index >= 0, priority(index, seed), EMPTY)
    order = _lowest(prio, index, a["band_index"].shape[2], axis=2)
    return {"band_index": np.take_along_axis(index, order, 2), "band_value": np.take_along_axis(value, order, 2)}


def merge_random_samples(a: dict, b: dict, seed: int) -> dict:
    index = np.concatenate([a["random_index"], b["random_index"]])
    value = np.concatenate([a["random_value"], b["random_value"]])
    prio = np.where(index >= 0, priority(index, seed), EMPTY)
    order = _lowest(prio, index, len(a["random_index"]), axis=0)
    return {"random_index": index[order], "random_value": value[order]}
