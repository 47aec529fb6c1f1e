"""``advtrain table1``: the paper's Table 1, each model's errors and the distortion to 0% accuracy.

For FC10(1e-4), FC10(1e-2), FC10(1), FC100-100-10, FC200-200-10 and AE400-10: training error, test
error, and the average minimal distortion that brings a seeded subset of training images to 0%
accuracy (the box-constrained search on every image, toward a random wrong label as the paper did or
the nearest one (``--target``); 0 for an image already wrong).
Also saves the adversarial sets (``advtrain table2`` can reuse the models) and a Figure-5 PNG.

Reads top to bottom: settings, run folder, data, then per model: train or load, errors, search;
then the table, the figure, W&B.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass


from advtrain.models import build_model
from advtrain.recipes.paper_models import (
    TABLE1_MODELS,
    add_training_arguments,
    error_rate,
    mean_distortion_to_zero_accuracy,
    minimal_adversarial,
    prepared_mnist,
    save_figure5,
    seeded_subset,
    trained_model,
    training_settings,
)
from advtrain.recipes.run_folder import (add_common_arguments, log_image, log_table, save_weights, start_run_folder,
                                        start_wandb, write_results)

#: The paper's Table 1: (train error %, test error %, average minimal distortion).
PAPER = {"fc10-1e-4": (6.7, 7.4, 0.062), "fc10-1e-2": (10, 9.4, 0.1), "fc10-1": (21.2, 20, 0.14),
         "fc100-100-10": (0, 1.64, 0.058), "fc200-200-10": (0, 1.54, 0.065), "ae400-10": (0.57, 1.9, 0.086)}


@dataclass
class Table1Row:
    """One model's line of Table 1."""

    model: str
    train_error: float
    test_error: float
    mean_distortion: float
    success_rate: float
    seconds: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``advtrain table1``."""
    parser.add_argument("--models", nargs="+", choices=TABLE1_MODELS, default=list(TABLE1_MODELS))
    parser.add_argument("--figure-model", default="fc100-100-10", help="whose adversarial examples the PNG shows")
    add_training_arguments(parser, "runs/table1/models")
    add_common_arguments(parser, "runs/table1")


def run(args: argparse.Namespace) -> list[Table1Row]:
    """Train (or load) each model, measure it, write and print the table."""
    start_run_folder(args)
    (args.output / "adversarial").mkdir(exist_ok=True)
    data = prepared_mnist(args)
    train_images, train_labels = data.train_set.tensors
    test_images, test_labels = data.test_set.tensors
    examples = 10 if args.quick else args.examples
    images, labels = seeded_subset(train_images, train_labels, examples, args.seed)
    wandb_run = start_wandb(args, "table1")
    rows: list[Table1Row] = []
    figure = None
    for step, name in enumerate(args.models):
        started = time.perf_counter()
        model = trained_model(name, args, data)
        adversarial, result, correct = minimal_adversarial(model, images, labels, args.seed, args.target)
        row = Table1Row(build_model(name).name, error_rate(model, train_images, train_labels),
                        error_rate(model, test_images, test_labels), mean_distortion_to_zero_accuracy(result, correct),
                        result.success_rate, time.perf_counter() - started)
        rows.append(row)
        save_weights(args.output / "adversarial" / f"{name}.pt",
                     {"images": images, "labels": labels, "adversarial": adversarial, "model": name, "target": args.target,
                      "training": training_settings(name, args)})
        if name == args.figure_model or (figure is None and name == args.models[-1]):
            figure = save_figure5(images, adversarial, args.output / f"figure5_{name}.png")
        if wandb_run is not None:
            wandb_run.log({f"table1/{name}/train_err": row.train_error, f"table1/{name}/test_err": row.test_error,
                           f"table1/{name}/mean_distortion": row.mean_distortion}, step=step)
    text = markdown(args, rows, examples)
    write_results(args, {"examples": examples, "target": args.target, "rows": [asdict(r) for r in rows]}, text)
    if wandb_run is not None:
        log_table(wandb_run, "table1/result", list(asdict(rows[0])), [list(asdict(r).values()) for r in rows])
        if figure is not None:
            log_image(wandb_run, "table1/figure5", figure, "rows: original, perturbation ×10, adversarial")
        wandb_run.finish()
    return rows


def markdown(args: argparse.Namespace, rows: list[Table1Row], examples: int) -> str:
    """Ours beside the paper's."""
    lines = ["| model | train err (paper) | test err (paper) | av. min. distortion (paper) | found | time |",
             "|---|---|---|---|---|---|"]
    for name, row in zip(args.models, rows):
        paper = PAPER[name]
        dist = "∞ (search failed on some)" if math.isinf(row.mean_distortion) else f"{row.mean_distortion:.3f}"
        lines.append(f"| {row.model} | {100 * row.train_error:.2f}% ({paper[0]:g}%) | {100 * row.test_error:.2f}% "
                     f"({paper[1]:g}%) | {dist} ({paper[2]:g}) | {100 * row.success_rate:.0f}% | {row.seconds:.0f} s |")
    targets = "a seeded random wrong label per image" if args.target == "random" else "the nearest wrong label"
    return "\n".join(lines) + (f"\n\nDistortion: sqrt(mean r²) to reach 0% accuracy on {examples} seeded training "
                               f"images (box-constrained search, margin loss, toward {targets}).\n")
