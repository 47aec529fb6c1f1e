"""Metrics as torchmetrics ``Metric``s, so distributed runs reduce them for free."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class ErrorRate(Metric):
    """Fraction of examples whose predicted class differs from the label.

    Example::

        metric = ErrorRate()
        metric.update(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]))
        metric.compute()  # tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("errors", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Count the mistakes of one batch of logits ``(N, C)`` against labels ``(N,)``."""
        self.errors += (logits.argmax(dim=1) != labels).sum()
        self.total += labels.numel()

    def compute(self) -> torch.Tensor:
        """The error rate so far (0 before any update)."""
        return self.errors.float() / self.total.clamp(min=1)
