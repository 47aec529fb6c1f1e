"""The result of an attack: one batch-first dataclass."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttackResult:
    """What an attack found for each example of a batch.

    Attributes:
        adversarial: the adversarial inputs ``x + r``, inside the box, same shape as the inputs.
        perturbation: ``r = adversarial - inputs``; zero where the search failed.
        success: ``(N,)`` bool, checked by a fresh forward pass: the head's argmax is the target
            and every value lies inside the box.
        distortion: ``(N,)`` ``sqrt(mean r²)``, the paper's measure; ``inf`` where it failed.
        l2: ``(N,)`` ``‖r‖₂``; ``inf`` where it failed.
        target: ``(N,)`` the label each example was pushed to.
        c: ``(N,)`` the penalty weight of the best success (``nan`` where none).
        iterations: ``(N,)`` optimizer iterations spent on each example.
    """

    adversarial: torch.Tensor
    perturbation: torch.Tensor
    success: torch.Tensor
    distortion: torch.Tensor
    l2: torch.Tensor
    target: torch.Tensor
    c: torch.Tensor
    iterations: torch.Tensor

    def __len__(self) -> int:
        return self.success.shape[0]

    @property
    def success_rate(self) -> float:
        """Fraction of examples for which the search succeeded."""
        return float(self.success.float().mean()) if len(self) else 0.0

    @property
    def mean_distortion(self) -> float:
        """Mean distortion over the successful examples (``nan`` if none)."""
        return float(self.distortion[self.success].mean()) if bool(self.success.any()) else float("nan")

    def to(self, device: torch.device | str) -> "AttackResult":  # the same class: subclasses add fields
        """The same result with every tensor on ``device``."""
        return type(self)(**{name: value.to(device) for name, value in vars(self).items()})
