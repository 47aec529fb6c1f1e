"""``advtrain lipschitz``: the paper's Table 5, per-layer upper Lipschitz bounds.

For torchvision's AlexNet at 224×224 (pretrained weights where they can be loaded, else random
weights and a line saying so), or for one of the paper's MNIST models, untrained or from one or
more saved state dicts side by side (``advtrain adversarial-training`` saves one per way).

Reads top to bottom: settings, run folder, the model(s), the bounds, the table to the terminal,
the run folder and W&B.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch import nn

from advtrain.analysis import LipschitzTable, lipschitz_bounds
from advtrain.models import MODEL_BUILDERS, build_model
from advtrain.recipes.run_folder import add_common_arguments, load_weights, log_table, start_run_folder, start_wandb, write_results

#: Table 5 of the paper (AlexNet), for the side-by-side column.
PAPER_TABLE5 = {"Conv. 1": 2.75, "Conv. 2": 10, "Conv. 3": 7, "Conv. 4": 7.5, "Conv. 5": 11, "FC1": 3.12, "FC2": 4, "FC3": 4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``advtrain lipschitz``."""
    parser.add_argument("--model", default="alexnet", choices=["alexnet", *sorted(MODEL_BUILDERS)])
    parser.add_argument("--weights", default=None,
                        help="torchvision weights for alexnet, e.g. IMAGENET1K_V1 (random weights where they cannot be loaded)")
    parser.add_argument("--checkpoint", type=Path, nargs="+", default=None,
                        help="state dicts of the MNIST model to compare (e.g. runs/adversarial-training/pools.pt)")
    parser.add_argument("--image-size", type=int, default=224, help="AlexNet's input size")
    parser.add_argument("--quick", action="store_true", help="a smoke run: AlexNet at 64×64")
    add_common_arguments(parser, "runs/lipschitz")


def alexnet(weights: str | None, seed: int) -> tuple[nn.Module, str]:
    """torchvision's AlexNet with ``weights`` if they load, else seeded random weights; and which it got."""
    import torchvision

    if weights:
        try:
            return torchvision.models.alexnet(weights=weights), f"pretrained weights {weights}"
        except (OSError, RuntimeError, ValueError) as error:  # no network, no cached file, unknown name
            reason = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
            print(f"advtrain lipschitz: could not load AlexNet weights {weights} ({reason}); using random weights")
            torch.manual_seed(seed)
            return torchvision.models.alexnet(weights=None), f"random weights (seed {seed}): {weights} could not be loaded"
    torch.manual_seed(seed)
    return torchvision.models.alexnet(weights=None), f"random weights (seed {seed})"


def models_to_bound(args: argparse.Namespace) -> tuple[list[tuple[str, nn.Module]], tuple[int, ...], str]:
    """The labelled models, their input shape and a line on their weights."""
    if args.model == "alexnet":
        model, weights_line = alexnet(args.weights, args.seed)
        size = 64 if args.quick else args.image_size
        return [("alexnet", model)], (3, size, size), weights_line
    if not args.checkpoint:
        torch.manual_seed(args.seed)
        paper_model = build_model(args.model)
        return [(args.model, paper_model.module)], paper_model.input_shape, f"untrained (seed {args.seed})"
    labelled = []
    for path in args.checkpoint:
        paper_model = build_model(args.model)
        state = load_weights(path, "lipschitz")
        try:
            paper_model.module.load_state_dict(state)
        except RuntimeError as error:
            raise SystemExit(f"advtrain lipschitz: {path} is not a state dict of {args.model}: {error}") from error
        labelled.append((path.stem if [p.stem for p in args.checkpoint].count(path.stem) == 1 else str(path),
                         paper_model.module))
    return labelled, paper_model.input_shape, "trained: " + ", ".join(str(p) for p in args.checkpoint)


def markdown(tables: list[tuple[str, LipschitzTable]], weights_line: str) -> str:
    """One table; with several models, one bound column per model over the same layers."""
    if len(tables) == 1:
        return tables[0][1].markdown() + f"\nWeights: {weights_line}.\n"
    first = tables[0][1]
    header = "| layer | kind | size | " + " | ".join(label for label, _ in tables) + " |"
    lines = [header, "|---|---|---|" + "---|" * len(tables)]
    for index, row in enumerate(first.rows):
        bounds = " | ".join(f"{table.rows[index].bound:.4g}" for _, table in tables)
        lines.append(f"| {row.name} | {row.kind} | {row.size} | {bounds} |")
    lines.append("| network (along the graph) | | | " + " | ".join(f"{table.network_bound:.4g}" for _, table in tables) + " |")
    return "\n".join(lines) + f"\n\nWeights: {weights_line}.\n"


def run(args: argparse.Namespace) -> list[tuple[str, LipschitzTable]]:
    """Bound every layer of every model, write and print the table."""
    start_run_folder(args)
    labelled, input_shape, weights_line = models_to_bound(args)
    tables, seconds = [], []
    for label, model in labelled:
        started = time.perf_counter()
        tables.append((label, lipschitz_bounds(model, input_shape)))
        seconds.append(time.perf_counter() - started)
    text = markdown(tables, weights_line)
    if args.model == "alexnet":
        text += "\n" + beside_paper(tables[0][1])
    text += f"\nComputed in {', '.join(f'{s:.1f} s' for s in seconds)} on {device_line()}.\n"
    results = {"model": args.model, "input_shape": list(input_shape), "weights": weights_line,
               "tables": {label: table.to_dict() for label, table in tables}, "seconds": seconds}
    write_results(args, results, text)
    wandb_run = start_wandb(args, "lipschitz", args.model)
    if wandb_run is not None:
        for label, table in tables:
            log_table(wandb_run, f"lipschitz/{label}", ["layer", "kind", "size", "input size", "upper bound", "note"],
                      [[r.name, r.kind, r.size, "×".join(map(str, r.input_size)),
                        r.bound if math.isfinite(r.bound) else None, r.note] for r in table.rows])
            bound = table.network_bound
            wandb_run.summary[f"lipschitz/{label}/network_bound"] = bound if math.isfinite(bound) else None
        wandb_run.finish()
    return tables


def beside_paper(table: LipschitzTable) -> str:
    """AlexNet's conv and FC rows beside the paper's Table 5 (its AlexNet has 96-256-384-384-256 maps,
    torchvision's 64-192-384-256-256, so the sizes differ)."""
    weighted = [row for row in table.rows if row.weight_shape is not None]
    lines = ["| layer | size (ours) | ours | paper |", "|---|---|---|---|"]
    for (paper_name, paper_bound), row in zip(PAPER_TABLE5.items(), weighted):
        lines.append(f"| {paper_name} | {row.size} | {row.bound:.3g} | {paper_bound:g} |")
    return "\n".join(lines) + "\n"


def device_line() -> str:
    """Where the bounds were computed."""
    return f"CPU ({torch.get_num_threads()} threads)"
