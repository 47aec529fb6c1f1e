"""What checking MNIST's MD5s on every load costs, against reading the same files.

`python benchmarks/mnist_check_cost.py [--data-dir ROOT]`: the shortest of five rounds each of
reading the four IDX files and of verifying them (:func:`advtrain.data.verify_mnist`), in the same
process, files in the page cache after a first read. Writes
``benchmarks/results/mnist_check_cost/results.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from advtrain.data import verify_mnist
from advtrain.data.sources import MNIST_MD5S, raw_folder
from advtrain.recipes.run_folder import write_json


def shortest(action, rounds: int = 5) -> float:
    """The shortest wall time of ``rounds`` calls of ``action``, in seconds."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("ADVTRAIN_DATA_DIR", "../shared/data"))
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/mnist_check_cost"))
    args = parser.parse_args()
    folder = raw_folder(args.data_dir)
    paths = [folder / name for name in MNIST_MD5S]
    read = shortest(lambda: [path.read_bytes() for path in paths])
    verify = shortest(lambda: verify_mnist(folder))
    result = {"bytes": sum(path.stat().st_size for path in paths), "read_seconds": read, "verify_seconds": verify,
              "verify_over_read": verify / read, "machine": platform.processor() or platform.machine()}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", result)
    print(f"read {read * 1000:.0f} ms, verify {verify * 1000:.0f} ms: {verify / read:.2f}x reading")


if __name__ == "__main__":
    main()
