"""Auto-PGD: projected gradient ascent with momentum and a step size that adapts itself, the
gradient attack of AutoAttack (Croce & Hein, 2020), in any norm of :mod:`advtrain.budget`.

From a random point of the ε-ball, ``steps`` steps up a loss: cross-entropy of the true label
(``loss="ce"``), the difference of logits ratio (``"dlr"``, invariant to the scale of the logits,
so a model that saturates its softmax cannot hide behind vanishing cross-entropy gradients), or
its targeted form towards a given class (``"dlr"`` with a target). Each step takes the steepest
direction of the norm, projects onto the ball and the box, and mixes in the previous move
(momentum 0.25). The step starts at 2ε and halves at checkpoints (after 22% of the steps, then at
shrinking intervals) wherever the loss rose in fewer than 75% of the steps since the last
checkpoint, or the step was not cut last time and the best loss has not moved since; the point
then goes back to the best one seen. Restarts begin from fresh random points.

Every row ends somewhere inside the budget (``result.attempt``): the first point that was
misclassified where one was found (the row stops there, so an easily broken batch costs little),
else the point of highest loss.

Reference: Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks", ICML 2020 (Algorithm 1 and Section 3).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from advtrain.attacks.base import Attack, Proposal
from advtrain.attacks.inputs import CheckedBatch, Head, head_for_rows
from advtrain.attacks.pgd import PGD
from advtrain.attacks.targets import TargetPolicy
from advtrain.budget import Norm, check_epsilon, check_norm, random_point_in_ball, step_direction
from advtrain.checks import check_count

Loss = Literal["ce", "dlr"]


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """The difference of logits ratio per row, to be maximised (Croce & Hein, 2020, Section 4).

    Untargeted: ``-(z_y - max_{i≠y} z_i) / (z_π1 - z_π3)``; targeted towards ``t``:
    ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)``, with ``z_π1 ≥ z_π2 ≥ …`` the sorted logits.
    With too few classes for the denominator (untargeted below 3, targeted below 4) it is the
    plain margin: the numerator alone.
    """
    ordered = logits.sort(dim=1, descending=True).values
    rows = torch.arange(logits.shape[0], device=logits.device)
    true = logits[rows, labels]
    classes = logits.shape[1]
    if targets is None:
        other = torch.where(ordered[:, 0] == true, ordered[:, 1], ordered[:, 0])
        numerator = true - other
        scale = ordered[:, 0] - ordered[:, 2] if classes >= 3 else None
    else:
        numerator = true - logits[rows, targets]
        scale = ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) if classes >= 4 else None
    return -numerator if scale is None else -numerator / (scale + 1e-12)


def checkpoints(steps: int) -> list[int]:
    """The steps after which APGD may halve its step: the first after 22% of the steps, then at
    intervals 3% of the steps shorter each time, never below 6% (AutoAttack's integer schedule:
    22, 41, 57, 70, 80, 87, 93, 99 for 100 steps)."""
    interval, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    marks, mark = [], interval
    while mark <= steps:
        marks.append(mark)
        interval = max(interval - shrink, shortest)
        mark += interval
    return marks


class APGD(Attack):
    """Auto-PGD with cross-entropy or the (targeted) difference of logits ratio.

    Args:
        epsilon: the budget in ``norm`` (:mod:`advtrain.budget`).
        norm: ``"linf"``, ``"l2"`` or ``"rms"``.
        steps: gradient steps per restart (AutoAttack's standard: 100).
        loss: ``"ce"`` or ``"dlr"`` (targeted where the call gives targets).
        restarts: runs from fresh random points; a row found misclassified is not run again.
        target: the default target policy (see :class:`~advtrain.attacks.base.Attack`).

    Raises:
        ValueError: a budget that is not positive and finite, an unknown norm or loss, ``steps`` or
            ``restarts`` below 1, ``target="nearest"``.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> attack = APGD(epsilon=0.1, norm="linf", steps=10, loss="dlr")
        >>> result = attack(model, torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1]), generator=torch.Generator().manual_seed(0))
        >>> bool((result.attempt - (result.adversarial - result.perturbation)).abs().max() <= 0.1 + 1e-6)
        True

    Reference: Croce & Hein (2020), Algorithm 1.
    """

    fixed_budget = True

    def __init__(self, *, epsilon: float, norm: Norm = "linf", steps: int = 100, loss: Loss = "ce", restarts: int = 1,
                 target: TargetPolicy = "untargeted") -> None:
        epsilon = check_epsilon(epsilon)
        check_norm(norm)
        check_count("steps", steps)
        check_count("restarts", restarts)
        if loss not in ("ce", "dlr"):
            raise ValueError(f"loss must be 'ce' (cross-entropy) or 'dlr' (difference of logits ratio), got {loss!r}")
        super().__init__(target=target)
        self.epsilon = epsilon
        self.norm = norm
        self.steps = steps
        self.loss = loss
        self.restarts = restarts

    def _losses(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """The loss of each row, to be maximised."""
        if self.loss == "dlr":
            return dlr_loss(logits, labels, targets)
        if targets is None:
            return nn.functional.cross_entropy(logits, labels, reduction="none")
        return -nn.functional.cross_entropy(logits, targets, reduction="none")

    _project = PGD._project  # onto the ε-ball around the clean rows, then into the box: the same step as PGD's

    def _start(self, origin: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random point of the ε-ball around each row: uniform in L∞, on a random direction at a
        radius uniform in [0, ε] in L2 (flat rows)."""
        return random_point_in_ball(origin, self.epsilon, self.norm, generator, uniform_radius=True)

    def _run(self, model: Head, shape: torch.Size, origin: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None,
             lower: torch.Tensor, upper: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One restart on flat rows ``origin (n, D)``: the point each row ends with and whether it
        was misclassified there."""

        def loss_and_gradient(head: Head, points: torch.Tensor,
                              live: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """Loss, gradient and misclassification of the rows ``live`` (None: every row) at ``points``."""
            goal = labels if live is None else labels[live]
            aims = targets if targets is None or live is None else targets[live]
            points = points.detach().requires_grad_(True)
            logits = head(points.view(-1, *shape[1:]))
            losses = self._losses(logits, goal, aims)
            (gradient,) = torch.autograd.grad(losses.sum(), points)
            return losses.detach(), gradient.detach(), logits.argmax(1) != goal

        rows = origin.shape[0]
        points = self._project(self._start(origin, generator), origin, lower, upper)
        losses, gradient, fooled = loss_and_gradient(model, points, None)
        best_loss, best_point, best_gradient = losses.clone(), points.clone(), gradient.clone()
        adversarial, found = points.clone(), fooled.clone()
        step = torch.full((rows, 1), 2.0 * self.epsilon, dtype=origin.dtype, device=origin.device)  # in the norm's units
        marks = set(checkpoints(self.steps))
        previous = points.clone()
        rises = torch.zeros(rows, device=origin.device)  # steps since the last checkpoint whose loss rose
        last_mark = 0
        best_at_mark, cut_at_mark = best_loss.clone(), torch.ones(rows, dtype=torch.bool, device=origin.device)
        for iteration in range(1, self.steps + 1):
            live = (~found).nonzero()[:, 0]  # a row once misclassified keeps its first such point and stops
            if not live.numel():
                break
            momentum = 1.0 if iteration == 1 else 0.75
            here, low, high, at = origin[live], lower[live], upper[live], points[live]
            moved = self._project(at + step[live] * step_direction(gradient[live], self.norm), here, low, high)
            moved = self._project(at + momentum * (moved - at) + (1 - momentum) * (at - previous[live]), here, low, high)
            previous[live], points[live] = at, moved
            new_losses, new_gradient, fooled = loss_and_gradient(head_for_rows(model, live), moved, live)
            gradient[live] = new_gradient
            adversarial[live[fooled]], found[live[fooled]] = moved[fooled], True
            rises[live] += (new_losses > losses[live]).float()
            losses[live] = new_losses
            better = new_losses > best_loss[live]
            improved = live[better]
            best_loss[improved], best_point[improved], best_gradient[improved] = new_losses[better], moved[better], new_gradient[better]
            if iteration in marks:
                stalled = rises <= 0.75 * (iteration - last_mark)
                stuck = ~cut_at_mark & (best_at_mark >= best_loss)
                cut = stalled | stuck
                step[cut] /= 2
                points[cut], gradient[cut] = best_point[cut], best_gradient[cut]
                cut_at_mark, best_at_mark = cut, best_loss.clone()
                rises.zero_()
                last_mark = iteration
        return torch.where(found[:, None], adversarial, best_point), found

    def propose(self, model: Head, batch: CheckedBatch, targets: torch.Tensor | None, policy: TargetPolicy | torch.Tensor,
                generator: torch.Generator) -> Proposal:
        """``restarts`` runs of ``steps`` steps; later runs only on rows not yet misclassified."""
        shape = batch.inputs.shape
        origin = batch.inputs.flatten(1)
        points, found = origin.clone(), torch.zeros(shape[0], dtype=torch.bool, device=origin.device)
        for _ in range(self.restarts):
            rest = (~found).nonzero()[:, 0]
            if not rest.numel():
                break
            ends, fooled = self._run(head_for_rows(model, rest), shape, origin[rest], batch.labels[rest], None if targets is None else targets[rest],
                                     batch.lower[rest], batch.upper[rest], generator)
            points[rest], found[rest] = ends, fooled
        return Proposal(points.view(shape), torch.ones(shape[0], dtype=torch.bool, device=origin.device),
                        iterations=torch.full((shape[0],), self.steps * self.restarts, dtype=torch.long, device=origin.device))


__all__ = ["APGD", "checkpoints", "dlr_loss"]
