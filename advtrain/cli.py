"""The ``advtrain`` command: one subcommand per recipe."""

from __future__ import annotations

import argparse
import logging
import warnings
import sys
from collections.abc import Sequence
from importlib import import_module

#: Subcommand name to (recipe module, one-line help).
RECIPES: dict[str, tuple[str, str]] = {
    "adversarial-training": ("advtrain.recipes.adversarial_training",
                             "FC100-100-10 with weight decay, dropout and per-layer adversarial pools, compared"),
    "evaluate": ("advtrain.recipes.evaluate", "robust error of a trained model at L∞/L2 budgets by an ensemble of attacks, "
                 "with checks for gradient masking"),
    "lipschitz": ("advtrain.recipes.lipschitz", "per-layer upper Lipschitz bounds (the paper's Table 5) of AlexNet or an MNIST model"),
    "units": ("advtrain.recipes.units", "inputs that most activate single units versus random directions (Figures 1 and 2)"),
    "table1": ("advtrain.recipes.table1", "the paper's Table 1: errors and minimal distortion of six MNIST models"),
    "table2": ("advtrain.recipes.table2", "the paper's Table 2: adversarial examples across models, and Gaussian noise"),
    "table3": ("advtrain.recipes.table3", "the paper's Tables 3 and 4: adversarial examples across training sets"),
    "train": ("advtrain.recipes.train", "train one of the paper's MNIST models and print its clean test error"),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser with one subparser per recipe."""
    parser = argparse.ArgumentParser(
        prog="advtrain",
        description="Adversarial training and analysis after Szegedy et al., 'Intriguing properties of neural networks'.",
    )
    subcommands = parser.add_subparsers(dest="recipe", metavar="RECIPE", required=True)
    for name, (module, help_text) in RECIPES.items():
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        import_module(module).add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the recipe named on the command line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):  # its tips and device lines
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # Lightning's own, per way
    args = build_parser().parse_args(argv)
    from advtrain.data import MNISTUnavailableError

    try:
        import_module(RECIPES[args.recipe][0]).run(args)
    except MNISTUnavailableError as error:
        print(f"advtrain: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
