"""One budget vocabulary: sizes, projections and steps in L-inf, L2 and the paper's sqrt(mean r²)."""

from __future__ import annotations

import math

import pytest
import torch

from advtrain.attacks import AttackResult
from advtrain.budget import check_epsilon, check_norm, perturbation_size, project, step_direction
from advtrain.pooling import WithinBudget


def test_sizes_in_each_norm() -> None:
    r = torch.tensor([[3.0, -4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
    assert torch.allclose(perturbation_size(r, "linf"), torch.tensor([4.0, 0.5]))
    assert torch.allclose(perturbation_size(r, "l2"), torch.tensor([5.0, 0.5]))
    assert torch.allclose(perturbation_size(r, "rms"), torch.tensor([2.5, 0.25]))  # l2 / sqrt(4)


@pytest.mark.parametrize("norm", ["linf", "l2", "rms"])
def test_projection_lands_on_the_ball_and_keeps_what_is_inside(norm: str) -> None:
    r = torch.randn(32, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    epsilon = 0.3
    projected = project(r, epsilon, norm)
    sizes = perturbation_size(projected, norm)
    assert (sizes <= epsilon * (1 + 1e-6)).all() and torch.allclose(sizes, torch.full_like(sizes, epsilon))
    small = r * (0.1 * epsilon / perturbation_size(r, norm)).view(-1, 1, 1, 1)
    assert torch.allclose(project(small, epsilon, norm), small)


@pytest.mark.parametrize("norm", ["linf", "l2", "rms"])
def test_steps_have_unit_size_and_ascend(norm: str) -> None:
    gradient = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    step = step_direction(gradient, norm)
    assert torch.allclose(perturbation_size(step, norm), torch.ones(8))
    assert ((step * gradient).sum(1) > 0).all()
    assert torch.equal(step_direction(torch.zeros(2, 10), norm), torch.zeros(2, 10))


def test_bad_norms_and_budgets_are_named() -> None:
    with pytest.raises(ValueError, match=r"norm must be one of 'linf', 'l2', 'rms'.*got 'l1'"):
        check_norm("l1")
    for bad in (0.0, -1.0, math.inf, math.nan, True, "0.1"):
        with pytest.raises(ValueError, match="epsilon must be positive and finite"):
            check_epsilon(bad)


def _result(inputs: torch.Tensor, adversarial: torch.Tensor) -> AttackResult:
    r = adversarial - inputs
    flat = r.flatten(1)
    n = inputs.shape[0]
    return AttackResult(adversarial=adversarial, perturbation=r, success=torch.ones(n, dtype=torch.bool),
                        distortion=flat.norm(dim=1) / math.sqrt(flat.shape[1]), l2=flat.norm(dim=1),
                        target=torch.zeros(n, dtype=torch.long), c=torch.full((n,), math.nan),
                        iterations=torch.zeros(n, dtype=torch.long), linf=flat.abs().amax(1))


def test_within_budget_in_linf_drops_projects_and_stretches() -> None:
    inputs = torch.full((3, 4), 0.5)
    # binary fractions, so that the sizes are exact
    adversarial = inputs + torch.tensor([[0.0625, 0.0, 0.0, 0.0], [0.25, -0.125, 0.0, 0.0], [0.125, 0.0, 0.0, 0.0]])
    result = _result(inputs, adversarial)
    _, keep = WithinBudget(0.125, norm="linf")(inputs, result, (0.0, 1.0))
    assert keep.tolist() == [True, False, True]
    examples, keep = WithinBudget(0.125, norm="linf", beyond="project", stretch=True)(inputs, result, (0.0, 1.0))
    assert keep.all()
    assert torch.equal(examples - inputs, torch.tensor([[0.125, 0.0, 0.0, 0.0], [0.125, -0.125, 0.0, 0.0],
                                                        [0.125, 0.0, 0.0, 0.0]]))
