"""``advtrain table3``: the paper's Tables 3 and 4, adversarial examples across training sets.

FC100-100-10 and FC123-456-10 trained on P′ (the first 30,000 training images), FC100-100-10′ on P″
(the other 30,000): their train and test errors (Table 3). Minimal adversarial examples of a
seeded subset of test images made for each, tested on all three; the same perturbations magnified
to sqrt(mean r²) = 0.1; Gaussian noise of stddev 0.06 and 0.1 as controls (Table 4).

Reads top to bottom: settings, run folder, the two halves, the three models, their errors, the
example sets, the error matrix, the tables, W&B.
"""

from __future__ import annotations

import argparse
import time

from advtrain.recipes.paper_models import (
    add_training_arguments,
    error_rate,
    gaussian_noise,
    magnified,
    mean_change,
    minimal_adversarial,
    prepared_mnist,
    seeded_subset,
    trained_model,
)
from advtrain.recipes.run_folder import add_common_arguments, log_table, start_run_folder, start_wandb, write_results

#: (label, model name, training half)
MODELS = (("FC100", "fc100-100-10", "P1"), ("FC123", "fc123-456-10", "P1"), ("FC100′", "fc100-100-10", "P2"))
#: The paper's Table 3 (train %, test %) and Table 4 (errors % on FC100, FC123, FC100′).
PAPER_TABLE3 = {"FC100": (0, 2.4), "FC123": (0, 2.5), "FC100′": (0, 2.3)}
PAPER_TABLE4 = {
    "distorted for FC100": [100, 26.2, 5.9], "distorted for FC123": [6.25, 100, 5.1],
    "distorted for FC100′": [8.2, 8.2, 100], "Gaussian noise 0.06": [2.2, 2.6, 2.4],
    "distorted for FC100, magnified to 0.1": [100, 98, 43], "distorted for FC123, magnified to 0.1": [96, 100, 22],
    "distorted for FC100′, magnified to 0.1": [27, 50, 100], "Gaussian noise 0.1": [2.6, 2.8, 2.7],
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``advtrain table3``."""
    add_training_arguments(parser, "runs/table3/models")
    add_common_arguments(parser, "runs/table3")


def run(args: argparse.Namespace) -> dict:
    """Train the three models, make the example sets, measure every model on every set."""
    start_run_folder(args)
    started = time.perf_counter()
    halves = {half: prepared_mnist(args, train_subset=half) for half in ("P1", "P2")}
    test_images, test_labels = halves["P1"].test_set.tensors
    models, table3 = {}, {}
    for label, name, half in MODELS:
        models[label] = trained_model(name, args, halves[half], label=f"{name}-{half}")
        table3[label] = {"trained_on": half, "train_error": error_rate(models[label], *halves[half].train_set.tensors),
                         "test_error": error_rate(models[label], test_images, test_labels)}
    images, labels = seeded_subset(test_images, test_labels, 10 if args.quick else args.examples, args.seed)
    searched = {label: minimal_adversarial(model, images, labels, args.seed, args.target) for label, model in models.items()}
    adversarial = {label: found[0] for label, found in searched.items()}
    search_success = {label: found[1].success_rate for label, found in searched.items()}
    sets = {f"distorted for {label}": changed for label, changed in adversarial.items()}
    sets["Gaussian noise 0.06"] = gaussian_noise(images, 0.06, args.seed, args.clip_noise)
    sets.update({f"distorted for {label}, magnified to 0.1": magnified(images, changed, 0.1)
                 for label, changed in adversarial.items()})
    sets["Gaussian noise 0.1"] = gaussian_noise(images, 0.1, args.seed + 1, args.clip_noise)
    table4 = {row: {label: error_rate(model, changed, labels) for label, model in models.items()} for row, changed in sets.items()}
    distortions = {row: mean_change(images, changed) for row, changed in sets.items()}
    results = {"examples": len(images), "target": args.target, "table3": table3, "table4": table4, "mean_distortion": distortions,
               "search_success": search_success, "seconds": time.perf_counter() - started}
    write_results(args, results, markdown(table3, table4, distortions, len(images)))
    wandb_run = start_wandb(args, "table3")
    if wandb_run is not None:
        log_table(wandb_run, "table3/result", ["model", "trained on", "train err %", "test err %"],
                  [[k, v["trained_on"], 100 * v["train_error"], 100 * v["test_error"]] for k, v in table3.items()])
        log_table(wandb_run, "table4/result", ["examples", *models, "av. distortion"],
                  [[row, *(100 * errors[m] for m in models), distortions[row]] for row, errors in table4.items()])
        wandb_run.finish()
    return results


def markdown(table3: dict, table4: dict, distortions: dict, examples: int) -> str:
    """Tables 3 and 4, ours with the paper's in parentheses."""
    lines = ["| model | trained on | train err (paper) | test err (paper) |", "|---|---|---|---|"]
    for label, row in table3.items():
        paper = PAPER_TABLE3[label]
        lines.append(f"| {label} | {row['trained_on']} | {100 * row['train_error']:.2f}% ({paper[0]:g}%) "
                     f"| {100 * row['test_error']:.2f}% ({paper[1]:g}%) |")
    labels = list(table3)
    lines += ["", "| examples | " + " | ".join(labels) + " | av. distortion |", "|---|" + "---|" * (len(labels) + 1)]
    for row, errors in table4.items():
        cells = [f"{100 * errors[m]:.1f} ({p:g})" for m, p in zip(labels, PAPER_TABLE4[row])]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {distortions[row]:.3f} |")
    return "\n".join(lines) + (f"\n\nError % (the paper's in parentheses) on {examples} seeded test images; "
                               "P1 and P2 are the paper's disjoint halves P′ and P″.\n")
