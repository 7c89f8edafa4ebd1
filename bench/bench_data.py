"""First start against later starts: decoding a CIFAR-10 source, then loading the decode cache.

    python bench/bench_data.py DATA_DIR        # any layout; uses a fresh temporary cache

Prints a table: the decode (first run), the cached load (later runs), and a load after the
source's fingerprint is checked but nothing changed, in seconds, with the image count.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--repeat", type=int, default=3, help="cached loads to time (median)")
    args = parser.parse_args()
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="bench-data-")  # a cold cache

    from rich.console import Console
    from rich.table import Table

    from alexnet_mlflow import layouts

    root = layouts.resolve_data_dir(str(args.data_dir))
    start = time.perf_counter()
    first = layouts.load(root)
    decode = time.perf_counter() - start
    loads = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        again = layouts.load(root)
        loads.append(time.perf_counter() - start)
    assert again.digest == first.digest
    start = time.perf_counter()
    layouts.fingerprint(layouts.detect(root, False)[1])
    fingerprint = time.perf_counter() - start

    table = Table(title=f"{first.layout} at {root}: {len(first.train_labels):,} train + "
                        f"{len(first.test_labels):,} test images, {os.cpu_count()} CPU threads")
    table.add_column("start")
    table.add_column("seconds", justify="right")
    table.add_row("first run: decode and write the cache", f"{decode:.2f}")
    table.add_row(f"later runs: load the cache (median of {args.repeat})", f"{sorted(loads)[len(loads) // 2]:.2f}")
    table.add_row("  of which: fingerprint of the source", f"{fingerprint:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
