"""The pools callback of a recipe, from a YAML file of ``LayerwiseAdversarialTraining``'s arguments.

The file holds the callback's own arguments, its attack and pooling policy nested in LightningCLI's
``class_path`` / ``init_args`` form (see ``recipes/configs/``); ``KEY=VALUE`` overrides change one
entry, dotted for nested ones (``mix_fraction=0.1``, ``attack.init_args.epsilon=0.05``). The
file is checked against the callback's signature by jsonargparse, so a recipe lists no callback
knob of its own, and the resolved settings (every default filled in) are written beside the results.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import yaml

CONFIGS = Path(__file__).resolve().parent / "configs"


def default_pools_config(model: str) -> Path:
    """The recipe's own pools file for ``model`` (``recipes/configs/pools-<model>.yaml``)."""
    return CONFIGS / f"pools-{model}.yaml"


def pools_settings(path: Path, overrides: list[str] = ()) -> dict[str, Any]:
    """The file's settings with the ``KEY=VALUE`` overrides applied (values read as YAML).

    Raises:
        ValueError: a file that is not a mapping, or an override without ``=``.
    """
    try:
        settings = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as error:
        raise ValueError(f"cannot read the pools config {path}: {error.strerror or error}") from error
    except yaml.YAMLError as error:  # its own message names "<unicode string>", not the file
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or "not valid YAML"
        raise ValueError(f"the pools config {path} is not valid YAML: {problem}{where}") from error
    if not isinstance(settings, dict):
        raise ValueError(f"the pools config {path} must map LayerwiseAdversarialTraining's arguments to values")
    for override in overrides:
        key, separator, value = override.partition("=")
        if not separator or not key:
            raise ValueError(f"--pools-set takes KEY=VALUE (dotted keys for nested settings), got {override!r}")
        node = settings
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--pools-set {key}: {part} is not a nested setting")
        node[last] = yaml.safe_load(value)
    return settings


def build_pools(settings: dict[str, Any], **fixed: Any) -> tuple[Any, dict[str, Any]]:
    """The callback built from ``settings`` (plus ``fixed`` arguments such as ``module`` and
    ``seed``), and its resolved settings as plain data (the default generator written out as
    ``BoxLBFGS`` with ``GENERATION_ATTACK``'s settings, so a run folder says which search it ran).

    Raises:
        ValueError: an unknown or ill-typed setting (jsonargparse's message), or one the callback
            or its attack refuses (their own message).
    """
    try:
        from jsonargparse import ArgumentParser
    except ImportError as error:
        raise ValueError("the pools config needs jsonargparse: pip install -e '.[cli]'") from error
    from advtrain.callbacks import LayerwiseAdversarialTraining

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LayerwiseAdversarialTraining, "pools", fail_untyped=False)
    try:
        config = parser.parse_object({"pools": {**settings, **fixed}})
        callback = parser.instantiate_classes(config).pools
    except Exception as error:  # the callback's own refusals, and jsonargparse's: unknown keys, wrong types
        raise ValueError(_reason(str(error))) from error
    resolved = yaml.safe_load(parser.dump(config, skip_none=False))["pools"]
    if resolved.get("attack") is None:  # the callback's default generator, written out: what the run measured
        from advtrain.callbacks.layerwise_adversarial_training import GENERATION_ATTACK

        resolved["attack"] = {"class_path": "advtrain.attacks.BoxLBFGS", "init_args": dict(GENERATION_ATTACK)}
    return callback, resolved


def _reason(text: str) -> str:
    """jsonargparse's message, led by the setting and the refusal of the class itself where a Union
    buried it: ``attack: Problem with given class_path 'advtrain.attacks.FastGradient': Option
    'epsilonn' is not accepted``."""
    lines = text.splitlines()
    key = re.match(r'Parser key "(?:pools\.)?([^"]+)"', lines[0]) if lines else None
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("- ") and "NoneType" not in stripped:
            indent = len(line) - len(line.lstrip())
            details = [detail.strip() for detail in itertools.takewhile(
                lambda detail: len(detail) - len(detail.lstrip()) > indent, lines[index + 1:])]
            reason = ": ".join([stripped[2:].rstrip(":"), *details])
            return f"{key.group(1)}: {reason}" if key else reason
    return " ".join(text.split())
