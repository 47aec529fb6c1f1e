"""What every recipe does around its experiment: the run folder, its results, and its W&B run."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def add_common_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    """``--output``, ``--wandb``, ``--seed`` and ``--data-dir``, as every recipe takes them."""
    parser.add_argument("--output", type=Path, default=Path(output), help="run folder")
    parser.add_argument("--wandb", choices=["offline", "online", "off"], default=None,
                        help="W&B mode (default: online with WANDB_API_KEY set, else offline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="MNIST root (default: $ADVTRAIN_DATA_DIR, else ~/.cache/advtrain)")


def wandb_mode(args: argparse.Namespace) -> str:
    """``args.wandb``, else online where an API key is set and offline otherwise."""
    if getattr(args, "wandb", None):
        return args.wandb
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def config_of(args: argparse.Namespace) -> dict[str, Any]:
    """The settings as plain JSON data."""
    settings = {key: value for key, value in vars(args).items() if not callable(value)}
    return json.loads(json.dumps(settings, default=str))  # paths (also in lists) as strings


def start_run_folder(args: argparse.Namespace) -> Path:
    """Create the run folder and write the config and the command line into it."""
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "config.json").write_text(json.dumps(config_of(args), indent=2))
    (args.output / "command.txt").write_text(" ".join(["advtrain", *sys.argv[1:]]) + "\n")
    return args.output


def write_results(args: argparse.Namespace, results: Any, markdown: str) -> None:
    """``results.json`` and ``results.md`` in the run folder, and the table on the terminal."""
    (args.output / "results.json").write_text(json.dumps(results, indent=2))
    (args.output / "results.md").write_text(markdown)
    print("\n" + markdown + f"\nresults in {args.output}")


def start_wandb(args: argparse.Namespace, group: str, name: str | None = None) -> Any | None:
    """A W&B run in the run folder (offline without an API key), or None where ``--wandb off``."""
    mode = wandb_mode(args)
    if mode == "off":
        return None
    import wandb

    return wandb.init(project="advtrain", group=group, name=name or group, dir=str(args.output), mode=mode,
                      config=config_of(args), reinit="finish_previous")


def log_table(run: Any | None, key: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Log a ``wandb.Table`` of results to ``run`` (nothing where W&B is off)."""
    if run is None:
        return
    import wandb

    run.log({key: wandb.Table(columns=list(columns), data=[list(row) for row in rows])})


def log_image(run: Any | None, key: str, path: Path, caption: str) -> None:
    """Log a PNG from the run folder as a ``wandb.Image``."""
    if run is None:
        return
    import wandb

    run.log({key: wandb.Image(str(path), caption=caption)})
