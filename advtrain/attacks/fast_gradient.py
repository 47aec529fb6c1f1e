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
from dataclasses import dataclass

import torch
from torch import nn

from advtrain.attacks.inputs import BoundsArg, FrozenParameters, Head, checked_batch
from advtrain.attacks.result import AttackResult
from advtrain.attacks.targets import TargetPolicy, choose_targets


@dataclass
class FastGradientResult(AttackResult):
    """An :class:`AttackResult` that also keeps where the step took every row, fooled or not.

    Attributes:
        stepped: ``x + ε·g/‖g‖₂`` clipped to the box, for every row: the fixed-budget training
            example (``adversarial`` holds it only where it fooled the head, as for any attack).
    """

    stepped: torch.Tensor


class FastGradient:
    """One L2 gradient step of a fixed size, clipped to the box.

    Args:
        distortion: the step's ``sqrt(mean r²)`` before clipping (its L2 norm over ``sqrt(n)``, n
            values per example).
        seed: seeds the ``"random"`` target policy.
    """

    def __init__(self, *, distortion: float = 0.036, seed: int = 0) -> None:
        if not (distortion > 0 and math.isfinite(distortion)):
            raise ValueError(f"distortion must be positive and finite, got {distortion}")
        self.distortion = float(distortion)
        self.seed = seed

    def __repr__(self) -> str:
        return f"{type(self).__name__}(distortion={self.distortion!r}, seed={self.seed!r})"

    def __call__(
        self,
        head: Head,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        target: TargetPolicy | torch.Tensor = "untargeted",
        bounds: BoundsArg = (0.0, 1.0),
    ) -> FastGradientResult:
        """Step every row of ``inputs`` (see :class:`advtrain.attacks.BoxLBFGS` for the arguments).

        ``target`` is ``"untargeted"`` (up the true label's loss), a policy that names a wrong class
        (``"random"``, ``"runner_up"``, ``"least_likely"``; down that class's loss) or ``(N,)`` labels.
        ``"nearest"`` needs a search per wrong class, which one step cannot make.
        """
        if isinstance(target, str) and target == "nearest":
            raise ValueError("FastGradient takes one step and cannot search every wrong class; "
                             "use target='untargeted' (or BoxLBFGS for 'nearest')")
        with torch.inference_mode(False), torch.enable_grad(), FrozenParameters(head):
            batch = checked_batch(head, inputs, labels, bounds)
            inputs, labels, lower, upper = batch.inputs, batch.labels, batch.lower, batch.upper
            clean_logits, num_classes = batch.clean_logits, batch.num_classes
            untargeted = isinstance(target, str) and target == "untargeted"
            targets = labels if untargeted else choose_targets(target, labels, clean_logits, num_classes, seed=self.seed)
            start = inputs.requires_grad_(True)
            loss = nn.functional.cross_entropy(head(start), targets, reduction="sum")
            gradient, = torch.autograd.grad(loss if untargeted else -loss, start)
        flat = gradient.flatten(1)
        step = math.sqrt(flat.shape[1]) * self.distortion
        direction = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
        stepped = torch.clamp(inputs.detach().flatten(1) + step * direction, lower, upper).view_as(inputs)
        with torch.no_grad():
            logits = head(stepped)
        reached = logits.argmax(1)
        success = reached != labels if untargeted else reached == targets
        if untargeted:
            runner_up = choose_targets("runner_up", labels, clean_logits, num_classes)
            targets = torch.where(success, reached, runner_up)
        rows = success.view(-1, *[1] * (inputs.ndim - 1))
        adversarial = torch.where(rows, stepped, inputs.detach())
        perturbation = adversarial - inputs.detach()
        l2 = torch.where(success, perturbation.flatten(1).norm(dim=1), torch.full_like(success, math.inf, dtype=inputs.dtype))
        return FastGradientResult(
            adversarial=adversarial, perturbation=perturbation, success=success,
            distortion=l2 / math.sqrt(flat.shape[1]), l2=l2, target=targets,
            c=torch.full_like(l2, math.nan), iterations=torch.ones_like(labels), stepped=stepped,
        )
