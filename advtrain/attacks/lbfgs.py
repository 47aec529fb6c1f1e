"""Batched projected L-BFGS: one history per example, box constraints by projection.

Each row of the batch is its own problem (the objective is a sum of per-row terms); every row
keeps its own curvature pairs, scaling and step length, updated with masks, so one batch on a GPU
solves N problems at once. A variable sitting on a bound with its gradient pointing outwards is
held fixed (the active set of L-BFGS-B); the step is projected back into the box and accepted
by an Armijo backtracking search along the projected path.
"""

from __future__ import annotations

from typing import Callable

import torch

#: ``objective(x, rows)`` gives per-row values ``(n,)``, gradients ``(n, D)`` and logits ``(n, C)``
#: for the rows ``rows`` of the batch, at points ``x`` ``(n, D)``.
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
#: ``on_point(x, logits, rows)`` sees every accepted iterate.
OnPoint = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def project(x: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Clamp ``x`` into the box, elementwise (infinite bounds allowed)."""
    return torch.minimum(torch.maximum(x, lower), upper)


def _two_loop(gradient: torch.Tensor, steps: torch.Tensor, changes: torch.Tensor, rho: torch.Tensor,
              gamma: torch.Tensor, newest: int) -> torch.Tensor:
    """The L-BFGS two-loop recursion for every row at once: ``H·gradient``.

    ``steps``/``changes`` are ``(m, N, D)`` ring buffers of s and y; rows with ``rho == 0`` in a
    slot ignore that slot (no pair stored yet, or a pair that failed the curvature test).
    """
    memory = steps.shape[0]
    order = [(newest - j) % memory for j in range(memory)]  # newest first
    q = gradient.clone()
    alphas = []
    for slot in order:
        alpha = rho[slot] * (steps[slot] * q).sum(1)  # (N,)
        q.sub_(alpha[:, None] * changes[slot])
        alphas.append(alpha)
    q.mul_(gamma[:, None])
    for slot, alpha in zip(reversed(order), reversed(alphas)):
        beta = rho[slot] * (changes[slot] * q).sum(1)
        q.add_((alpha - beta)[:, None] * steps[slot])
    return q


def projected_lbfgs(
    objective: Objective,
    start: torch.Tensor,
    lower: torch.Tensor,
    upper: torch.Tensor,
    *,
    iterations: int,
    history: int = 10,
    tolerance: float = 1e-7,
    relative_decrease: float = 1e-6,
    max_backtracks: int = 10,
    on_point: OnPoint | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise each row's objective from ``start`` ``(N, D)`` inside ``[lower, upper]``.

    A row stops when its projected gradient is below ``tolerance`` (max-norm), when its value fell
    by less than ``relative_decrease`` (relative, as scipy's ``ftol``), or when its line search
    found no decrease in ``max_backtracks`` halvings.

    Returns:
        The final points ``(N, D)`` and the iterations each row took ``(N,)``.
    """
    count, dims = start.shape
    device, dtype = start.device, start.dtype
    all_rows = torch.arange(count, device=device)
    x = project(start, lower, upper)
    value, gradient, logits = objective(x, all_rows)
    if on_point is not None:
        on_point(x, logits, all_rows)
    steps = torch.zeros(history, count, dims, device=device, dtype=dtype)
    changes = torch.zeros_like(steps)
    rho = torch.zeros(history, count, device=device, dtype=dtype)
    gamma = torch.ones(count, device=device, dtype=dtype)
    has_history = torch.zeros(count, dtype=torch.bool, device=device)
    active = torch.ones(count, dtype=torch.bool, device=device)
    used = torch.zeros(count, dtype=torch.long, device=device)

    for iteration in range(iterations):
        free = ~(((x <= lower) & (gradient > 0)) | ((x >= upper) & (gradient < 0)))
        projected_gradient = gradient * free
        active &= projected_gradient.abs().amax(1) > tolerance
        if not bool(active.any()):
            break
        direction = -_two_loop(projected_gradient, steps, changes, rho, gamma, (iteration - 1) % history) * free
        slope = (direction * gradient).sum(1)
        uphill = slope >= 0  # a stale curvature pair can point uphill: fall back to the gradient
        direction = torch.where(uphill[:, None], -projected_gradient, direction)
        # first step of a row without history: unit length, as L-BFGS-B does
        length = torch.where(has_history & ~uphill, torch.ones_like(gamma),
                             1.0 / direction.norm(dim=1).clamp_min(1e-12))

        new_x, new_value, new_gradient = x.clone(), value.clone(), gradient.clone()
        accepted = torch.zeros(count, dtype=torch.bool, device=device)
        pending = active.clone()
        for _ in range(max_backtracks):
            rows = all_rows[pending]
            if rows.numel() == 0:
                break
            trial = project(x[rows] + length[rows, None] * direction[rows], lower[rows], upper[rows])
            trial_value, trial_gradient, trial_logits = objective(trial, rows)
            decrease = (gradient[rows] * (trial - x[rows])).sum(1)
            good = trial_value <= value[rows] + 1e-4 * decrease
            good_rows = rows[good]
            new_x[good_rows], new_value[good_rows], new_gradient[good_rows] = trial[good], trial_value[good], trial_gradient[good]
            accepted[good_rows] = True
            if on_point is not None and good_rows.numel():
                on_point(trial[good], trial_logits[good], good_rows)
            pending[good_rows] = False
            length[rows[~good]] *= 0.5
        # a row whose line search failed, or whose value barely moved, has converged (scipy's ftol)
        active &= accepted & (value - new_value > relative_decrease * new_value.abs().clamp_min(1.0))

        step, change = new_x - x, new_gradient - gradient
        curvature = (step * change).sum(1)
        valid = accepted & (curvature > 1e-10 * step.norm(dim=1) * change.norm(dim=1))
        slot = iteration % history
        steps[slot], changes[slot] = step, change
        rho[slot] = torch.where(valid, 1.0 / curvature.where(valid, torch.ones_like(curvature)), torch.zeros_like(curvature))
        gamma = torch.where(valid, curvature / (change * change).sum(1).clamp_min(1e-30), gamma)
        has_history |= valid
        used += accepted.long()
        x, value, gradient = new_x, new_value, new_gradient
    return x, used
