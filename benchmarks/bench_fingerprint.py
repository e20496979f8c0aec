"""What fingerprinting a model's files costs, now that every byte is hashed: a file of ``--gib``
GiB of random bytes hashed by ``pipeline.fingerprint`` (xxh3-128, 8 MiB reads, one thread),
first with the page cache warm (a cold disk adds its own read time), then again with its digest
cached (keyed on path, size, inode and times: no byte is read). Compared with the time to read
the same file alone. Prints one JSON document. Usage:

    python benchmarks/bench_fingerprint.py [--gib 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="actscope-bench-fingerprint-") as root:
        os.environ["XDG_CACHE_HOME"] = os.path.join(root, "cache")
        from actscope.pipeline.fingerprint import _DigestCache

        path = os.path.join(root, "weights.bin")
        block = os.urandom(64 << 20)
        with open(path, "wb") as f:
            f.writelines(block for _ in range(int(args.gib * 16)))
        size = os.path.getsize(path)
        start = time.perf_counter()
        with open(path, "rb") as f:
            while f.read(8 << 20):
                pass
        read_s = time.perf_counter() - start
        timings = {}
        for name in ("hash_s", "cached_s"):
            cache = _DigestCache()
            start = time.perf_counter()
            cache.digest(path)
            cache.save()
            timings[name] = time.perf_counter() - start
    print(json.dumps({
        "machine": platform.machine(), "cpus": os.cpu_count(), "bytes": size,
        "read_s": round(read_s, 3), "hash_s": round(timings["hash_s"], 3), "cached_s": round(timings["cached_s"], 5),
        "hash_gib_per_s": round(size / 2**30 / timings["hash_s"], 2), "hash_over_read": round(timings["hash_s"] / read_s, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
