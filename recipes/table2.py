"""``advtrain table2``: the paper's Table 2, adversarial examples made for one model, tested on all.

Each Table 1 model's minimal adversarial examples of a seeded subset of training images (loaded from
``advtrain table1``'s run folder where they are there, else made here), and the error every model
makes on them; plus Gaussian noise of stddev 0.1 and 0.3 on the same images as controls.

Reads top to bottom: settings, run folder, data, models (trained or reused), one set of examples
per model, the cross-model error matrix, noise rows, the table, W&B.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from advtrain.recipes.paper_models import (
    TABLE1_MODELS,
    add_training_arguments,
    error_rate,
    gaussian_noise,
    mean_change,
    minimal_adversarial,
    prepared_mnist,
    seeded_subset,
    trained_model,
    training_settings,
)
from advtrain.recipes.run_folder import add_common_arguments, log_table, start_run_folder, start_wandb, write_results

#: The paper's Table 2: row -> (errors % on the columns in TABLE1_MODELS order, average distortion).
PAPER = {
    "fc10-1e-4": ([100, 11.7, 22.7, 2, 3.9, 2.7], 0.062),
    "fc10-1e-2": ([87.1, 100, 35.2, 35.9, 27.3, 9.8], 0.1),
    "fc10-1": ([71.9, 76.2, 100, 48.1, 47, 34.4], 0.14),
    "fc100-100-10": ([28.9, 13.7, 21.1, 100, 6.6, 2], 0.058),
    "fc200-200-10": ([38.2, 14, 23.8, 20.3, 100, 2.7], 0.065),
    "ae400-10": ([23.4, 16, 24.8, 9.4, 6.6, 100], 0.086),
    "noise 0.1": ([5.0, 10.1, 18.3, 0, 0, 0.8], 0.1),
    "noise 0.3": ([15.6, 11.3, 22.7, 5, 4.3, 3.1], 0.3),
}
NOISE = (0.1, 0.3)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``advtrain table2``."""
    parser.add_argument("--models", nargs="+", choices=TABLE1_MODELS, default=list(TABLE1_MODELS))
    parser.add_argument("--table1", type=Path, default=Path("runs/table1"),
                        help="advtrain table1's run folder: its adversarial sets are reused when they match")
    add_training_arguments(parser, "runs/table1/models")
    add_common_arguments(parser, "runs/table2")


def examples_for(name: str, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                 args: argparse.Namespace) -> torch.Tensor:
    """The model's adversarial set of ``images``: table1's where it was made for these images, with the
    same target policy, by a model trained with the same settings; else made now."""
    saved = args.table1 / "adversarial" / f"{name}.pt"
    if saved.exists():
        stored = torch.load(saved, map_location="cpu", weights_only=True)
        same_images = stored["images"].shape == images.shape and torch.equal(stored["images"], images)
        same_model = stored.get("training") == training_settings(name, args)  # not a quick model's examples
        if same_images and same_model and stored.get("target") == args.target:
            print(f"{name}: adversarial examples from {saved}")
            return stored["adversarial"]
    return minimal_adversarial(model, images, labels, args.seed, args.target)[0]


def run(args: argparse.Namespace) -> dict:
    """The cross-model error matrix and the noise rows."""
    start_run_folder(args)
    started = time.perf_counter()
    data = prepared_mnist(args)
    images, labels = seeded_subset(*data.train_set.tensors, 10 if args.quick else args.examples, args.seed)
    models = {name: trained_model(name, args, data) for name in args.models}
    sets = {name: examples_for(name, model, images, labels, args) for name, model in models.items()}
    sets.update({f"noise {s:g}": gaussian_noise(images, s, args.seed, args.clip_noise) for s in NOISE})
    matrix = {row: {column: error_rate(model, changed, labels) for column, model in models.items()}
              for row, changed in sets.items()}
    distortions = {row: mean_change(images, changed) for row, changed in sets.items()}
    results = {"examples": len(images), "target": args.target, "errors": matrix, "mean_distortion": distortions,
               "seconds": time.perf_counter() - started}
    text = markdown(args.models, matrix, distortions, len(images))
    write_results(args, results, text)
    wandb_run = start_wandb(args, "table2")
    if wandb_run is not None:
        columns = ["examples made for", *args.models, "av. distortion"]
        log_table(wandb_run, "table2/result", columns,
                  [[row, *(100 * matrix[row][c] for c in args.models), distortions[row]] for row in matrix])
        wandb_run.summary.update({f"table2/{row}/av_distortion": value for row, value in distortions.items()})
        wandb_run.finish()
    return results


def markdown(models: list[str], matrix: dict, distortions: dict, examples: int) -> str:
    """Ours with the paper's in parentheses, errors in %."""
    order = list(TABLE1_MODELS)
    lines = ["| made for | " + " | ".join(models) + " | av. distortion |", "|---|" + "---|" * (len(models) + 1)]
    for row, errors in matrix.items():
        paper_errors, paper_distortion = PAPER[row]
        cells = [f"{100 * errors[c]:.1f} ({paper_errors[order.index(c)]:g})" for c in models]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {distortions[row]:.3f} ({paper_distortion:g}) |")
    return "\n".join(lines) + (f"\n\nError % on the column model (the paper's in parentheses) of {examples} seeded "
                               "training images made adversarial for the row model, or with Gaussian noise.\n")
