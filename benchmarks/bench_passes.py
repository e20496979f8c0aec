"""What one pass over a batch's activations costs: the unit in which the per-unit statistics pay.

A batch of ``--tokens`` x ``--width`` float32 activations (ReLU of a normal: half zeros, like an
MLP's post-activations), one torch thread as a worker of one CPU runs; for each elementary pass
the best of three means of ``--repeat`` calls, in milliseconds. Compare with the forward of the
same batch (``bench_profile.py``): the statistics together need several such passes. Prints one
JSON document. Usage:

    python benchmarks/bench_passes.py [--tokens 2048] [--width 4096]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def best_ms(function, repeat: int) -> float:
    function()
    means = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeat):
            function()
        means.append((time.perf_counter() - start) / repeat * 1e3)
    return round(min(means), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.tokens, args.width).relu_()
    cells = torch.bitwise_and(x.view(torch.int32) >> 12, (1 << 20) - 1).view(-1)
    passes = {
        "sum over tokens (one read)": lambda: x.sum(0),
        "max over tokens": lambda: x.amax(0),
        "compare with a row (a bool written)": lambda: torch.gt(x, x[0]),
        "copy": lambda: x.clone(),
        "bincount into 1M counters (a scatter)": lambda: torch.bincount(cells, minlength=1 << 20),
    }
    print(json.dumps({
        "benchmark": "passes", "machine": f"{platform.machine()} {torch.get_num_threads()} torch thread",
        "batch": [args.tokens, args.width], "megabytes": round(x.numel() * 4 / 1e6, 1),
        "ms": {name: best_ms(f, args.repeat) for name, f in passes.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
