"""Batched projected L-BFGS: one history per example, box constraints by projection.

Each row of the batch is its own problem (the objective is a sum of per-row terms); every row
keeps its own curvature pairs, scaling and step length, updated with masks, so one batch on a GPU
solves N problems at once. A variable sitting on a bound with its gradient pointing outwards is
held fixed (the active set of L-BFGS-B); the step is projected back into the box and accepted
by an Armijo line search along the projected path.
"""

from __future__ import annotations

from typing import Callable

import torch

#: ``objective(x, rows, with_gradient)`` gives per-row values ``(n,)``, gradients ``(n, D)`` (``None``
#: without ``with_gradient``: a forward pass only) and logits ``(n, C)`` for the rows ``rows`` of the
#: batch, at points ``x`` ``(n, D)``.
Objective = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]
#: ``on_point(x, logits, rows)`` sees every accepted iterate.
OnPoint = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


_FULL_STEP = torch.tensor([1.0])
_LADDER = torch.tensor([0.5, 0.2, 0.05, 0.01, 1e-3, 1e-4])


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
    relative_decrease: float = 1e-9,
    on_point: OnPoint | None = None,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise each row's objective from ``start`` ``(N, D)`` inside ``[lower, upper]``.

    A row stops when its projected gradient is below ``tolerance`` (max-norm), when its value fell
    by less than ``relative_decrease`` (relative, as scipy's ``ftol``), or when no step of the
    line search's ladder (down to 1e-4 of the full step) decreased it enough.

    ``scale`` ``(N,)`` is each row's initial inverse-Hessian scale (``s·y / y·y``), e.g. from an
    earlier solve of a similar problem; without it a row's first step has unit length.

    Returns:
        The final points ``(N, D)``, the iterations each row took ``(N,)``, and each row's
        inverse-Hessian scale at the end ``(N,)``, to warm-start the next solve.
    """
    count, dims = start.shape
    device, dtype = start.device, start.dtype
    final = project(start, lower, upper)
    used = torch.zeros(count, dtype=torch.long, device=device)
    # The state below covers only the live rows, `rows` (ids in the batch); rows that have converged
    # are written back to `final` and dropped once they are half of the live ones.
    rows = torch.arange(count, device=device)
    x = final.clone()
    value, gradient, logits = objective(x, rows, True)
    if on_point is not None:
        on_point(x, logits, rows)
    steps = torch.zeros(history, count, dims, device=device, dtype=dtype)
    changes = torch.zeros_like(steps)
    rho = torch.zeros(history, count, device=device, dtype=dtype)
    gamma = torch.ones(count, device=device, dtype=dtype) if scale is None else scale.clone()
    has_history = torch.full((count,), scale is not None, dtype=torch.bool, device=device)
    final_scale = gamma.clone()
    active = torch.ones(count, dtype=torch.bool, device=device)

    for iteration in range(iterations):
        free = ~(((x <= lower) & (gradient > 0)) | ((x >= upper) & (gradient < 0)))
        projected_gradient = gradient * free
        active &= projected_gradient.abs().amax(1) > tolerance
        live = int(active.sum())
        if live == 0:
            break
        if live <= active.numel() // 2:  # compact: keep the active rows only
            final[rows[~active]] = x[~active]
            final_scale[rows[~active]] = gamma[~active]
            keep = active
            rows, x, value, gradient, free = rows[keep], x[keep], value[keep], gradient[keep], free[keep]
            projected_gradient, lower, upper = projected_gradient[keep], lower[keep], upper[keep]
            steps, changes, rho = steps[:, keep], changes[:, keep], rho[:, keep]
            gamma, has_history, active = gamma[keep], has_history[keep], active[keep]
        local = torch.arange(rows.numel(), device=device)
        direction = -_two_loop(projected_gradient, steps, changes, rho, gamma, (iteration - 1) % history) * free
        slope = (direction * gradient).sum(1)
        uphill = slope >= 0  # a stale curvature pair can point uphill: fall back to the gradient
        direction = torch.where(uphill[:, None], -projected_gradient, direction)
        # first step of a row without history: unit length, as L-BFGS-B does
        length = torch.where(has_history & ~uphill, torch.ones_like(gamma),
                             1.0 / direction.norm(dim=1).clamp_min(1e-12))

        new_x, new_value, new_gradient = x.clone(), value.clone(), gradient.clone()
        accepted = torch.zeros_like(active)
        # Line search in two batched calls: the full step for every live row (with gradients), then
        # a ladder of shorter steps, all at once and by forward passes only, for the rows whose full
        # step broke the Armijo condition; the gradient is then taken at each row's accepted step.
        trying = local[active]
        for factors, with_gradient in ((_FULL_STEP.to(device, dtype), True), (_LADDER.to(device, dtype), False)):
            if trying.numel() == 0:
                break
            ladder = (length[trying, None] * factors[None, :]).reshape(-1)  # (n·k,)
            repeated = trying.repeat_interleave(factors.numel())
            trial = project(x[repeated] + ladder[:, None] * direction[repeated], lower[repeated], upper[repeated])
            trial_value, trial_gradient, trial_logits = objective(trial, rows[repeated], with_gradient)
            if on_point is not None:
                on_point(trial, trial_logits, rows[repeated])
            decrease = (gradient[repeated] * (trial - x[repeated])).sum(1)
            good = (trial_value <= value[repeated] + 1e-4 * decrease).view(-1, factors.numel())
            first = torch.where(good.any(1), good.float().argmax(1), torch.full_like(good[:, 0], -1, dtype=torch.long))
            passed = first >= 0
            pick = (torch.arange(trying.numel(), device=device) * factors.numel() + first)[passed]
            winners = trying[passed]
            if with_gradient:
                new_value[winners], new_gradient[winners] = trial_value[pick], trial_gradient[pick]
            elif winners.numel():
                new_value[winners], new_gradient[winners], _ = objective(trial[pick], rows[winners], True)
            new_x[winners] = trial[pick]
            accepted[winners] = True
            trying = trying[~passed]
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
        used[rows[accepted]] += 1
        x, value, gradient = new_x, new_value, new_gradient
    final[rows] = x
    final_scale[rows] = gamma
    return final, used, final_scale
