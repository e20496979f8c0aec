"""Histograms of every neuron on bins that every shard shares, so counts add exactly: the
bins are ``storage.bins`` (a stored-data contract); this module counts values into them on the
device, from each float32's bits."""

from __future__ import annotations

import numpy as np
import torch

from actscope.storage.bins import E_MAX, E_MIN, FIRST, N_BINS, N_MAG, PER_OCTAVE_BITS, SHIFT, ZERO, bin_edges, quantiles

__all__ = ["E_MAX", "E_MIN", "N_BINS", "PER_OCTAVE_BITS", "ZERO", "RunningHistogram", "bin_edges", "bin_index", "pattern", "pattern_bins", "quantiles"]


def bin_index(x: torch.Tensor) -> torch.Tensor:
    """The bin of every value (float32 in, int64 out, same shape)."""
    bits = x.float().abs().view(torch.int32)
    mag = (bits >> SHIFT).to(torch.int64) - FIRST
    index = torch.where(x > 0, ZERO + 1 + mag.clamp(max=N_MAG - 1), ZERO - 1 - mag.clamp(max=N_MAG - 1))
    return torch.where(mag < 0, ZERO, index)


def pattern(x: torch.Tensor) -> torch.Tensor:
    """A float32's top 12 bits (sign, exponent, 3 mantissa bits) decide its bin: each value's
    pattern as an index 0..4095 (int32, same shape) into :func:`pattern_bins`."""
    return (x.float().view(torch.int32) >> SHIFT).add_(2048)


def pattern_bins() -> torch.Tensor:
    """The bin of each of the 4096 patterns (int64, on the CPU)."""
    top = torch.arange(-2048, 2048, dtype=torch.int32) << SHIFT
    return bin_index(top.view(torch.float32))


class RunningHistogram:
    """Counts [width, N_BINS] of each neuron's activations over the counted tokens.

    Per batch: one shift of the float bits, one lookup in a 4096-entry table, one bincount. The
    table holds ``bin * width`` and the neuron is added, so the counts are kept bin-major: the
    neurons of one token land in nearby counters (half the time of neuron-major counts).
    ``index_select`` does the lookup, several times faster than indexing with ``table[top]``.
    """

    def __init__(self, width: int, device: torch.device):
        self.width = width
        self.counts = torch.zeros(N_BINS * width, dtype=torch.int64, device=device)
        self.lut = (pattern_bins() * width).to(torch.int32).to(device)
        self.column = torch.arange(width, device=device, dtype=torch.int32)

    def update(self, acts: torch.Tensor, first_index: int, counted: torch.Tensor | None) -> None:
        x = acts if counted is None else acts[counted]
        if x.shape[0]:
            index = torch.index_select(self.lut, 0, pattern(x).view(-1)).view(x.shape).add_(self.column)
            self.counts += torch.bincount(index.view(-1), minlength=len(self.counts))

    def update_nonzero(self, nz) -> None:
        """The same counts from a batch's non-zero entries (``pipeline.nonzero``); each unit's
        zeros go to the near-zero bin by count."""
        if len(nz.values):  # added in place: a bincount would allocate N_BINS x width counters a batch
            index = torch.index_select(self.lut, 0, pattern(nz.values)).add_(nz.units.to(torch.int32))
            self.counts.index_add_(0, index, torch.ones_like(index, dtype=torch.int64))
        self.counts[ZERO * self.width:(ZERO + 1) * self.width] += nz.n - nz.per_unit()

    def result(self) -> dict[str, np.ndarray]:
        return {"hist": self.counts.reshape(N_BINS, self.width).T.contiguous().cpu().numpy()}
