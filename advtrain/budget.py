"""The size of a perturbation, named one way everywhere: a norm and an ``epsilon``.

Three norms, each measured per example over every value of the example:

- ``"linf"``: ``max |r|``, the usual L∞ threat model (MNIST ε = 0.3, CIFAR-10 ε = 8/255);
- ``"l2"``: ``‖r‖₂``, the usual L2 threat model;
- ``"rms"``: ``sqrt(mean r²) = ‖r‖₂ / sqrt(n)``, the paper's distortion (Szegedy et al., Section
  4.1), comparable across input sizes.

Every attack with a fixed budget, every pooling policy that holds examples to a budget and the
evaluation take ``epsilon=`` and ``norm=`` with these meanings.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Norm = Literal["linf", "l2", "rms"]
NORMS: tuple[str, ...] = ("linf", "l2", "rms")


def check_norm(norm: object, *, name: str = "norm") -> str:
    """``norm`` after checking it is one of :data:`NORMS`.

    Raises:
        ValueError: anything else, listing the norms.
    """
    if norm not in NORMS:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, NORMS))} (L-inf, L2, or the paper's "
                         f"sqrt(mean r²)), got {norm!r}")
    return str(norm)


def check_epsilon(epsilon: object, *, name: str = "epsilon") -> float:
    """``epsilon`` as a float after checking it is positive and finite.

    Raises:
        ValueError: not a positive finite number.
    """
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"{name} must be positive and finite, got {epsilon!r}")
    return float(epsilon)


def perturbation_size(perturbation: torch.Tensor, norm: str) -> torch.Tensor:
    """``(N,)`` the size of each row of ``perturbation`` ``(N, ...)`` in ``norm``."""
    flat = perturbation.flatten(1)
    if norm == "linf":
        return flat.abs().amax(1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    l2 = flat.norm(dim=1)
    return l2 if norm == "l2" else l2 / math.sqrt(max(1, flat.shape[1]))


def l2_radius(epsilon: float, norm: str, values: int) -> float:
    """The L2 radius of an ``"l2"`` or ``"rms"`` ball of size ``epsilon`` over ``values`` values."""
    return epsilon * math.sqrt(values) if norm == "rms" else epsilon


def project(perturbation: torch.Tensor, epsilon: float, norm: str) -> torch.Tensor:
    """Each row of ``perturbation`` projected onto the ``norm`` ball of size ``epsilon`` (rows inside it
    are kept as they are). Inside a convex box that holds the clean point, the projected point stays
    inside the box."""
    if norm == "linf":
        return perturbation.clamp(-epsilon, epsilon)
    flat = perturbation.flatten(1)
    radius = l2_radius(epsilon, norm, flat.shape[1])
    norms = flat.norm(dim=1, keepdim=True)
    return (flat * (radius / norms.clamp_min(radius))).view_as(perturbation)


def random_point_in_ball(origin: torch.Tensor, epsilon: float, norm: str, generator: torch.Generator, *,
                         uniform_radius: bool = False) -> torch.Tensor:
    """A random point of the ε-ball around each flat row of ``origin`` ``(N, D)`` (not clipped to
    any box): uniform in L∞; in L2 and rms along a uniformly random direction, at a radius uniform
    in the ball's volume (``u^(1/D)``, PGD's start) or, with ``uniform_radius``, uniform in [0, ε]
    (APGD's). The random numbers are drawn on the CPU from ``generator``, so a seed gives the
    same point on every device."""
    shape, dims = origin.shape, origin.shape[1]
    if norm == "linf":
        noise = torch.rand(shape, generator=generator, dtype=origin.dtype) * 2 - 1
        return origin + epsilon * noise.to(origin.device)
    direction = torch.randn(shape, generator=generator, dtype=origin.dtype)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(torch.finfo(origin.dtype).tiny)
    radius = torch.rand((shape[0], 1), generator=generator, dtype=origin.dtype)
    if not uniform_radius:
        radius = radius.pow(1.0 / dims)
    return origin + (l2_radius(epsilon, norm, dims) * radius * direction).to(origin.device)


def step_direction(gradient: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit size in ``norm`` for each row of ``gradient``: its sign
    for ``"linf"``, the gradient over its L2 norm for ``"l2"``, and that times ``sqrt(n)`` for
    ``"rms"`` (unit ``sqrt(mean r²)``). A zero gradient gives a zero direction."""
    if norm == "linf":
        return gradient.sign()
    flat = gradient.flatten(1)
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    return (unit * l2_radius(1.0, norm, flat.shape[1])).view_as(gradient)


__all__ = ["NORMS", "Norm", "check_epsilon", "check_norm", "l2_radius", "perturbation_size", "project", "step_direction"]
