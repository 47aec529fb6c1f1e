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
        linf: ``(N,)`` ``max |r|``; ``inf`` where it failed.
        target: ``(N,)`` the label each example was pushed to (untargeted: the class it reached,
            or the clean runner-up where it failed).
        c: ``(N,)`` the penalty weight of the best success (``nan`` where none, and for attacks
            without one).
        iterations: ``(N,)`` iterations spent on each example.
        attempt: for fixed-budget attacks (a fast-gradient or PGD step), where every row was
            taken, fooled or not: the fixed-budget training example; ``None`` for searches.
    """

    adversarial: torch.Tensor
    perturbation: torch.Tensor
    success: torch.Tensor
    distortion: torch.Tensor
    l2: torch.Tensor
    target: torch.Tensor
    c: torch.Tensor
    iterations: torch.Tensor
    linf: torch.Tensor | None = None
    attempt: torch.Tensor | None = None

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

    def to(self, device: torch.device | str) -> "AttackResult":
        """The same result with every tensor on ``device``."""
        return AttackResult(**{name: None if value is None else value.to(device) for name, value in vars(self).items()})

    def select(self, rows: torch.Tensor) -> "AttackResult":
        """The result for some rows (a mask or indices)."""
        return AttackResult(**{name: None if value is None else value[rows] for name, value in vars(self).items()})
