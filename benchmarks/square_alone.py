"""Square alone: our gradient-free attack beside torchattacks' Square (Croce & Hein's standard settings,
5,000 queries, as ``evaluation_gap.peer_attacks`` builds it) on one saved model, robust error per budget, each alone on the same test images.

    python benchmarks/square_alone.py RUN_FOLDER WAY [--norm l2] [--epsilons 1.5 2.0] [--examples 100]
        [--square-from FILE] [--output benchmarks/results/square_alone]

``--square-from`` loads ``Square`` from another file instead of ``advtrain.attacks`` (an older
version: ``git show REV:advtrain/attacks/square.py > FILE``), and labels its rows with the file's
name. Writes ``results.json`` to ``--output``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

from advtrain.recipes.run_folder import write_json
from evaluation_benchmark import saved_way_on_test_images, verified  # benchmarks/ is on the path as a script
from evaluation_gap import peer_attacks

QUERIES = 5000


def square_class(path: Path | None) -> type:
    """``Square`` from ``advtrain.attacks``, or from the file at ``path``."""
    if path is None:
        from advtrain.attacks import Square

        return Square
    spec = importlib.util.spec_from_file_location(f"square_from_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"square_alone: {path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Square


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("way")
    parser.add_argument("--norm", choices=["linf", "l2"], default="l2")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.5, 2.0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--square-from", type=Path, default=None)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/square_alone"))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    name, model, images, labels, correct = saved_way_on_test_images(args.run_folder, args.way, args.examples, args.data_dir)
    ours = square_class(args.square_from)
    label = "advtrain" if args.square_from is None else f"advtrain from {args.square_from.name}"
    rows = []
    for epsilon in args.epsilons:
        attacks = {label: lambda: ours(epsilon=epsilon, norm=args.norm, queries=QUERIES)(
                       model, images, labels, generator=torch.Generator().manual_seed(0)).adversarial,
                   "torchattacks": lambda: peer_attacks(model, args.norm, epsilon)["Square"](images, labels)}
        for attack, run in attacks.items():
            started = time.perf_counter()
            points = run().detach()
            error = float((verified(model, images, labels, points, args.norm, epsilon) | ~correct).float().mean())
            rows.append({"attack": attack, "epsilon": epsilon, "robust_error": error, "seconds": time.perf_counter() - started})
            print(f"{attack} at {args.norm} {epsilon:g}: {error:.0%} ({rows[-1]['seconds']:.0f} s)", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", {"model": name, "run_folder": str(args.run_folder), "norm": args.norm,
                                              "examples": len(labels), "queries": QUERIES,
                                              "threads": torch.get_num_threads(), "rows": rows})


if __name__ == "__main__":
    main()
