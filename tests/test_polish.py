"""The walks along the decision boundary after a search: the polish reaches the closest boundary
point of a linear model from a poor start, the walk from the clean input reaches a nearer part of
the boundary than the one the search found; neither ends a row worse or outside the box, both keep
the target, and both are the evaluation's default search with threat models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.attacks import BoxLBFGS, evaluation_search
from advtrain.attacks.box_lbfgs import _leaves_by_margin, _reaches_by_margin
from advtrain.attacks.polish import polish_on_boundary, walk_from_clean
from advtrain.callbacks import AdversarialEvaluation


def binary_linear(dims: int = 20) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(dims, 2).double()


def test_a_poor_start_reaches_the_closest_boundary_point_of_a_linear_model() -> None:
    """From twice the minimal step plus as much again at right angles, the walk ends within 0.3% of
    the exact distance to the hyperplane (and never below it, which would be a point wrongly counted
    as adversarial)."""
    head = binary_linear()
    inputs = torch.rand(6, 20, dtype=torch.float64) * 0.2 + 0.4
    with torch.no_grad():
        logits = head(inputs)
    labels = logits.argmax(1)
    normal = (head.weight[1 - labels] - head.weight[labels]).detach()  # (N, D): towards the other class
    gap = (logits.gather(1, labels[:, None]) - logits.gather(1, (1 - labels)[:, None]))[:, 0]
    exact = gap / normal.norm(dim=1)
    along = normal / normal.norm(dim=1, keepdim=True)
    across = torch.randn(6, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    across -= (across * along).sum(1, keepdim=True) * along
    across = across / across.norm(dim=1, keepdim=True)
    start = inputs + 2 * exact[:, None] * (along + across)
    lower, upper = torch.full_like(inputs, -10.0), torch.full_like(inputs, 10.0)
    assert (head(start).argmax(1) != labels).all()
    ends = polish_on_boundary(head, inputs, start, torch.ones(6, dtype=torch.bool), labels, True, _leaves_by_margin,
                              lower, upper, inputs.shape, steps=100).detach()
    sizes = (ends - inputs).norm(dim=1)
    assert (head(ends).argmax(1) != labels).all()
    assert (sizes <= 1.003 * exact).all(), (sizes / exact).tolist()
    assert (sizes >= exact * (1 - 1e-6)).all()
    assert ((start - inputs).norm(dim=1) > 2.8 * exact).all()  # the start was far from it


class TwoFaces(nn.Module):
    """Class 1 wins where ``a·r ≥ near`` or ``b·r ≥ far`` (``r = x − origin``, ``a ⟂ b``): two parts
    of the boundary, the nearer one along ``a``, which the gradient at the clean input points to."""

    def __init__(self, origin: torch.Tensor, near: float, far: float) -> None:
        super().__init__()
        basis, _ = torch.linalg.qr(torch.randn(origin.shape[1], 2, dtype=torch.float64,
                                               generator=torch.Generator().manual_seed(4)))
        self.origin, self.a, self.b, self.near, self.far = origin, basis[:, 0], basis[:, 1], near, far

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x - self.origin
        face = torch.maximum(r @ self.a - self.near, r @ self.b - self.far)
        return torch.stack([torch.zeros_like(face), face], dim=1)


def test_the_walk_from_the_clean_input_reaches_the_nearer_part_of_the_boundary_the_polish_does_not() -> None:
    """Found just past the far part (1.5 away), the polish stays there; the walk from the clean
    input ends at the near part (1.0 away) within 0.5%."""
    inputs = torch.full((3, 20), 0.5, dtype=torch.float64)
    head = TwoFaces(inputs[:1], near=1.0, far=1.5)
    labels = torch.zeros(3, dtype=torch.long)
    start = inputs + 1.501 * head.b
    lower, upper = torch.full_like(inputs, -10.0), torch.full_like(inputs, 10.0)
    found = torch.ones(3, dtype=torch.bool)
    assert (head(start).argmax(1) == 1).all()
    polished = polish_on_boundary(head, inputs, start, found, labels, True, _leaves_by_margin, lower, upper,
                                  inputs.shape, steps=100)
    walked = walk_from_clean(head, inputs, start, found, labels, True, _leaves_by_margin, lower, upper,
                             inputs.shape, steps=100)
    assert ((polished - inputs).norm(dim=1) > 1.49).all()  # the polish keeps to the part it was given
    sizes = (walked - inputs).norm(dim=1)
    assert ((sizes >= 1.0) & (sizes <= 1.005)).all(), sizes.tolist()
    assert (head(walked).argmax(1) == 1).all()


def test_the_walk_from_the_clean_input_keeps_a_row_it_cannot_improve() -> None:
    """Where the found point is already the nearest, the row comes back as found."""
    inputs = torch.full((2, 20), 0.5, dtype=torch.float64)
    head = TwoFaces(inputs[:1], near=1.0, far=1.5)
    start = inputs + 1.0001 * head.a
    walked = walk_from_clean(head, inputs, start, torch.tensor([True, False]), torch.zeros(2, dtype=torch.long), True,
                             _leaves_by_margin, torch.full_like(inputs, -10.0), torch.full_like(inputs, 10.0),
                             inputs.shape, steps=50)
    assert (walked - inputs).norm(dim=1)[0] <= 1.0001 + 1e-9
    assert torch.equal(walked[1], start[1])  # not found: left alone


def relu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 32), nn.ReLU(), nn.Linear(32, 5))


def test_polish_never_ends_a_row_worse_or_outside_the_box_and_counts_its_steps() -> None:
    net = relu_net()
    inputs = torch.rand(24, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    bounds = (torch.full((1, 6, 6), 0.0), torch.linspace(0.7, 1.0, 36).view(1, 6, 6))  # a box that binds per unit
    inputs = torch.minimum(inputs, bounds[1])
    labels = net(inputs).argmax(1).detach()
    plain = BoxLBFGS(search_steps=3, iterations=10)(net, inputs, labels, bounds=bounds)
    polished = BoxLBFGS(search_steps=3, iterations=10, polish_steps=40)(net, inputs, labels, bounds=bounds)
    assert plain.success.sum() >= 12
    assert torch.equal(polished.success, plain.success)
    found = plain.success
    assert (polished.l2[found] <= plain.l2[found] * (1 + 1e-6)).all()
    assert (polished.l2[found] < plain.l2[found] * 0.999).any()  # it did move some rows nearer
    assert ((polished.adversarial >= bounds[0]) & (polished.adversarial <= bounds[1])).all()
    assert (net(polished.adversarial[found]).argmax(1) != labels[found]).all()
    assert torch.equal(polished.iterations[found], plain.iterations[found] + 40)


def test_the_clean_walk_never_ends_a_row_worse_or_outside_the_box_and_counts_its_steps() -> None:
    net = relu_net()
    inputs = torch.rand(24, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    bounds = (torch.full((1, 6, 6), 0.0), torch.linspace(0.7, 1.0, 36).view(1, 6, 6))
    inputs = torch.minimum(inputs, bounds[1])
    labels = net(inputs).argmax(1).detach()
    polished = BoxLBFGS(search_steps=3, iterations=10, polish_steps=20)(net, inputs, labels, bounds=bounds)
    walked = BoxLBFGS(search_steps=3, iterations=10, polish_steps=20, clean_walk_steps=30)(net, inputs, labels,
                                                                                           bounds=bounds)
    found = polished.success
    assert found.sum() >= 12 and torch.equal(walked.success, found)
    assert (walked.l2[found] <= polished.l2[found] * (1 + 1e-6)).all()
    assert ((walked.adversarial >= bounds[0]) & (walked.adversarial <= bounds[1])).all()
    assert (net(walked.adversarial[found]).argmax(1) != labels[found]).all()
    assert torch.equal(walked.iterations[found], polished.iterations[found] + 30)


def test_a_targeted_clean_walk_keeps_the_target() -> None:
    net = relu_net()
    inputs = torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    labels = net(inputs).argmax(1).detach()
    targets = (labels + 1) % 5
    plain = BoxLBFGS(search_steps=4, iterations=15)(net, inputs, labels, target=targets)
    walked = BoxLBFGS(search_steps=4, iterations=15, clean_walk_steps=40)(net, inputs, labels, target=targets)
    found = plain.success
    assert found.sum() >= 8 and torch.equal(walked.success, found)
    assert (net(walked.adversarial[found]).argmax(1) == targets[found]).all()
    assert (walked.l2[found] <= plain.l2[found] * (1 + 1e-6)).all()


def test_a_targeted_polish_keeps_the_target() -> None:
    net = relu_net()
    inputs = torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    labels = net(inputs).argmax(1).detach()
    targets = (labels + 1) % 5
    plain = BoxLBFGS(search_steps=4, iterations=15)(net, inputs, labels, target=targets)
    polished = BoxLBFGS(search_steps=4, iterations=15, polish_steps=40)(net, inputs, labels, target=targets)
    found = plain.success
    assert found.sum() >= 8 and torch.equal(polished.success, found)
    assert (net(polished.adversarial[found]).argmax(1) == targets[found]).all()
    assert (polished.l2[found] <= plain.l2[found] * (1 + 1e-6)).all()
    assert (polished.l2[found] < plain.l2[found] * 0.999).any()  # the walk moved some rows nearer, still at the target


def test_reaches_by_margin_is_the_targeted_criterion() -> None:
    logits = torch.tensor([[0.0, 1.0, 0.5], [1.0, 1.0, 0.0]])
    assert _reaches_by_margin(logits, torch.tensor([1, 1])).tolist() == [True, False]


def test_polish_steps_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="polish_steps"):
        BoxLBFGS(polish_steps=-1)


def test_threat_models_default_to_the_evaluation_search_and_a_plain_list_to_the_papers() -> None:
    with_threats = AdversarialEvaluation(budgets={"linf": [0.1]})
    assert with_threats.attack.loss == "both" and with_threats.attack.polish_steps == 50
    assert with_threats.attack.clean_walk_steps == 50
    assert repr(with_threats.attack) == repr(evaluation_search())
    papers = AdversarialEvaluation(budgets=(0.05,))
    assert papers.attack.loss == "margin" and papers.attack.polish_steps == 0 and papers.attack.clean_walk_steps == 0
