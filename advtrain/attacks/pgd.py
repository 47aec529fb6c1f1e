"""Projected gradient descent with a random start: the field's standard attack for adversarial
training (Madry et al., 2018), in any norm of :mod:`advtrain.budget`.

From a random point of the ε-ball around x (inside the box), ``steps`` steps up the cross-entropy
of the true label (untargeted) or down that of a target: the steepest direction of the norm times
the step size (the gradient's sign in L∞, the gradient scaled to the step in L2 and
``sqrt(mean r²)``), each followed by projection onto the ε-ball and the box. Every row ends
somewhere inside the budget, fooled or not.
"""

from __future__ import annotations

import torch
from torch import nn

from advtrain.attacks.base import Attack, Proposal
from advtrain.attacks.inputs import CheckedBatch, Head
from advtrain.attacks.targets import TargetPolicy
from advtrain.budget import Norm, check_epsilon, check_norm, project, random_point_in_ball, step_direction
from advtrain.checks import check_count


class PGD(Attack):
    """Projected gradient descent with a random start.

    Args:
        epsilon: the budget in ``norm`` (:mod:`advtrain.budget`): ``max |r|`` for ``"linf"``,
            ``‖r‖₂`` for ``"l2"``, ``sqrt(mean r²)`` for ``"rms"`` (on 28×28 images an L2 budget of
            1.0 is an rms budget of 0.036).
        norm: ``"linf"``, ``"l2"`` or ``"rms"``.
        steps: gradient steps.
        step_size: the length of each step in the norm's units (default ``2.5 · epsilon / steps``,
            Madry et al.'s choice).
        random_start: start from a uniformly random point of the ε-ball (else from x).
        target: the default target policy (see :class:`~advtrain.attacks.base.Attack`).

    Raises:
        ValueError: a budget or step size that is not positive and finite, an unknown norm,
            ``steps`` below 1, ``target="nearest"``.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> attack = PGD(epsilon=0.1, norm="linf", steps=5)
        >>> result = attack(model, torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> bool((result.attempt - result.adversarial).abs().max() <= 0.2)
        True

    Reference: Madry et al., "Towards deep learning models resistant to adversarial attacks" (2018).
    """

    fixed_budget = True

    def __init__(self, *, epsilon: float, norm: Norm = "linf", steps: int = 10, step_size: float | None = None,
                 random_start: bool = True, target: TargetPolicy = "untargeted") -> None:
        epsilon = check_epsilon(epsilon)
        check_norm(norm)
        check_count("steps", steps)
        if step_size is not None:
            step_size = check_epsilon(step_size, name="step_size")
        super().__init__(target=target)
        self.epsilon = epsilon
        self.norm = norm
        self.steps = steps
        self.step_size = step_size if step_size is not None else 2.5 * self.epsilon / steps
        self.random_start = bool(random_start)

    def _project(self, points: torch.Tensor, origin: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """Onto the ε-ball around ``origin``, then into the box (rows flat: ``(N, D)``)."""
        delta = project(points - origin, self.epsilon, self.norm)
        return torch.minimum(torch.maximum(origin + delta, lower), upper)

    def _start(self, origin: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A uniformly random point of the ε-ball around each row (flat ``(N, D)``)."""
        return random_point_in_ball(origin, self.epsilon, self.norm, generator)

    def propose(self, model: Head, batch: CheckedBatch, targets: torch.Tensor | None, policy: TargetPolicy | torch.Tensor,
                generator: torch.Generator) -> Proposal:
        """``steps`` projected steps from a random start (or from x)."""
        shape = batch.inputs.shape
        origin = batch.inputs.flatten(1)
        points = self._start(origin, generator) if self.random_start else origin.clone()
        points = self._project(points, origin, batch.lower, batch.upper)
        goal = batch.labels if targets is None else targets
        for _ in range(self.steps):
            points = points.detach().requires_grad_(True)
            loss = nn.functional.cross_entropy(model(points.view(shape)), goal, reduction="sum")
            (gradient,) = torch.autograd.grad(loss if targets is None else -loss, points)
            points = self._project(points.detach() + self.step_size * step_direction(gradient, self.norm), origin,
                                   batch.lower, batch.upper)
        rows = len(batch.labels)
        return Proposal(points.view(shape), torch.ones(rows, dtype=torch.bool, device=points.device),
                        iterations=torch.full((rows,), self.steps, dtype=torch.long, device=points.device))
