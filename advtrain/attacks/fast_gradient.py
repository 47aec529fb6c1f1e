"""A fixed-budget fast-gradient step in L2: the cheap adversary of adversarial training.

``x′ = clip(x + ε·g/‖g‖₂)`` with g the gradient of the cross-entropy: ascending it at the true label
(untargeted) or descending it at a target label. ε is given as the paper's distortion,
``sqrt(mean r²)``, so ``distortion=0.036`` is an L2 step of about 1.0 on a 28×28 image. One forward
and one backward pass per batch, against the L-BFGS search's dozens; it finds no minimal
perturbation, only a perturbation of a fixed size in the direction that first hurts most.

Reference: Goodfellow et al., "Explaining and harnessing adversarial examples" (2014), in the L2
form of Miyato et al., "Distributional smoothing with virtual adversarial training" (2015).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from advtrain.attacks.base import Attack, Proposal
from advtrain.attacks.inputs import CheckedBatch, Head
from advtrain.attacks.targets import TargetPolicy


class FastGradient(Attack):
    """One L2 gradient step of a fixed size, clipped to the box.

    Every row gets its step, fooled or not (``result.attempt``); ``result.adversarial`` holds it
    where it fooled the model. ``"nearest"`` needs a search per wrong class, which one step cannot
    make, and is refused.

    Args:
        distortion: the step's ``sqrt(mean r²)`` before clipping (its L2 norm over ``sqrt(n)``, n
            values per example).
        target: the default target policy (see :class:`~advtrain.attacks.base.Attack`).

    Raises:
        ValueError: a step that is not positive and finite; ``target="nearest"``.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> result = FastGradient(distortion=0.1)(model, torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> result.attempt.shape
        torch.Size([5, 4])

    Reference: Goodfellow et al. (2014).
    """

    fixed_budget = True

    def __init__(self, *, distortion: float = 0.036, target: TargetPolicy = "untargeted") -> None:
        if not (distortion > 0 and math.isfinite(distortion)):
            raise ValueError(f"distortion must be positive and finite, got {distortion}")
        super().__init__(target=target)
        self.distortion = float(distortion)

    def propose(self, model: Head, batch: CheckedBatch, targets: torch.Tensor | None, policy: TargetPolicy | torch.Tensor,
                generator: torch.Generator) -> Proposal:
        """One step up the true label's loss (untargeted) or down the target's."""
        start = batch.inputs.clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(model(start), batch.labels if targets is None else targets, reduction="sum")
        (gradient,) = torch.autograd.grad(loss if targets is None else -loss, start)
        flat = gradient.flatten(1)
        step = math.sqrt(flat.shape[1]) * self.distortion
        direction = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
        stepped = torch.clamp(batch.inputs.flatten(1) + step * direction, batch.lower, batch.upper)
        rows = len(batch.labels)
        return Proposal(stepped.view_as(batch.inputs), torch.ones(rows, dtype=torch.bool, device=stepped.device),
                        iterations=torch.ones(rows, dtype=torch.long, device=stepped.device))
