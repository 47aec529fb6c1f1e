"""DDN: decoupled direction and norm, a minimal-perturbation search in L2 (Rony et al., 2019).

Each step moves the perturbation ``δ`` along the normalised gradient of the cross-entropy (away
from the true class, or towards a target; its direction computed so that a saturated softmax does
not zero it, :func:`cross_entropy_direction`), with a step size annealed from ``max_step`` to a
hundredth of it on a cosine; then it rescales ``δ`` to the norm ``ε``, which shrinks by ``gamma``
while the current point is misclassified and grows by ``gamma`` while it is not, and clips the
point into the box. The smallest misclassified point seen is the result. The direction comes from
the gradient and the size from the budget's own walk, so the search settles on the boundary
instead of stopping at the first point over it.

On a model trained by fast adversarial training, where the loss surface is sharply curved close
to the inputs, this walk finds points inside an L2 budget that fixed-budget attacks from the clean
input or a random start miss (docs/adversarial-training.md).

Sizes: ``max_step`` and ``init_epsilon`` are multiples of the box's mean side (1 for pixels in
[0, 1], Rony et al.'s and Foolbox's setting), or, where the box is open on some side, of a tenth
of each row's L2 norm.

Reference: Rony, Hafemann, Oliveira, Ben Ayed, Sabourin, Granger, "Decoupling direction and norm
for efficient gradient-based L2 adversarial attacks and defenses", CVPR 2019 (Algorithm 1).
"""

from __future__ import annotations

import math

import torch

from advtrain.attacks.base import Attack, Proposal
from advtrain.attacks.inputs import CheckedBatch, Head
from advtrain.attacks.targets import TargetPolicy
from advtrain.budget import Norm, check_norm
from advtrain.checks import check_count


def step_scale(batch: CheckedBatch) -> torch.Tensor:
    """``(N,)`` the unit of DDN's sizes per row: the box's mean side where the box is closed, else a
    tenth of the row's L2 norm (at least 1e-6)."""
    flat = batch.inputs.flatten(1)
    sides = batch.upper - batch.lower
    if bool(sides.isfinite().all()):
        return sides.mean(1)
    return (0.1 * flat.norm(dim=1)).clamp_min(1e-6)


def cross_entropy_direction(logits: torch.Tensor, aim: torch.Tensor, aimed: torch.Tensor, targeted: bool) -> torch.Tensor:
    """A scalar whose gradient points where the cross-entropy's does (up, away from the labels
    ``aim``; or, ``targeted``, down, towards the targets ``aim``), and does not vanish where the
    softmax saturates.

    Away from ``y``: ``∇CE = Σ_{j≠y} p_j (∇z_j − ∇z_y)``; towards ``t``: ``−∇CE = Σ_{j≠t} p_j (∇z_t − ∇z_j)``.
    Only the ratios of the ``p_j`` over the other classes matter to the direction, and those are the
    softmax of the other classes' logits alone, which stays finite when ``p_y`` rounds to 1.
    ``aimed`` is the one-hot mask of ``aim``.
    """
    weights = torch.softmax(logits.detach().masked_fill(aimed, -torch.inf), dim=1)
    chosen = logits.gather(1, aim[:, None])
    return (weights * ((chosen - logits) if targeted else (logits - chosen))).sum()


class DDN(Attack):
    """Decoupled direction and norm: the smallest L2 perturbation it can find.

    Args:
        norm: ``"l2"`` or ``"rms"`` (searched as L2; their minimal points coincide).
        steps: gradient steps per row (Rony et al. use 100 to 1,000; the evaluation 1,000).
        gamma: how much the norm ``ε`` shrinks or grows per step.
        init_epsilon: the first ``ε``, in the unit of the module docstring.
        max_step: the first (largest) step, in the same unit.
        target: the default target policy (see :class:`~advtrain.attacks.base.Attack`).

    Raises:
        ValueError: a norm other than L2 or ``rms``, ``steps`` below 1, ``gamma`` outside (0, 1),
            ``init_epsilon`` or ``max_step`` not positive, ``target="nearest"``.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> result = DDN(steps=50)(model, torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]))
        >>> bool((result.l2[result.success] < 4).all())
        True

    Reference: Rony et al. (2019).
    """

    def __init__(self, *, norm: Norm = "l2", steps: int = 1000, gamma: float = 0.05, init_epsilon: float = 1.0,
                 max_step: float = 1.0, target: TargetPolicy = "untargeted") -> None:
        check_norm(norm)
        if norm == "linf":
            raise ValueError("DDN searches in L2 (norm 'l2' or 'rms'); for L∞ use FAB or APGD")
        check_count("steps", steps)
        if not 0 < gamma < 1:
            raise ValueError(f"gamma must lie in (0, 1), got {gamma!r}")
        for name, value in (("init_epsilon", init_epsilon), ("max_step", max_step)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        super().__init__(target=target)
        self.norm = norm
        self.steps = steps
        self.gamma = float(gamma)
        self.init_epsilon = float(init_epsilon)
        self.max_step = float(max_step)

    def propose(self, model: Head, batch: CheckedBatch, targets: torch.Tensor | None, policy: TargetPolicy | torch.Tensor,
                generator: torch.Generator) -> Proposal:
        """``steps`` DDN steps on every row; the smallest wrong point seen per row."""
        shape = batch.inputs.shape
        origin = batch.inputs.flatten(1)
        lower, upper = batch.lower, batch.upper
        scale = step_scale(batch)
        aim = batch.labels if targets is None else targets
        aimed = torch.nn.functional.one_hot(aim, batch.num_classes).bool()
        epsilon = self.init_epsilon * scale
        widest = torch.maximum(origin - lower, upper - origin).norm(dim=1)  # no point of the box is further away
        delta = torch.zeros_like(origin)
        best = origin.clone()
        best_size = torch.full((shape[0],), math.inf, device=origin.device, dtype=origin.dtype)
        for step in range(self.steps):
            size = self.max_step * (0.01 + 0.99 * (1 + math.cos(math.pi * step / self.steps)) / 2)
            delta.requires_grad_(True)
            logits = model((origin + delta).view(shape))
            (gradient,) = torch.autograd.grad(cross_entropy_direction(logits, aim, aimed, targets is not None), delta)
            delta = delta.detach()
            reached = logits.detach().argmax(1)
            fooled = reached != batch.labels if targets is None else reached == targets
            length = delta.norm(dim=1)
            better = fooled & (length < best_size)
            best[better], best_size[better] = origin[better] + delta[better], length[better]
            delta = delta + (size * scale)[:, None] * gradient / gradient.norm(dim=1, keepdim=True).clamp_min(1e-12)
            epsilon = torch.minimum(torch.where(fooled, epsilon * (1 - self.gamma), epsilon * (1 + self.gamma)), widest)
            delta = delta * (epsilon / delta.norm(dim=1).clamp_min(1e-12))[:, None]
            delta = torch.minimum(torch.maximum(origin + delta, lower), upper) - origin
        return Proposal(best.view(shape), best_size.isfinite(), iterations=torch.full_like(batch.labels, self.steps))


__all__ = ["DDN", "cross_entropy_direction", "step_scale"]
