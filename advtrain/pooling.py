"""What a pool keeps of an attack's result: one policy object, checked against the attack once.

- :class:`Successes` (the default): the examples that fooled the model, as the attack found them.
- :class:`WithinBudget`: successes held to a budget (``epsilon`` in a norm of :mod:`advtrain.budget`):
  those beyond it dropped or projected onto its ball, and optionally those within it stretched out
  to it (then clipped to the box), so every example sits at the budget as a fixed-budget
  attack's would.
- :class:`EveryStep`: every row a fixed-budget attack (a fast-gradient or PGD step) moved, fooled
  or not, as fast-gradient adversarial training trains on them all; with ``misclassified=True``
  the rows the model already gets wrong are attacked too, as PGD and fast adversarial training do.

A policy is a callable ``(inputs, result, box) -> (examples, keep)``: ``examples`` ``(N, ...)`` and
the ``(N,)`` mask of those to pool; its ``misclassified`` attribute says whether a refresh also
attacks the clean rows the model gets wrong (else only the correct ones, the paper's practice: a
minimal adversarial perturbation of a row already wrong is nothing). Write your own the same way.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol

import torch

from advtrain.attacks import Attack, AttackResult
from advtrain.box import Bounds
from advtrain.budget import Norm, check_epsilon, check_norm, perturbation_size, project



class PoolingPolicy(Protocol):
    """What to pool from an attack's result."""

    #: whether a refresh also attacks the clean rows the model already gets wrong
    misclassified: bool

    def check(self, attack: Attack) -> None:
        """Refuse an attack this policy cannot work with (``ValueError``)."""

    def __call__(self, inputs: torch.Tensor, result: AttackResult, box: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
        """``(examples, keep)`` for clean ``inputs`` and the attack's ``result`` on them."""


class Successes:
    """Pool the successes as the attack found them.

    Example::

        >>> Successes()
        Successes()
    """

    misclassified = False

    def check(self, attack: Attack) -> None:
        """Any attack will do."""

    def __call__(self, inputs: torch.Tensor, result: AttackResult, box: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
        return result.adversarial, result.success

    def __repr__(self) -> str:
        return "Successes()"


class WithinBudget:
    """Pool successes held to a budget of ``epsilon`` in ``norm`` (:mod:`advtrain.budget`).

    Args:
        epsilon: the largest size of a pooled example's perturbation.
        norm: ``"rms"`` (the paper's ``sqrt(mean r²)``, default), ``"l2"`` or ``"linf"``.
        beyond: what becomes of a success beyond the budget: ``"drop"`` it, or ``"project"`` its
            perturbation onto the budget's ball (inside the box, which is convex; the projected
            example may no longer fool the model).
        stretch: also stretch the successes within the budget out to it, along their direction,
            clipped to the box.

    Raises:
        ValueError: a budget that is not positive and finite, an unknown norm or ``beyond``.

    Example::

        >>> WithinBudget(0.036, beyond="project", stretch=True)
        WithinBudget(epsilon=0.036, norm='rms', beyond='project', stretch=True)
    """

    misclassified = False

    def __init__(self, epsilon: float, *, norm: Norm = "rms", beyond: Literal["drop", "project"] = "drop",
                 stretch: bool = False) -> None:
        self.epsilon, self.norm = check_epsilon(epsilon), check_norm(norm)
        if beyond not in ("drop", "project"):
            raise ValueError(f"beyond must be 'drop' or 'project', got {beyond!r}")
        self.beyond, self.stretch = beyond, bool(stretch)

    def check(self, attack: Attack) -> None:
        """Any attack will do."""

    def __call__(self, inputs: torch.Tensor, result: AttackResult, box: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
        size = torch.where(result.success, perturbation_size(result.perturbation, self.norm),
                           torch.full_like(result.distortion, math.inf))
        within = size <= self.epsilon
        keep = result.success & within if self.beyond == "drop" else result.success
        rescale = (~within & (self.beyond == "project")) | (within & self.stretch)
        rows = rescale.view(-1, *[1] * (inputs.ndim - 1))
        if not bool(rescale.any()):
            return result.adversarial, keep
        perturbation = result.adversarial - inputs
        # projecting onto the ball scales an L2 or rms perturbation along its direction and clips an
        # L-inf one; stretching scales every perturbation out to the budget (failures get factor 0)
        scale = (self.epsilon / size.clamp_min(torch.finfo(size.dtype).tiny)).where(result.success, torch.zeros_like(size))
        stretched = inputs + scale.view_as(rows).to(inputs.dtype) * perturbation
        projected = inputs + project(perturbation, self.epsilon, self.norm)
        examples = torch.where(rows & within.view_as(rows), stretched, projected)
        if self.stretch:  # stretching can leave the box; projecting onto the budget cannot (it is convex)
            lower, upper = (torch.as_tensor(bound, dtype=examples.dtype, device=examples.device) for bound in box)
            examples = torch.clamp(examples, lower, upper)
        return torch.where(rows, examples, result.adversarial), keep

    def __repr__(self) -> str:
        return f"WithinBudget(epsilon={self.epsilon!r}, norm={self.norm!r}, beyond={self.beyond!r}, stretch={self.stretch!r})"


class EveryStep:
    """Pool every row a fixed-budget attack moved, fooled or not.

    Args:
        misclassified: also attack (and pool) the clean rows the model already gets wrong, as PGD
            adversarial training (Madry et al., 2018) and fast adversarial training (Wong et al.,
            2020) perturb every row of the batch; by default only the correct rows are attacked.

    Example::

        >>> from advtrain.attacks import BoxLBFGS, FastGradient
        >>> EveryStep().check(FastGradient())
        >>> EveryStep(misclassified=True)
        EveryStep(misclassified=True)
        >>> EveryStep().check(BoxLBFGS())
        Traceback (most recent call last):
        ...
        ValueError: EveryStep pools the rows a fixed-budget attack moved; BoxLBFGS is a search whose failures carry no perturbation: use FastGradient or PGD, or pool Successes()
    """

    def __init__(self, *, misclassified: bool = False) -> None:
        self.misclassified = bool(misclassified)

    def check(self, attack: Attack) -> None:
        """Refuse an attack whose failures carry no perturbation (a search)."""
        if not getattr(attack, "fixed_budget", False):
            raise ValueError(f"EveryStep pools the rows a fixed-budget attack moved; {type(attack).__name__} is a search "
                             "whose failures carry no perturbation: use FastGradient or PGD, or pool Successes()")

    def __call__(self, inputs: torch.Tensor, result: AttackResult, box: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
        return result.attempt, torch.ones_like(result.success)

    def __repr__(self) -> str:
        return "EveryStep(misclassified=True)" if self.misclassified else "EveryStep()"


__all__ = ["EveryStep", "PoolingPolicy", "Successes", "WithinBudget"]
