"""Walk a found adversarial example along the decision boundary towards the clean input: a final
stage for a minimal search, after decoupled direction and norm (DDN: Rony et al., 2019).

A search such as the box-constrained L-BFGS ends at a point just past the decision boundary, but
seldom at the boundary's closest point: where the loss surface bends (ReLU networks) its last
solve stops short. From there each step moves along the loss gradient (away from the true class,
or towards the target) by a step that starts at ``step_share`` of the found perturbation's L2
norm, then rescales the perturbation to a norm that shrinks by a factor ``1 − γ`` while the point
is adversarial and grows by ``1 + γ`` while it is not, and clamps it into the box. Step and ``γ``
(from ``gamma``) decay to zero on a cosine schedule. The smallest perturbation seen that is
adversarial by a margin (``keeps``) is kept, so a row never ends worse than it started.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from advtrain.attacks.inputs import Head, head_for_rows
from advtrain.attacks.lbfgs import project


def polish_on_boundary(head: Head, origin: torch.Tensor, points: torch.Tensor, found: torch.Tensor, goals: torch.Tensor,
                       untargeted: bool, keeps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       lower: torch.Tensor, upper: torch.Tensor, shape: torch.Size, *, steps: int,
                       step_share: float = 0.1, gamma: float = 0.05) -> torch.Tensor:
    """``points (N, D)`` with every ``found`` row moved to the smallest adversarial point the walk
    met (flat rows; the others as given).

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
    row_head = head_for_rows(head, rows)
    start, low, high, targets = origin[rows], lower[rows], upper[rows], goals[rows]
    delta = points[rows] - start
    best, best_norm = delta.clone(), delta.norm(dim=1)
    norm_goal, first_step = best_norm.clone(), step_share * best_norm
    tiny = torch.finfo(delta.dtype).tiny
    for step in range(steps + 1):
        with torch.enable_grad():
            moving = delta.detach().requires_grad_(True)
            logits = row_head((start + moving).view(-1, *shape[1:]))
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
    polished = points.clone()
    polished[rows] = start + best
    return polished


__all__ = ["polish_on_boundary"]
