"""The box an input or a layer's activations must stay inside: ``(lower, upper)``, one name everywhere.

A bound is a scalar (possibly infinite) or a tensor broadcastable to one example (per-unit bounds).
:func:`check_bounds` refuses what cannot be a box before anything runs: not a pair, NaN, a lower
bound above the upper one anywhere, or a box with no room at all (every lower bound equal to its
upper bound), in which no perturbation could ever move.
"""

from __future__ import annotations

import math

import torch

Bounds = tuple[float | torch.Tensor, float | torch.Tensor]

#: The pixel box of images scaled to [0, 1], the paper's setting.
UNIT_BOX: Bounds = (0.0, 1.0)
#: No bound at all: a hidden layer whose type implies no range.
UNBOUNDED: Bounds = (-math.inf, math.inf)


def check_bounds(bounds: object, *, name: str = "bounds") -> Bounds:
    """``bounds`` as a ``(lower, upper)`` pair after checking that it is a box with room in it.

    Raises:
        ValueError: not a pair of numbers or tensors, NaN, lower above upper anywhere, or lower equal
            to upper everywhere (naming ``name``).
    """
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"{name} must be a pair (lower, upper) of numbers or tensors, got {bounds!r}")
    try:
        lower, upper = (torch.as_tensor(bound, dtype=torch.float64) if not isinstance(bound, torch.Tensor)
                        else bound.detach().double() for bound in bounds)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be a pair (lower, upper) of numbers or tensors, got {bounds!r}") from error
    if bool(torch.isnan(lower).any()) or bool(torch.isnan(upper).any()):
        raise ValueError(f"{name} hold NaN: {describe_bounds(bounds)}")
    try:
        inverted, point = bool((lower > upper).any()), bool((lower == upper).all())
    except RuntimeError as error:
        raise ValueError(f"the lower and upper bounds of {name} do not broadcast together: {error}") from error
    if inverted:
        raise ValueError(f"{name} {describe_bounds(bounds)} have lower > upper somewhere; give (lower, upper) in that order")
    if point:
        raise ValueError(f"{name} {describe_bounds(bounds)} leave no room: lower equals upper everywhere, so no perturbation "
                         "can move; widen the box")
    return bounds[0], bounds[1]


def describe_bounds(bounds: object) -> str:
    """``(0, 1)``, or ``per-unit tensor`` for a bound with several values."""
    return "(" + ", ".join(f"{float(b):g}" if not isinstance(b, torch.Tensor) or b.numel() == 1 else "per-unit tensor"
                           for b in bounds) + ")"


__all__ = ["UNBOUNDED", "UNIT_BOX", "Bounds", "check_bounds", "describe_bounds"]
