"""What every recipe does around its experiment: the run folder, its results, and its W&B run.

A run folder holds one run. A recipe refuses an ``--output`` that already holds another run's files
(nothing is overwritten); with ``--resume`` it continues the run the folder holds, where the recipe
can. Every file is written to a temporary name beside its target and renamed into place, so a
killed run leaves whole files or none, never a half-written one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Settings that may differ between a run and its resumption.
RESUMABLE_DIFFERENCES = ("resume", "wandb")
#: The file a run creates exclusively in its folder before writing anything else: of two runs started
#: into one folder at once, only one can create it.
CLAIM = ".advtrain-run"


def add_common_arguments(parser: argparse.ArgumentParser, output: str) -> None:
    """``--output``, ``--wandb``, ``--seed`` and ``--data-dir``, as every recipe takes them."""
    parser.add_argument("--output", type=Path, default=Path(output),
                        help="run folder, new or empty: a folder holding another run is refused")
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


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float as ``None`` (``null``): strict JSON parsers reject NaN."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: strict_json(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(value) for value in data]
    return data


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then rename it to ``path``."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    """``path`` holds ``text``, written atomically."""
    write_atomically(path, lambda temporary: temporary.write_text(text))


def write_json(path: Path, data: Any) -> None:
    """``path`` holds ``data`` as strict JSON (non-finite floats as null), written atomically."""
    write_text(path, json.dumps(strict_json(data), indent=2, allow_nan=False))


def save_weights(path: Path, state: Any) -> None:
    """``torch.save(state, path)``, written atomically."""
    import torch

    write_atomically(path, lambda temporary: torch.save(state, temporary))


def load_weights(path: Path, recipe: str, flag: str = "--checkpoint") -> dict[str, Any]:
    """The model weights in ``path``: a state dict saved with ``torch.save`` (the recipes' ``.pt``
    files), or the model's part (keys under ``model.``) of a Lightning checkpoint. Never loaded with
    ``weights_only=False``, which could run code from the file.

    Raises:
        SystemExit: no such file, not a saved state dict or checkpoint, or not a dict of tensors.
    """
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise SystemExit(f"advtrain {recipe}: {flag} {path}: no such file") from error
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise SystemExit(f"advtrain {recipe}: {flag} {path} is not a saved state dict (torch.save of "
                         f"model.state_dict(), as the recipes' model.pt files are): {type(error).__name__}. It is "
                         "never loaded with weights_only=False, which could run code from the file") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # a Lightning checkpoint
        state = {key.removeprefix("model."): value for key, value in state["state_dict"].items() if key.startswith("model.")}
    if not isinstance(state, dict) or not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise SystemExit(f"advtrain {recipe}: {flag} {path} holds a {type(state).__name__}, not a state dict of "
                         "tensors (pass the model.pt a recipe wrote, or a Lightning checkpoint of advtrain.Classifier)")
    return state


def environment() -> dict[str, Any]:
    """What a run's figures depend on beyond its settings: the library versions and torch's
    intra-op thread count. Rounding differs with the thread count, and a training that sits at a
    knife's edge (PGD on FC100-100-10 leaving its collapse, docs/adversarial-training.md) ends
    elsewhere on it, so a rerun that should repeat a run's figures uses the same count."""
    import platform

    import torch

    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine()}


def start_run_folder(args: argparse.Namespace) -> Path:
    """Create the run folder and write the config, the command line and the :func:`environment`
    into it; or, with
    ``args.resume``, check that the folder holds this run's config and continue in it.

    Raises:
        SystemExit: a shared setting that cannot work (:func:`check_common_settings`), the folder
            holds another run's files or another run claimed it at the same moment (without
            ``--resume``), ``--resume`` on a folder without a run or with another run's settings, or a
            folder that cannot be written. Nothing is written in any of these cases.
    """
    output, recipe = args.output, getattr(args, "recipe", None) or "recipe"
    check_common_settings(args, recipe)
    config = config_of(args)
    saved = output / "config.json"
    if getattr(args, "resume", False):
        if not saved.is_file():
            raise SystemExit(f"advtrain {recipe}: --resume: {output} holds no run to continue (no config.json)")
        earlier = json.loads(saved.read_text())
        changed = sorted(key for key in set(earlier) | set(config) if key not in RESUMABLE_DIFFERENCES
                         and earlier.get(key) != config.get(key))
        if changed:
            details = ", ".join(f"{key}: {earlier.get(key)!r} then, {config.get(key)!r} now" for key in changed)
            raise SystemExit(f"advtrain {recipe}: --resume: the run in {output} was started with other settings ({details})")
        return output
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        hint = " (add --resume to continue it)" if hasattr(args, "resume") else ""
        raise SystemExit(f"advtrain {recipe}: --output {output} already holds files of another run; choose a new folder"
                         f"{hint}: nothing is overwritten")
    try:
        output.mkdir(parents=True, exist_ok=True)
        claim(output, recipe)
        write_json(saved, config)
        write_text(output / "command.txt", " ".join(["advtrain", *sys.argv[1:]]) + "\n")
        write_json(output / "environment.json", environment())
    except OSError as error:
        raise SystemExit(f"advtrain {recipe}: cannot write the run folder --output {output}: {error.strerror or error}") from error
    return output


def claim(output: Path, recipe: str) -> None:
    """Create :data:`CLAIM` in ``output`` exclusively (``O_EXCL``), so that of two runs that both found
    the folder empty only one goes on.

    Raises:
        SystemExit: another run claimed the folder first.
    """
    try:
        os.close(os.open(output / CLAIM, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    except FileExistsError as error:
        raise SystemExit(f"advtrain {recipe}: --output {output} was claimed by another run started at the same time; "
                         "choose a new folder: nothing is overwritten") from error


def check_common_settings(args: argparse.Namespace, recipe: str) -> None:
    """Refuse, before anything is written, the settings most recipes share that cannot work:
    ``--batch-size``, ``--eval-examples`` below 1, ``--lr`` not positive and finite, ``--seed`` below 0,
    ``--accelerator gpu`` (or ``cuda``) on a machine without a CUDA device. Settings a recipe does not
    have, or leaves to its defaults (None), are skipped.

    Raises:
        SystemExit: naming the flag, the value and what it takes.
    """
    for flag in ("batch_size", "eval_examples"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise SystemExit(f"advtrain {recipe}: --{flag.replace('_', '-')} must be at least 1, got {value}")
    lr = getattr(args, "lr", None)
    if lr is not None and not (lr > 0 and math.isfinite(lr)):
        raise SystemExit(f"advtrain {recipe}: --lr must be positive and finite, got {lr}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        raise SystemExit(f"advtrain {recipe}: --seed must be in [0, 2**32), got {seed}")
    accelerator = getattr(args, "accelerator", None)
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"advtrain {recipe}: --accelerator {accelerator}: this machine has no CUDA device; use "
                             "--accelerator cpu or auto")


def write_results(args: argparse.Namespace, results: Any, markdown: str) -> None:
    """``results.json`` (strict JSON) and ``results.md`` in the run folder, and the table on the terminal."""
    write_json(args.output / "results.json", results)
    write_text(args.output / "results.md", markdown)
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
