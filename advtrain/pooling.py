"""What a pool keeps of an attack's result: one policy object, checked against the attack once.

- :class:`Successes` (the default): the examples that fooled the model, as the attack found them.
- :class:`WithinBudget`: successes held to a budget of ``sqrt(mean r²)``: those beyond it dropped
  or projected onto it along their own direction, and optionally those within it stretched out
  to it (then clipped to the box), so every example sits at the budget as a fixed-budget
  attack's would.
- :class:`EveryStep`: every row a fixed-budget attack (a fast-gradient or PGD step) moved, fooled
  or not, as fast-gradient adversarial training trains on them all.

A policy is a callable ``(inputs, result, box) -> (examples, keep)``: ``examples`` ``(N, ...)`` and
the ``(N,)`` mask of those to pool. Write your own the same way.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch

from advtrain.attacks import Attack, AttackResult

Box = tuple[float | torch.Tensor, float | torch.Tensor]


class PoolingPolicy(Protocol):
    """What to pool from an attack's result."""

    def check(self, attack: Attack) -> None:
        """Refuse an attack this policy cannot work with (``ValueError``)."""

    def __call__(self, inputs: torch.Tensor, result: AttackResult, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
        """``(examples, keep)`` for clean ``inputs`` and the attack's ``result`` on them."""


class Successes:
    """Pool the successes as the attack found them.

    Example::

        >>> Successes()
        Successes()
    """

    def check(self, attack: Attack) -> None:
        """Any attack will do."""

    def __call__(self, inputs: torch.Tensor, result: AttackResult, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
        return result.adversarial, result.success

    def __repr__(self) -> str:
        return "Successes()"


class WithinBudget:
    """Pool successes held to ``budget`` (``sqrt(mean r²)``).

    Args:
        budget: the largest distortion of a pooled example.
        beyond: what becomes of a success beyond the budget: ``"drop"`` it, or ``"project"`` its
            perturbation onto the budget along its own direction (inside the box, which is
            convex; the projected example may no longer fool the model).
        stretch: also stretch the successes within the budget out to it, along their direction,
            clipped to the box.

    Raises:
        ValueError: a budget that is not positive and finite, an unknown ``beyond``.

    Example::

        >>> WithinBudget(0.036, beyond="project", stretch=True)
        WithinBudget(budget=0.036, beyond='project', stretch=True)
    """

    def __init__(self, budget: float, *, beyond: Literal["drop", "project"] = "drop", stretch: bool = False) -> None:
        if not (budget > 0 and math.isfinite(budget)):
            raise ValueError(f"budget must be positive and finite, got {budget}")
        if beyond not in ("drop", "project"):
            raise ValueError(f"beyond must be 'drop' or 'project', got {beyond!r}")
        self.budget, self.beyond, self.stretch = float(budget), beyond, bool(stretch)

    def check(self, attack: Attack) -> None:
        """Any attack will do."""

    def __call__(self, inputs: torch.Tensor, result: AttackResult, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
        within = result.distortion <= self.budget
        keep = result.success & within if self.beyond == "drop" else result.success
        rescale = (~within & (self.beyond == "project")) | (within & self.stretch)
        rows = rescale.view(-1, *[1] * (inputs.ndim - 1))
        if not bool(rescale.any()):
            return result.adversarial, keep
        # each row's factor on its perturbation (only the rescaled rows' are used; failures get 0)
        scale = self.budget / result.distortion.clamp_min(torch.finfo(result.distortion.dtype).tiny)
        examples = inputs + scale.view_as(rows).to(inputs.dtype) * (result.adversarial - inputs)
        if self.stretch:  # stretching can leave the box; projecting onto the budget cannot (it is convex)
            lower, upper = (torch.as_tensor(bound, dtype=examples.dtype, device=examples.device) for bound in box)
            examples = torch.clamp(examples, lower, upper)
        return torch.where(rows, examples, result.adversarial), keep

    def __repr__(self) -> str:
        return f"WithinBudget(budget={self.budget!r}, beyond={self.beyond!r}, stretch={self.stretch!r})"


class EveryStep:
    """Pool every row a fixed-budget attack moved, fooled or not.

    Example::

        >>> from advtrain.attacks import BoxLBFGS, FastGradient
        >>> EveryStep().check(FastGradient())
        >>> EveryStep().check(BoxLBFGS())
        Traceback (most recent call last):
        ...
        ValueError: EveryStep pools the rows a fixed-budget attack moved; BoxLBFGS is a search whose failures carry no perturbation: use FastGradient or PGD, or pool Successes()
    """

    def check(self, attack: Attack) -> None:
        """Refuse an attack whose failures carry no perturbation (a search)."""
        if not getattr(attack, "fixed_budget", False):
            raise ValueError(f"EveryStep pools the rows a fixed-budget attack moved; {type(attack).__name__} is a search "
                             "whose failures carry no perturbation: use FastGradient or PGD, or pool Successes()")

    def __call__(self, inputs: torch.Tensor, result: AttackResult, box: Box) -> tuple[torch.Tensor, torch.Tensor]:
        return result.attempt, torch.ones_like(result.success)

    def __repr__(self) -> str:
        return "EveryStep()"


__all__ = ["EveryStep", "PoolingPolicy", "Successes", "WithinBudget"]
