"""Batched projected L-BFGS: box-constrained optima, with a step ladder run on forward passes only."""

from __future__ import annotations

import torch

from advtrain.attacks.lbfgs import projected_lbfgs


def rosenbrock(calls: list[bool]):
    """Per-row Rosenbrock ``(1 − u)² + 100(v − u²)²`` as an objective that records ``with_gradient``."""

    def objective(x: torch.Tensor, rows: torch.Tensor, with_gradient: bool):
        calls.append(with_gradient)
        x = x.detach().requires_grad_(with_gradient)
        with torch.set_grad_enabled(with_gradient):
            u, v = x[:, 0], x[:, 1]
            value = (1 - u).pow(2) + 100 * (v - u * u).pow(2)
        gradient = torch.autograd.grad(value.sum(), x)[0] if with_gradient else None
        return value.detach(), gradient, x.detach()[:, :1]

    return objective


def test_rosenbrock_inside_and_against_a_box() -> None:
    """Row 0 reaches the free minimum (1, 1); row 1, with u ≤ 0.5, the constrained one (0.5, 0.25)."""
    start = torch.tensor([[-1.2, 1.0], [-1.2, 1.0]], dtype=torch.float64)
    lower = torch.full_like(start, -2.0)
    upper = torch.tensor([[2.0, 2.0], [0.5, 2.0]], dtype=torch.float64)
    calls: list[bool] = []
    final, used, _ = projected_lbfgs(rosenbrock(calls), start, lower, upper, iterations=200, tolerance=1e-10,
                                     relative_decrease=0.0)
    torch.testing.assert_close(final, torch.tensor([[1.0, 1.0], [0.5, 0.25]], dtype=torch.float64), atol=1e-4, rtol=0)
    assert (used > 0).all()
    assert False in calls  # the step ladder ran, on forward passes only

