"""FAB: the fast adaptive boundary attack, a minimal-perturbation search and the member of AutoAttack
that walks along the decision boundary (Croce & Hein, 2020), in L∞, L2 and ``sqrt(mean r²)``.

Each step linearises the boundary between the true class ``y`` and a guide class ``t`` at the
current point ``x``: the plane ``f(x) + ∇f(x)·(z − x) = 0`` with ``f = z_t − z_y``. It projects both
``x`` and the clean input ``x₀`` onto that plane inside the box (the smallest move in the norm,
:func:`plane_step`), and goes to a mix of the two projections, overshooting by ``eta``:
``(1 − α)(x + η·d_x) + α(x₀ + η·d_x₀)`` with ``α = min(|d_x| / (|d_x| + |d_x₀|), alpha_max)``, so
that it leans towards the clean input the nearer that is. Where the new point is misclassified it
is kept if it is the smallest found so far, and the point steps back towards ``x₀``
(``x₀ + beta·(x − x₀)``), to search for a closer one. The minimal size that results does not depend
on any budget: one run per row tells every budget of its norm at once.

Because the step comes from the plane, not from the size of the gradient, a saturated softmax or a
gradient scaled down by many orders of magnitude does not stop it, where a fixed-budget gradient
attack that starts from a random point may fail.

The guide class: a target (``target`` a tensor or a policy), and then success means reaching it;
or, untargeted, the ``guide_rank``-th most likely wrong class of the clean logits, and success
means any wrong class (AutoAttack's FAB-T runs ranks 1 to 9 in turn).

Reference: Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary
attack", ICML 2020 (Section 3, Algorithm 1).
"""

from __future__ import annotations

import torch

from advtrain.attacks.base import Attack, Proposal
from advtrain.attacks.inputs import CheckedBatch, Head, head_for_rows
from advtrain.attacks.targets import TargetPolicy, ranked_wrong_classes
from advtrain.budget import Norm, check_norm
from advtrain.checks import check_count


def plane_step(points: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, normal: torch.Tensor,
               level: torch.Tensor, norm: str) -> torch.Tensor:
    """``(N, n)`` the smallest move ``d`` in ``norm`` (``"linf"``, or ``"l2"``/``"rms"``) that takes each
    row of ``points`` onto the plane ``normal · (points + d) = level`` while ``points + d`` stays in
    ``[lower, upper]``; where the box holds no point of the plane, the move that goes furthest
    towards it (to the box's corner). ``points`` must lie inside the box.

    In L2 the move is ``d_i = sign(w_i)·min(λ·|w_i|, cap_i)`` and in L∞ ``d_i = sign(w_i)·min(ρ, cap_i)``,
    with ``w`` the normal turned towards the plane and ``cap_i`` the room the box leaves in that
    direction; the progress ``w·d`` is piecewise linear and increasing in ``λ`` (``ρ``), so sorting
    the kinks gives the exact solution.
    """
    dtype = points.dtype
    points, lower, upper, normal, level = (t.double() for t in (points, lower, upper, normal, level))
    gap = level - (normal * points).sum(1)
    direction = torch.where(gap >= 0, 1.0, -1.0).to(points)[:, None]
    w = normal * direction
    gap = gap.abs()
    room = torch.where(w > 0, upper - points, torch.where(w < 0, points - lower, torch.zeros_like(points))).clamp_min(0)
    size = w.abs()
    moving = size > 0
    if norm == "linf":  # progress(ρ) = Σ |w_i| min(ρ, cap_i): kinks at cap_i, slope |w_i|
        kinks, slopes = torch.where(moving, room, torch.inf), size
    else:  # progress(λ) = Σ |w_i| min(λ|w_i|, cap_i): kinks at cap_i/|w_i|, slope w_i²
        kinks, slopes = torch.where(moving, room / size.where(moving, torch.ones_like(size)), torch.inf), size**2
    kinks, order = kinks.sort(1)
    slopes = slopes.gather(1, order)
    saturated = (size * room).gather(1, order).where(kinks.isfinite(), torch.zeros_like(kinks))
    before = saturated.cumsum(1) - saturated  # progress from the coordinates saturated before each kink
    remaining = slopes.flip(1).cumsum(1).flip(1)  # slope of the coordinates not yet saturated
    at_kink = torch.where(remaining > 0, before + kinks * remaining, before)
    reached = at_kink >= gap[:, None]
    first = (~reached).sum(1, keepdim=True)  # the first kink at or beyond the plane
    found = first[:, 0] < kinks.shape[1]
    first = first.clamp_max(kinks.shape[1] - 1)
    parameter = (gap[:, None] - before.gather(1, first)) / remaining.gather(1, first).clamp_min(1e-300)
    parameter = torch.where(found[:, None], parameter.clamp_min(0), torch.full_like(parameter, torch.inf))
    scale = parameter if norm == "linf" else parameter * size
    move = torch.minimum(torch.nan_to_num(scale, posinf=torch.finfo(torch.float64).max), room)
    return (torch.sign(w) * move).to(dtype)


