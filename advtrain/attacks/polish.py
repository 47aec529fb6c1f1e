"""Walks that move a found adversarial example nearer the clean input along the decision boundary:
final stages for a minimal search, after decoupled direction and norm (DDN: Rony et al., 2019).

A search such as the box-constrained L-BFGS ends at a point just past the decision boundary, but
seldom at the boundary's closest point: where the loss surface bends (ReLU networks) its last
solve stops short, or settles in a part of the boundary farther than another. Each step of a walk
moves along the loss gradient (away from the true class, or towards the target), then rescales the
perturbation to a norm that shrinks by a factor ``1 − γ`` while the point is adversarial and grows
by ``1 + γ`` while it is not, and clamps it into the box. Step and ``γ`` (from ``gamma``) decay to
zero on a cosine schedule. The smallest perturbation seen that is adversarial by a margin
(``keeps``) is kept, so a row never ends worse than it started.

- :func:`polish_on_boundary` starts at the found point, with small steps: it refines that part of
  the boundary.
- :func:`walk_from_clean` starts again at the clean input, with the found norm times ``scale`` as
  the first norm and steps as long as it: the first step lands far out along the clean input's
  gradient, and the norm then shrinks onto whatever part of the boundary that direction meets,
  which on a ReLU network is often nearer than the search's.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from advtrain.attacks.inputs import Head, head_for_rows
from advtrain.attacks.lbfgs import project

Keeps = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def polish_on_boundary(head: Head, origin: torch.Tensor, points: torch.Tensor, found: torch.Tensor, goals: torch.Tensor,
                       untargeted: bool, keeps: Keeps, lower: torch.Tensor, upper: torch.Tensor, shape: torch.Size, *,
                       steps: int, step_share: float = 0.1, gamma: float = 0.05) -> torch.Tensor:
    """``points (N, D)`` with every ``found`` row moved to the smallest adversarial point the walk
    from it met (flat rows; the others as given).

    Args:
        head: inputs of ``shape`` to logits.
        origin: ``(N, D)`` the clean rows.
        points: ``(N, D)`` the found adversarial points, inside ``[lower, upper]``.
        found: ``(N,)`` the rows with a point to polish.
        goals: ``(N,)`` the true labels (``untargeted``) or the targets.
        untargeted: leave ``goals`` (ascend their cross-entropy) rather than reach them.
        keeps: ``(logits, goals)`` to the rows adversarial by the search's margin.
        lower, upper: ``(N, D)`` the box.
        shape: the batch's input shape.
        steps: how many steps.
        step_share: the first step's length as a share of each row's found perturbation norm.
        gamma: the first relative change of the norm per step.
    """
    rows = found.nonzero()[:, 0]
    if not rows.numel() or not steps:
        return points
    delta = points[rows] - origin[rows]
    size = delta.norm(dim=1)
    best = _walk(head_for_rows(head, rows), origin[rows], delta, delta.clone(), size.clone(), size.clone(),
                 step_share * size, goals[rows], untargeted, keeps, lower[rows], upper[rows], shape, steps, gamma)
    polished = points.clone()
    polished[rows] = origin[rows] + best
    return polished


def walk_from_clean(head: Head, origin: torch.Tensor, points: torch.Tensor, found: torch.Tensor, goals: torch.Tensor,
                    untargeted: bool, keeps: Keeps, lower: torch.Tensor, upper: torch.Tensor, shape: torch.Size, *,
                    steps: int, scale: float = 3.0, step_share: float = 1.0, gamma: float = 0.2) -> torch.Tensor:
    """``points (N, D)`` with every ``found`` row replaced by the smallest adversarial point a walk
    from the clean input met, where it is smaller than the found one (flat rows; the others as given).

    The walk's first norm is ``scale`` times the found perturbation's norm, its first step
    ``step_share`` times that first norm; the arguments are otherwise those of
    :func:`polish_on_boundary`.
    """
    rows = found.nonzero()[:, 0]
    if not rows.numel() or not steps:
        return points
    found_delta = points[rows] - origin[rows]
    found_size = found_delta.norm(dim=1)
    first_norm = scale * found_size
    best = _walk(head_for_rows(head, rows), origin[rows], torch.zeros_like(found_delta), found_delta.clone(),
                 found_size.clone(), first_norm, step_share * first_norm, goals[rows], untargeted, keeps,
                 lower[rows], upper[rows], shape, steps, gamma)
    walked = points.clone()
    walked[rows] = origin[rows] + best
    return walked


def _walk(head: Head, start: torch.Tensor, delta: torch.Tensor, best: torch.Tensor, best_norm: torch.Tensor,
          norm_goal: torch.Tensor, first_step: torch.Tensor, targets: torch.Tensor, untargeted: bool, keeps: Keeps,
          low: torch.Tensor, high: torch.Tensor, shape: torch.Size, steps: int, gamma: float) -> torch.Tensor:
    """The walk's loop from perturbation ``delta``: the smallest perturbation it met that ``keeps``
    the goal, or ``best`` where none beat ``best_norm``."""
    tiny = torch.finfo(delta.dtype).tiny
    for step in range(steps + 1):
        with torch.enable_grad():
            moving = delta.detach().requires_grad_(True)
            logits = head((start + moving).view(-1, *shape[1:]))
            losses = nn.functional.cross_entropy(logits, targets, reduction="none")
            (gradient,) = torch.autograd.grad((losses if untargeted else -losses).sum(), moving)
        adversarial = keeps(logits.detach(), targets)
        size = delta.norm(dim=1)
        better = adversarial & (size < best_norm)
        best[better], best_norm[better] = delta[better], size[better]
        if step == steps:
            break
        decay = 0.5 * (1 + math.cos(math.pi * step / steps))
        change = gamma * decay
        norm_goal = torch.where(adversarial, torch.minimum(norm_goal, size) * (1 - change), norm_goal * (1 + change))
        moved = delta + (first_step * decay)[:, None] * gradient / gradient.norm(dim=1, keepdim=True).clamp_min(tiny)
        moved = moved * (norm_goal / moved.norm(dim=1).clamp_min(tiny))[:, None]
        delta = project(start + moved, low, high) - start
    return best


__all__ = ["polish_on_boundary", "walk_from_clean"]
