"""Longer settings of the evaluation's untargeted search on one model of the evaluation benchmark.

    python benchmarks/search_variants.py [--model "small-resnet plain"] [--examples 100]
        [--variant NAME=KEYWORDS ...] [--output benchmarks/results/search_variants]

Each variant is ``BoxLBFGS(**KEYWORDS)`` (``KEYWORDS`` a Python dict body, e.g.
``polish400=loss="both",polish_steps=400``), run untargeted on the first ``--examples`` MNIST test
images of the model that ``benchmarks/evaluation_benchmark.py`` trains (and caches in
``runs/evaluation-benchmark``). Reports each variant's mean L2 size over 28 (the benchmark's
distortion for an MNIST image) and its seconds on one thread; the first variant is the default,
``evaluation_search()`` (a ``--variant`` list replaces all four, so name its first one
``evaluation_search``). Foolbox's per-example best on the same images is in that benchmark's
results, so no variant needs Foolbox run again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from advtrain.attacks import BoxLBFGS
from advtrain.data import MNISTDataModule
from advtrain.recipes.run_folder import write_json
from evaluation_benchmark import MODELS, train  # benchmarks/ is on the path when this runs as a script

DEFAULT_VARIANTS = ['evaluation_search=loss="both",polish_steps=50,clean_walk_steps=50',
                    'polish100_walk100=loss="both",polish_steps=100,clean_walk_steps=100',
                    'polish0_walk100=loss="both",clean_walk_steps=100',
                    'before_clean_walk=loss="both",polish_steps=100']


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=KEYWORDS`` as a name and BoxLBFGS keyword arguments."""
    name, _, keywords = text.partition("=")
    return name, eval(f"dict({keywords})", {"__builtins__": {"dict": dict}})  # keyword literals only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-resnet plain", choices=list(MODELS))
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--variant", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--models-dir", type=Path, default=Path("runs/evaluation-benchmark"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/search_variants"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = MNISTDataModule(args.data_dir)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    images, labels = (t[: args.examples] for t in data.test_set.tensors)
    model = train(args.model, *MODELS[args.model], data, args.models_dir)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    measured = {}
    for name, keywords in map(parse_variant, args.variant):
        started = time.perf_counter()
        result = BoxLBFGS(**keywords)(model, images, labels, target="untargeted")
        seconds = time.perf_counter() - started
        found = result.success
        measured[name] = {"settings": keywords, "found": int(found.sum()), "seconds": seconds,
                          "mean_l2_over_28": float(result.l2[found].mean() / 28),
                          "l2_per_example": torch.where(found, result.l2, torch.full_like(result.l2, float("inf"))).tolist()}
        print(f"{name}: found {int(found.sum())}, mean L2/28 {measured[name]['mean_l2_over_28']:.6f}, {seconds:.0f} s",
              flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", {"model": args.model, "examples": args.examples, "threads": 1,
                                              "variants": measured})


if __name__ == "__main__":
    main()