def move_size(move: torch.Tensor, norm: str) -> torch.Tensor:
    """``(N,)`` the size of each flat row of ``move`` in the geometry of ``norm`` (L∞, or L2 for
    ``"l2"`` and ``"rms"``, whose minimal points coincide)."""
    return move.abs().amax(1) if norm == "linf" else move.norm(dim=1)


class FAB(Attack):
    """The fast adaptive boundary attack: the smallest perturbation it can find in ``norm``.

    Args:
        norm: ``"linf"``, ``"l2"`` or ``"rms"`` (searched as L2).
        steps: boundary steps per row (AutoAttack's standard: 100).
        guide_rank: untargeted, linearise towards the ``guide_rank``-th most likely wrong class by
            the clean logits (1: the runner-up).
        alpha_max: the largest weight of the clean input's projection in a step.
        eta: overshoot of each projection (above 1 lands just past the linearised boundary).
        beta: where a step lands on a wrong class, how far back towards the clean input the search
            goes on (a share of the distance kept).
        target: the default target policy (see :class:`~advtrain.attacks.base.Attack`).

    Raises:
        ValueError: an unknown norm, ``steps`` or ``guide_rank`` below 1, ``alpha_max`` or ``beta``
            outside [0, 1], ``eta`` below 1, ``target="nearest"``.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> result = FAB(norm="l2", steps=20)(model, torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
        >>> bool((result.l2[result.success] < 4).all())
        True

    Reference: Croce & Hein (2020).
    """

    def __init__(self, *, norm: Norm = "linf", steps: int = 100, guide_rank: int = 1, alpha_max: float = 0.1,
                 eta: float = 1.05, beta: float = 0.9, target: TargetPolicy = "untargeted") -> None:
        check_norm(norm)
        check_count("steps", steps)
        check_count("guide_rank", guide_rank)
        for name, value in (("alpha_max", alpha_max), ("beta", beta)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        if not eta >= 1:
            raise ValueError(f"eta must be at least 1 (the overshoot past the linearised boundary), got {eta!r}")
        super().__init__(target=target)
        self.norm = norm
        self.steps = steps
        self.guide_rank = guide_rank
        self.alpha_max = float(alpha_max)
        self.eta = float(eta)
        self.beta = float(beta)

    def propose(self, model: Head, batch: CheckedBatch, targets: torch.Tensor | None, policy: TargetPolicy | torch.Tensor,
                generator: torch.Generator) -> Proposal:
        """``steps`` boundary steps on every row; the smallest wrong point found per row."""
        shape = batch.inputs.shape
        origin = batch.inputs.flatten(1)
        labels, lower, upper = batch.labels, batch.lower, batch.upper
        if targets is None:
            ranked = ranked_wrong_classes(batch.clean_logits, labels)
            guide = ranked[:, min(self.guide_rank, ranked.shape[1]) - 1]
        else:
            guide = targets
        rows = torch.arange(shape[0], device=origin.device)

        def linearised(points: torch.Tensor, subset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """The logits at ``points`` (rows ``subset``) and the gradient of ``z_guide − z_y``."""
            points = points.detach().requires_grad_(True)
            logits = head_for_rows(model, subset)(points.view(-1, *shape[1:]))
            picked = torch.arange(subset.numel(), device=origin.device)
            difference = logits[picked, guide[subset]] - logits[picked, labels[subset]]
            (gradient,) = torch.autograd.grad(difference.sum(), points)
            return logits.detach(), gradient.flatten(1)

        def wrong(logits: torch.Tensor, subset: torch.Tensor) -> torch.Tensor:
            reached = logits.argmax(1)
            return reached != labels[subset] if targets is None else reached == targets[subset]

        point = origin.clone()
        logits, gradient = linearised(point, rows)
        best = origin.clone()
        best_size = torch.full((shape[0],), torch.inf, device=origin.device, dtype=origin.dtype)
        for _ in range(self.steps):
            difference = logits[rows, guide] - logits[rows, labels]
            level = (gradient * point).sum(1) - difference
            moves = plane_step(torch.cat([point, origin]), torch.cat([lower, lower]), torch.cat([upper, upper]),
                               torch.cat([gradient, gradient]), torch.cat([level, level]), self.norm)
            from_point, from_origin = moves[: shape[0]], moves[shape[0]:]
            near, far = move_size(from_point, self.norm).clamp_min(1e-8), move_size(from_origin, self.norm).clamp_min(1e-8)
            alpha = (near / (near + far)).clamp(0, self.alpha_max)[:, None]
            point = ((point + self.eta * from_point) * (1 - alpha) + (origin + self.eta * from_origin) * alpha)
            point = torch.minimum(torch.maximum(point, lower), upper)
            logits, gradient = linearised(point, rows)
            fooled = wrong(logits, rows)
            if fooled.any():
                size = move_size(point - origin, self.norm)
                better = fooled & (size < best_size)
                best[better], best_size[better] = point[better], size[better]
                back = fooled.nonzero()[:, 0]
                point[back] = origin[back] + self.beta * (point[back] - origin[back])
                logits[back], gradient[back] = linearised(point[back], back)
        found = best_size.isfinite()
        return Proposal(best.view(shape), found, iterations=torch.full_like(labels, self.steps))


__all__ = ["FAB", "move_size", "plane_step"]
