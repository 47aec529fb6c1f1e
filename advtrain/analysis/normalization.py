"""Contrast normalisation, the layer whose Lipschitz bound the paper's Section 4.3 derives."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ContrastNormalization(nn.Module):
    """``x / (eps + ‖x‖²)^gamma``, the norm taken per example over ``dims`` (default: all but the batch).

    Args:
        eps: the positive constant; the layer's Lipschitz bound is ``eps^(-gamma)``.
        gamma: the exponent, in [0, 1] (the paper uses [0.5, 1]; the bound holds on all of [0, 1]).
        dims: the dimensions the norm runs over.

    Reference: Szegedy et al. (2013), Section 4.3.
    """

    def __init__(self, eps: float = 1.0, gamma: float = 0.5, dims: Sequence[int] | None = None) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1] (the Lipschitz bound eps^-gamma needs it), got {gamma}")
        self.eps, self.gamma = float(eps), float(gamma)
        self.dims = None if dims is None else tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each example's contrast."""
        dims = self.dims if self.dims is not None else tuple(range(1, x.dim()))
        return x / (self.eps + x.pow(2).sum(dim=dims, keepdim=True)).pow(self.gamma)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, gamma={self.gamma}, dims={self.dims}"
