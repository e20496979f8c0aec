"""The histogram's bins: a stored-data contract (the ``histograms`` table's ``bin`` column and
every group's counts are indices into them), read by the reduce, the index and the exports.

The bins are fixed before any data is seen: 8 per octave of |x| over [2**-8, 2**8), each sign,
read straight from a float32's bits (exponent and top 3 mantissa bits), plus one bin for
|x| < 2**-8 (zero included). Values beyond 2**8 fall in the end bins, whose outer edges are
infinite; min and max (in ``neuron_stats``) give the true range. Relative bin width is at most
12.5 %, so quantiles read from the counts are within one bin of the truth.

Bin i (0..256): 0..127 negative, most negative first; 128 the near-zero bin; 129..256 positive.
``pipeline.histogram`` counts values into them on the device.
"""

from __future__ import annotations

import numpy as np

PER_OCTAVE_BITS = 3
E_MIN, E_MAX = -8, 8
N_MAG = (E_MAX - E_MIN) << PER_OCTAVE_BITS  # 128 magnitude bins per sign
N_BINS = 2 * N_MAG + 1
ZERO = N_MAG
SHIFT = 23 - PER_OCTAVE_BITS
FIRST = (127 + E_MIN) << PER_OCTAVE_BITS


def _magnitude_edges() -> np.ndarray:
    """The N_MAG + 1 increasing edges of the magnitude bins: 2**e * (1 + j/8)."""
    bits = (np.arange(N_MAG + 1, dtype=np.int64) + FIRST) << SHIFT
    return bits.astype(np.int32).view(np.float32).astype(np.float64)


def bin_edges() -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of every bin, [N_BINS] each; the two end bins reach to -inf and +inf."""
    mag = _magnitude_edges()
    lo = np.concatenate([-mag[::-1][:-1], [-mag[0]], mag[:-1]])
    hi = np.concatenate([-mag[::-1][1:], [mag[0]], mag[1:]])
    lo[0], hi[-1] = -np.inf, np.inf
    return lo, hi


def quantiles(counts: np.ndarray, qs: tuple[float, ...], lo_clip: np.ndarray, hi_clip: np.ndarray) -> np.ndarray:
    """[len(qs), width] quantiles interpolated linearly inside the bin holding each, and clipped
    to each neuron's [min, max] (which also bounds the infinite end bins)."""
    lo, hi = bin_edges()
    cum = np.cumsum(counts, axis=1)
    total = cum[:, -1:]
    out = np.empty((len(qs), counts.shape[0]))
    rows = np.arange(counts.shape[0])
    for i, q in enumerate(qs):
        target = q * total[:, 0]
        b = np.minimum((cum < target[:, None]).sum(axis=1), N_BINS - 1)
        before = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
        inside = np.maximum(counts[rows, b], 1)
        frac = np.clip((target - before) / inside, 0, 1)
        left = np.maximum(lo[b], lo_clip)
        right = np.minimum(hi[b], hi_clip)
        value = left + frac * (right - left)
        out[i] = np.where(total[:, 0] > 0, np.clip(value, lo_clip, hi_clip), np.nan)
    return out
