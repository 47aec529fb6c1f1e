"""The box-constrained search's parts, value by value: its settings, losses and first c, the choice
between its two searches, the nearest-class search against one search per class, heads that need
their rows, the boundary walk (step count, targeted direction, a curved boundary), projected L-BFGS
(the two-loop recursion, first step, stopping rules, bounds, rows alone or together) and the scipy
backend's box and settings. Written against the survivors of the mutation run
(docs/mutation-testing.md)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advtrain.attacks import BoxLBFGS
from advtrain.attacks.base import Proposal
from advtrain.attacks.box_lbfgs import _closer, _leaves_by_margin, _reaches_by_margin
from advtrain.attacks.polish import polish_on_boundary
from advtrain.layers import cut_at


def test_closer_keeps_each_rows_smaller_success_its_c_and_both_searches_iterations() -> None:
    """Rows: both found, the second nearer; both found, the first nearer; a tie (the first kept);
    only the first found; only the second found; neither."""
    inputs = torch.full((6, 2), 10.0)  # sizes are measured from the inputs, not from 0
    first = Proposal(points=10 + torch.tensor([[3.0, 0], [1, 0], [2, 0], [1, 1], [0, 0], [0, 0]]),
                     found=torch.tensor([True, True, True, True, False, False]),
                     c=torch.tensor([1.0, 2, 3, 4, math.nan, math.nan]), iterations=torch.tensor([10, 11, 12, 13, 14, 15]))
    second = Proposal(points=10 + torch.tensor([[0, 2.0], [0, -5], [0, -2], [0, 0], [0, -4], [0, 0]]),
                      found=torch.tensor([True, True, True, False, True, False]),
                      c=torch.tensor([5.0, 6, 7, math.nan, 8, math.nan]), iterations=torch.tensor([1, 2, 3, 4, 5, 6]))
    chosen = _closer(inputs, first, second)
    assert (chosen.points - 10).tolist() == [[0, 2.0], [1, 0], [2, 0], [1, 1], [0, -4], [0, 0]]
    assert chosen.found.tolist() == [True, True, True, True, True, False]
    torch.testing.assert_close(chosen.c, torch.tensor([5.0, 2, 3, 4, 8, math.nan]), equal_nan=True)
    assert chosen.iterations.tolist() == [11, 13, 15, 17, 19, 21]


def linear_head(classes: int = 4) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(12, classes).double()


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_nearest_is_one_search_per_wrong_class_with_the_closest_kept(loss: str) -> None:
    """``target="nearest"`` gives, row by row, the point, c and iterations of the targeted search
    (the same loss and settings) towards the class it picked, and that class is the nearest."""
    head = linear_head()
    inputs = torch.rand(5, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = head(inputs).argmax(1).detach()
    attack = BoxLBFGS(loss=loss, search_steps=4, iterations=15)
    nearest = attack(head, inputs, labels, target="nearest", bounds=(-10.0, 10.0))
    singles = [attack(head, inputs, labels, target=(labels + offset) % 4, bounds=(-10.0, 10.0)) for offset in (1, 2, 3)]
    assert nearest.success.all()
    sizes = torch.stack([single.l2 for single in singles], 1)
    torch.testing.assert_close(nearest.l2, sizes.min(1).values, rtol=1e-6, atol=1e-9)
    for row in range(5):
        single = singles[int((nearest.target[row] - labels[row]) % 4) - 1]
        torch.testing.assert_close(nearest.adversarial[row], single.adversarial[row], rtol=1e-6, atol=1e-9)
        assert float(nearest.c[row]) == pytest.approx(float(single.c[row]))
        assert int(nearest.iterations[row]) == int(single.iterations[row])


class SkipNet(nn.Module):
    """A layer with a skip connection around it: a head above ``fc1`` needs each row's own inputs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.act, self.out = nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc1(inputs)) + inputs)


def skip_head_and_activations(count: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    net = SkipNet().double()
    inputs = torch.rand(count, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cut = cut_at(net, "fc1", inputs)
    with torch.no_grad():
        activations = cut.bottom(inputs)
    head = cut.head_for(inputs)
    assert hasattr(head, "select")  # the head holds each row's inputs
    return head, activations, net(inputs).argmax(1).detach()


def test_nearest_on_a_head_that_holds_its_rows_inputs_searches_each_row_with_its_own() -> None:
    head, activations, labels = skip_head_and_activations()
    attack = BoxLBFGS(search_steps=4, iterations=15)
    nearest = attack(head, activations, labels, target="nearest", bounds=(-10.0, 10.0))
    singles = [attack(head, activations, labels, target=(labels + offset) % 3, bounds=(-10.0, 10.0)) for offset in (1, 2)]
    assert nearest.success.all()
    torch.testing.assert_close(nearest.l2, torch.minimum(singles[0].l2, singles[1].l2), rtol=1e-5, atol=1e-8)


def test_polish_of_some_rows_on_a_head_that_holds_its_rows_inputs() -> None:
    """Two of the rows only: each walked with its own row's inputs, the others left as they were."""
    head, activations, labels = skip_head_and_activations()
    start = BoxLBFGS(search_steps=3, iterations=10)(head, activations, labels, bounds=(-10.0, 10.0))
    successes = start.success.nonzero()[:, 0]
    assert len(successes) >= 2
    found = torch.zeros(6, dtype=torch.bool)
    found[successes[[0, -1]]] = True
    box = torch.full_like(activations, -10.0), torch.full_like(activations, 10.0)
    walked = polish_on_boundary(head, activations, start.adversarial, found, labels, True, _leaves_by_margin, *box,
                                activations.shape, steps=30).detach()
    assert torch.equal(walked[~found], start.adversarial[~found])
    assert (head(walked).argmax(1)[found] != labels[found]).all()
    assert ((walked - activations).norm(dim=1)[found] <= start.l2[found] * (1 + 1e-9)).all()


class Circle(nn.Module):
    """Two classes split by a sphere of radius 1 around 0: a curved boundary whose closest point to
    an input inside is along the radius, at ``1 − ‖x‖``."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        inside = 1.0 - inputs.pow(2).sum(1)
        return torch.stack([inside, -inside], 1)


def test_the_walk_follows_a_curved_boundary_to_its_closest_point_row_by_row() -> None:
    """Rows at different depths inside the sphere, each started outside it off the radial line:
    100 steps end within 0.5% of each row's exact distance (each row's step is its own; a step
    scaled by the whole batch's gradient stalls the rows whose gradient is small)."""
    generator = torch.Generator().manual_seed(0)
    depth = torch.tensor([0.2, 0.5, 0.8, 0.3, 0.6, 0.9], dtype=torch.float64)
    radial = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    radial = radial / radial.norm(dim=1, keepdim=True)
    inputs = radial * depth[:, None]
    across = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    across -= (across * radial).sum(1, keepdim=True) * radial
    start = 1.3 * radial + 0.8 * across / across.norm(dim=1, keepdim=True)
    labels = torch.zeros(6, dtype=torch.long)
    box = torch.full_like(inputs, -10.0), torch.full_like(inputs, 10.0)
    walked = polish_on_boundary(Circle(), inputs, start, torch.ones(6, dtype=torch.bool), labels, True, _leaves_by_margin,
                                *box, inputs.shape, steps=100).detach()
    ratio = (walked - inputs).norm(dim=1) / (1 - depth)
    assert (walked.norm(dim=1) > 1).all()
    assert ((ratio >= 1 - 1e-9) & (ratio <= 1.005)).all(), ratio.tolist()


def test_one_polish_step_is_taken_and_checked() -> None:
    """``steps=1``: one step inward from a start well past the boundary, and that point kept."""
    head = linear_head(classes=2)
    inputs = torch.full((4, 12), 0.5, dtype=torch.float64) + 0.1 * torch.rand(4, 12, dtype=torch.float64)
    labels = head(inputs).argmax(1).detach()
    toward = (head.weight[1 - labels] - head.weight[labels]).detach()
    start = inputs + 3.0 * toward / toward.norm(dim=1, keepdim=True)
    assert (head(start).argmax(1) != labels).all()
    box = torch.full_like(inputs, -10.0), torch.full_like(inputs, 10.0)
    walked = polish_on_boundary(head, inputs, start, torch.ones(4, dtype=torch.bool), labels, True, _leaves_by_margin,
                                *box, inputs.shape, steps=1).detach()
    ratio = (walked - inputs).norm(dim=1) / (start - inputs).norm(dim=1)
    assert ((ratio > 0.9) & (ratio < 0.999)).all(), ratio.tolist()  # one step of 5% (γ) inward


def test_a_targeted_polish_reaches_the_closest_point_of_the_target_class() -> None:
    """Towards the other class of a linear two-class head, from twice the distance plus as much
    again at right angles: within 0.3% of the exact distance to the hyperplane (the walk descends the
    target's cross-entropy)."""
    head = linear_head(classes=2)
    inputs = torch.rand(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.2 + 0.4
    with torch.no_grad():
        logits = head(inputs)
    labels = logits.argmax(1)
    targets = 1 - labels
    normal = (head.weight[targets] - head.weight[labels]).detach()
    gap = (logits.gather(1, labels[:, None]) - logits.gather(1, targets[:, None]))[:, 0]
    exact = gap / normal.norm(dim=1)
    along = normal / normal.norm(dim=1, keepdim=True)
    across = torch.randn(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    across -= (across * along).sum(1, keepdim=True) * along
    start = inputs + 2 * exact[:, None] * (along + across / across.norm(dim=1, keepdim=True))
    assert (head(start).argmax(1) == targets).all()
    box = torch.full_like(inputs, -10.0), torch.full_like(inputs, 10.0)
    walked = polish_on_boundary(head, inputs, start, torch.ones(6, dtype=torch.bool), targets, False, _reaches_by_margin,
                                *box, inputs.shape, steps=100).detach()
    assert (head(walked).argmax(1) == targets).all()
    sizes = (walked - inputs).norm(dim=1)
    assert (sizes <= exact * 1.003).all(), (sizes / exact).tolist()


def test_the_scipy_backend_keeps_to_a_box_that_binds_and_matches_the_torch_backend() -> None:
    """The target gains by raising three units at 0.9 and lowering three at 0.1 of a [0, 1] box, and
    a little from six more: unbounded, the optimum would take the first six past 1 and below 0. Both
    backends find every row inside the box, both bounds binding, at the same size; scipy reports its
    own iteration counts and keeps the inputs' precision."""
    head = linear_head(classes=2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0] * 12, [1.0] * 3 + [-1.0] * 3 + [0.5] * 6], dtype=torch.float64))
        head.bias.copy_(torch.tensor([5.3, 0.0], dtype=torch.float64))
    inputs = torch.tensor([[0.9] * 3 + [0.1] * 3 + [0.5] * 6] * 3, dtype=torch.float64)
    inputs[:, 6:] += torch.linspace(0, 0.1, 3, dtype=torch.float64)[:, None]
    labels = head(inputs).argmax(1).detach()
    assert (labels == 0).all()
    targets = torch.ones(3, dtype=torch.long)
    found = {backend: BoxLBFGS(backend=backend, search_steps=8, iterations=40)(head, inputs, labels, target=targets)
             for backend in ("torch", "scipy")}
    for result in found.values():
        assert result.success.all()
        assert ((result.adversarial >= 0) & (result.adversarial <= 1)).all()
        assert (result.adversarial[:, :3] > 0.999).all() and (result.adversarial[:, 3:6] < 0.001).all()  # both bind
    torch.testing.assert_close(found["scipy"].l2, found["torch"].l2, rtol=2e-3, atol=1e-6)
    assert (found["scipy"].iterations > 0).all() and found["scipy"].adversarial.dtype == torch.float64


def test_the_scipy_backend_hands_scipy_its_method_box_and_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """One L-BFGS-B call per row and value of c, with ``iterations`` as ``maxiter``, ``history`` as
    ``maxcor`` and the box (infinite bounds as None); the iterations reported are scipy's own."""
    import scipy.optimize

    calls = []
    real = scipy.optimize.minimize

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "minimize", recording)
    head = linear_head(classes=2)
    inputs = torch.rand(2, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    labels = head(inputs).argmax(1).detach()
    lower = torch.zeros(12, dtype=torch.float64)
    lower[0] = -math.inf
    result = BoxLBFGS(backend="scipy", search_steps=2, iterations=3, history=4)(
        head, inputs, labels, target=1 - labels, bounds=(lower, torch.full((12,), math.inf, dtype=torch.float64)))
    assert len(calls) == 2 * 2
    for call in calls:
        assert call["method"] == "L-BFGS-B" and call["jac"] is True
        assert call["options"] == {"maxiter": 3, "maxcor": 4}
        assert call["bounds"] == [(None, None)] + [(0.0, None)] * 11
    assert (result.iterations <= 2 * 3).all() and (result.iterations > 0).all()


def test_two_loop_recursion_is_the_bfgs_inverse_hessian_of_its_pairs_oldest_first() -> None:
    """Per row, ``H·g`` with ``H`` built by the explicit BFGS update from ``γ·I`` over the stored
    pairs from the oldest to the newest (a ring buffer whose newest slot is not the last)."""
    from advtrain.attacks.lbfgs import _two_loop

    generator = torch.Generator().manual_seed(7)
    rows, dims, memory, newest = 3, 5, 4, 1
    curvature = [torch.randn(dims, dims, dtype=torch.float64, generator=generator) for _ in range(rows)]
    curvature = [a @ a.T + torch.eye(dims, dtype=torch.float64) for a in curvature]  # positive definite
    steps = torch.randn(memory, rows, dims, dtype=torch.float64, generator=generator)
    changes = torch.stack([torch.stack([curvature[r] @ steps[k, r] for r in range(rows)]) for k in range(memory)])
    rho = 1.0 / (steps * changes).sum(2)
    gamma = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    gradient = torch.randn(rows, dims, dtype=torch.float64, generator=generator)
    got = _two_loop(gradient, steps, changes, rho, gamma, newest)
    oldest_first = [(newest + 1 + j) % memory for j in range(memory)]
    for r in range(rows):
        inverse = gamma[r] * torch.eye(dims, dtype=torch.float64)
        for slot in oldest_first:
            s, y, p = steps[slot, r], changes[slot, r], rho[slot, r]
            left = torch.eye(dims, dtype=torch.float64) - p * torch.outer(s, y)
            inverse = left @ inverse @ left.T + p * torch.outer(s, s)
        torch.testing.assert_close(got[r], inverse @ gradient[r], rtol=1e-9, atol=1e-12)


def quadratic():
    """``½‖x‖²`` per row, the objective's contract: value, gradient, logits."""

    def objective(x: torch.Tensor, rows: torch.Tensor, with_gradient: bool = True):
        return 0.5 * x.pow(2).sum(1), (x.clone() if with_gradient else None), x[:, :1]

    return objective


def test_the_first_step_without_a_scale_has_unit_length_and_with_one_the_scaled_gradient() -> None:
    """From (3, 4), gradient (3, 4): one iteration moves a unit step down the gradient, to (2.4, 3.2);
    given a scale of 0.5 (a curvature known from an earlier solve) the step is half the gradient."""
    from advtrain.attacks.lbfgs import projected_lbfgs

    start = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    box = torch.full_like(start, -10.0), torch.full_like(start, 10.0)
    first, used, _ = projected_lbfgs(quadratic(), start, *box, iterations=1)
    torch.testing.assert_close(first, torch.tensor([[2.4, 3.2]], dtype=torch.float64))
    assert used.tolist() == [1]
    scaled, _, _ = projected_lbfgs(quadratic(), start, *box, iterations=1, scale=torch.full((1,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(scaled, torch.tensor([[1.5, 2.0]], dtype=torch.float64))


def test_a_row_held_at_its_bound_by_its_gradient_has_converged_before_any_step() -> None:
    """``½‖x − (−1, 0)‖²`` from (0, 0) in ``[0, 1]²``: the gradient pushes x₀ below its lower bound
    and x₁ is at its optimum, so the projected gradient is zero: no iteration is used."""
    from advtrain.attacks.lbfgs import projected_lbfgs

    def shifted(x: torch.Tensor, rows: torch.Tensor, with_gradient: bool = True):
        moved = x - torch.tensor([-1.0, 0.0], dtype=x.dtype)
        return 0.5 * moved.pow(2).sum(1), (moved.clone() if with_gradient else None), x[:, :1]

    start = torch.zeros(1, 2, dtype=torch.float64)
    final, used, _ = projected_lbfgs(shifted, start, torch.zeros_like(start), torch.ones_like(start), iterations=5)
    assert used.tolist() == [0] and torch.equal(final, start)


def test_each_value_of_c_starts_from_the_scale_the_last_solve_left_and_uses_the_history_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from advtrain.attacks import box_lbfgs

    calls = []
    real = box_lbfgs.projected_lbfgs

    def recording(*args, **kwargs):
        final, used, scale = real(*args, **kwargs)
        calls.append((kwargs["scale"], kwargs["history"], scale))
        return final, used, scale

    monkeypatch.setattr(box_lbfgs, "projected_lbfgs", recording)
    used_per_solve = []
    real_solve = BoxLBFGS._solve_torch

    def counting(self, *args):
        final, used, scale = real_solve(self, *args)
        used_per_solve.append(used)
        return final, used, scale

    monkeypatch.setattr(BoxLBFGS, "_solve_torch", counting)
    head = linear_head(classes=3)
    inputs = torch.rand(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    result = BoxLBFGS(search_steps=3, iterations=5, history=4)(head, inputs, head(inputs).argmax(1).detach(),
                                                               bounds=(-5.0, 5.0))
    assert result.iterations.dtype == torch.long
    assert torch.equal(result.iterations, sum(used_per_solve))  # every value of c's iterations, summed
    assert len(calls) == 3 and all(history == 4 for _, history, _ in calls)
    assert calls[0][0] is None
    for (_, _, left), (given, _, _) in zip(calls, calls[1:]):
        torch.testing.assert_close(given, left)


@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_untargeted_c_search_alone_reaches_the_hyperplane_of_a_two_class_head(loss: str) -> None:
    """The c search alone (no bisection back along r, no walk), away from the true class: within 1%
    of the exact distance, which takes c brackets built on whether each solve left the true class."""
    head = linear_head(classes=2)
    inputs = torch.rand(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 0.2 + 0.4
    with torch.no_grad():
        logits = head(inputs)
    labels = logits.argmax(1)
    normal = (head.weight[1 - labels] - head.weight[labels]).detach()
    exact = (logits.gather(1, labels[:, None]) - logits.gather(1, (1 - labels)[:, None]))[:, 0] / normal.norm(dim=1)
    result = BoxLBFGS(loss=loss, search_steps=12, iterations=40, refine_steps=0)(head, inputs, labels, bounds=(-10.0, 10.0))
    assert result.success.all()
    assert (result.l2 <= exact * 1.01).all() and (result.l2 >= exact * (1 - 1e-6)).all(), (result.l2 / exact).tolist()


def test_defaults_and_settings_are_kept_as_given() -> None:
    assert repr(BoxLBFGS()) == ("BoxLBFGS(target='untargeted', loss='margin', backend='torch', search_steps=6, iterations=50, "
                                "history=10, c_init=None, c_growth=10.0, confidence=0.01, refine_steps=20, polish_steps=0, "
                                "clean_walk_steps=0, progress=False)")
    given = BoxLBFGS(loss="both", backend="scipy", search_steps=2, iterations=3, history=4, c_init=0.5, c_growth=1.5,
                     confidence=0.0, refine_steps=0, polish_steps=7, clean_walk_steps=5, progress=True,
                     target="runner_up")
    assert repr(given) == ("BoxLBFGS(target='runner_up', loss='both', backend='scipy', search_steps=2, iterations=3, "
                           "history=4, c_init=0.5, c_growth=1.5, confidence=0.0, refine_steps=0, polish_steps=7, "
                           "clean_walk_steps=5, progress=True)")


@pytest.mark.parametrize(("settings", "message"), [
    ({"refine_steps": -1}, "refine_steps must be"), ({"confidence": -0.01}, "confidence must be non-negative, got -0.01"),
    ({"c_init": math.inf}, "c_init must be positive and finite, got inf"), ({"c_init": 0.0}, "c_init must be positive"),
    ({"c_growth": 0.5}, "c_growth must be greater than 1, got 0.5"), ({"loss": "both "}, "got 'both '"),
    ({"backend": "jax"}, "backend must be 'torch' or 'scipy', got 'jax'"), ({"iterations": 0}, "iterations must be"),
    ({"history": 0}, "history must be"), ({"polish_steps": -1}, "polish_steps must be"),
    ({"clean_walk_steps": -1}, "clean_walk_steps must be"),
], ids=["refine", "confidence", "c-init-inf", "c-init-zero", "growth", "loss", "backend", "iterations", "history", "polish",
        "clean-walk"])
def test_each_bad_setting_is_named(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BoxLBFGS(**settings)


def test_both_runs_the_margin_search_then_a_short_cross_entropy_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """``loss="both"``: the margin search with the settings given, then the cross-entropy with at most
    3 values of c and half the iterations (at least 1); one search for any other loss."""
    calls = []
    real = BoxLBFGS._search

    def recording(self, head, inputs, targets, lower, upper, untargeted, loss, steps, iterations):
        calls.append((loss, steps, iterations))
        return real(self, head, inputs, targets, lower, upper, untargeted, loss, steps, iterations)

    monkeypatch.setattr(BoxLBFGS, "_search", recording)
    head = linear_head(classes=3)
    inputs = torch.rand(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    labels = head(inputs).argmax(1).detach()
    for settings, expected in (({"search_steps": 5, "iterations": 8}, [("margin", 5, 8), ("ce", 3, 4)]),
                               ({"search_steps": 2, "iterations": 1}, [("margin", 2, 1), ("ce", 2, 1)])):
        calls.clear()
        BoxLBFGS(loss="both", **settings)(head, inputs, labels, bounds=(-5.0, 5.0))
        assert calls == expected
    calls.clear()
    BoxLBFGS(loss="ce", search_steps=2, iterations=3)(head, inputs, labels, bounds=(-5.0, 5.0))
    assert calls == [("ce", 2, 3)]


def ill_conditioned_quadratics(rows: int = 3, dims: int = 8):
    """``½(x − x*)ᵀA(x − x*)`` per row, A with eigenvalues from 1 to 100; the objective and x*."""
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(dims, dims, generator=generator, dtype=torch.float64))
    matrix = rotation @ torch.diag(torch.logspace(0, 2, dims, dtype=torch.float64)) @ rotation.T
    optimum = torch.linalg.solve(matrix, torch.randn(rows, dims, generator=generator, dtype=torch.float64).T).T

    def objective(x: torch.Tensor, rows: torch.Tensor, with_gradient: bool = True):
        offset = x - optimum[rows]
        return 0.5 * (offset @ matrix * offset).sum(1), (offset @ matrix if with_gradient else None), x[:, :1]

    return objective, optimum


def test_lbfgs_solves_an_ill_conditioned_quadratic_and_stops_on_a_small_relative_decrease() -> None:
    """Condition number 100 in 8 dimensions: to 1e-8 of the optimum well inside 60 iterations; with
    ``relative_decrease=1e-3`` each row stops early, short of the optimum, as scipy's ``ftol`` does."""
    from advtrain.attacks.lbfgs import projected_lbfgs

    objective, optimum = ill_conditioned_quadratics()
    start = torch.zeros_like(optimum)
    box = torch.full_like(start, -100.0), torch.full_like(start, 100.0)
    final, used, _ = projected_lbfgs(objective, start, *box, iterations=60, tolerance=1e-9, relative_decrease=0.0)
    assert float((final - optimum).abs().max()) < 1e-8
    assert (used < 50).all()
    early, early_used, _ = projected_lbfgs(objective, start, *box, iterations=60, tolerance=1e-9, relative_decrease=1e-3)
    assert (early_used < used).all() and (early_used <= 25).all()
    assert float((early - optimum).abs().max()) > 1e-4


def test_each_loss_has_the_value_its_docstring_gives() -> None:
    """Logits of two rows, true labels 0 and 2 (untargeted) or targets 1 and 0 (targeted), κ = 0.5."""
    attack = BoxLBFGS(confidence=0.5)
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.5, 0.0, 3.0]], dtype=torch.float64)
    labels, targets = torch.tensor([0, 2]), torch.tensor([1, 0])
    log_sum = torch.logsumexp(logits, 1)
    # untargeted cross-entropy: -log(1 - p_true); margin: (z_true - max other + κ)², at least 0
    ce_away = log_sum - torch.logsumexp(torch.tensor([[1.0, -1.0], [0.5, 0.0]], dtype=torch.float64), 1)
    torch.testing.assert_close(attack._loss(logits, labels, True, "ce"), ce_away)
    torch.testing.assert_close(attack._loss(logits, labels, True, "margin"), torch.tensor([1.5**2, 3.0**2], dtype=torch.float64))
    # targeted cross-entropy to the target; margin: Σ over the others of max(z_j - z_t + κ, 0)², the target's own κ² left out
    torch.testing.assert_close(attack._loss(logits, targets, False, "ce"), log_sum - logits[[0, 1], [1, 0]])
    torch.testing.assert_close(attack._loss(logits, targets, False, "margin"),
                               torch.tensor([1.5**2 + 0.0, 0.0 + 3.0**2], dtype=torch.float64))


@pytest.mark.parametrize(("settings", "first_c"), [({"loss": "ce"}, 1.0), ({"loss": "margin"}, 0.1),
                                                   ({"loss": "ce", "c_init": 3.0}, 3.0), ({"c_init": 0.5}, 0.5)])
def test_one_value_of_c_is_the_first_one(settings: dict, first_c: float) -> None:
    """With one search step, every success carries the first c: 1 for the cross-entropy, 0.1 for the
    margin loss, or ``c_init``."""
    head = linear_head(classes=3)
    inputs = torch.rand(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    labels = head(inputs).argmax(1).detach()
    result = BoxLBFGS(search_steps=1, iterations=20, **settings)(head, inputs, labels, bounds=(-5.0, 5.0))
    assert result.success.any()
    assert result.c[result.success].tolist() == [first_c] * int(result.success.sum())
    assert result.c[~result.success].isnan().all()


def test_both_keeps_for_each_row_the_nearer_of_its_two_searches() -> None:
    head = linear_head(classes=4)
    inputs = torch.rand(6, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    labels = head(inputs).argmax(1).detach()
    settings = dict(search_steps=3, iterations=6, refine_steps=0)
    both = BoxLBFGS(loss="both", **settings)(head, inputs, labels, bounds=(-5.0, 5.0))
    margin = BoxLBFGS(loss="margin", **settings)(head, inputs, labels, bounds=(-5.0, 5.0))
    ce = BoxLBFGS(loss="ce", search_steps=3, iterations=3, refine_steps=0)(head, inputs, labels, bounds=(-5.0, 5.0))
    assert both.success.all() and margin.success.all() and ce.success.all()
    torch.testing.assert_close(both.l2, torch.minimum(margin.l2, ce.l2))
    assert (margin.l2 != ce.l2).all()  # a choice to make on every row
    assert torch.equal(both.iterations, margin.iterations + ce.iterations)


def test_polish_keeps_each_rows_c_and_counts_steps_only_where_it_walked() -> None:
    from tests.test_polish import relu_net

    net = relu_net()
    inputs = torch.rand(24, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    bounds = (torch.full((1, 6, 6), 0.0), torch.linspace(0.7, 1.0, 36).view(1, 6, 6))
    inputs = torch.minimum(inputs, bounds[1])
    labels = net(inputs).argmax(1).detach()
    plain = BoxLBFGS(search_steps=1, iterations=2, c_init=10.0)(net, inputs, labels, bounds=bounds)
    polished = BoxLBFGS(search_steps=1, iterations=2, c_init=10.0, polish_steps=7)(net, inputs, labels, bounds=bounds)
    found = plain.success
    assert 0 < int(found.sum()) < 24
    torch.testing.assert_close(polished.c, plain.c, equal_nan=True)
    assert torch.equal(polished.iterations, plain.iterations + 7 * found.long())


def test_a_search_scores_every_point_with_its_own_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    losses = []
    real = BoxLBFGS._loss

    def recording(self, logits, targets, untargeted, loss):
        losses.append(loss)
        return real(self, logits, targets, untargeted, loss)

    monkeypatch.setattr(BoxLBFGS, "_loss", recording)
    head = linear_head(classes=3)
    inputs = torch.rand(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(13))
    BoxLBFGS(loss="ce", search_steps=2, iterations=3)(head, inputs, head(inputs).argmax(1).detach(), bounds=(-5.0, 5.0))
    assert losses and set(losses) == {"ce"}


def test_the_progress_bar_counts_values_of_c_and_shows_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    import tqdm.auto

    bars = []
    real = tqdm.auto.tqdm

    def recording(iterable, **settings):
        bars.append((list(iterable), settings))
        return real(bars[-1][0], **settings)

    head = linear_head(classes=3)
    inputs = torch.rand(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    labels = head(inputs).argmax(1).detach()
    quiet = BoxLBFGS(search_steps=2, iterations=3)(head, inputs, labels, bounds=(-5.0, 5.0))
    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    shown = BoxLBFGS(search_steps=2, iterations=3, progress=True)(head, inputs, labels, bounds=(-5.0, 5.0))
    assert bars == [([0, 1], {"desc": "BoxLBFGS search on c", "unit": "c", "disable": None})]
    assert capsys.readouterr().err == ""  # not a terminal here: tqdm's disable=None keeps it off
    torch.testing.assert_close(shown.l2, quiet.l2)


def test_a_coordinate_at_its_upper_bound_with_the_optimum_inside_moves_in() -> None:
    """``½‖x − 0.5‖²`` from the upper corner of ``[0, 1]²``: the gradient (0.5) points outward, so the
    descent direction points in, and the solve reaches 0.5."""
    from advtrain.attacks.lbfgs import projected_lbfgs

    def centred(x: torch.Tensor, rows: torch.Tensor, with_gradient: bool = True):
        offset = x - 0.5
        return 0.5 * offset.pow(2).sum(1), (offset.clone() if with_gradient else None), x[:, :1]

    start = torch.ones(1, 2, dtype=torch.float64)
    final, used, _ = projected_lbfgs(centred, start, torch.zeros_like(start), torch.ones_like(start), iterations=20)
    torch.testing.assert_close(final, torch.full((1, 2), 0.5, dtype=torch.float64))
    assert int(used) > 0


def test_rows_solved_together_end_as_each_alone() -> None:
    """Each row stops on its own projected gradient: a batch of three quadratics ends, row by row,
    where each ends alone, with the same iterations."""
    from advtrain.attacks.lbfgs import projected_lbfgs

    objective, optimum = ill_conditioned_quadratics()
    start = torch.zeros_like(optimum)
    start[1] = optimum[1] + 1e-7  # row 1 is all but solved: it stops long before the others
    box = torch.full_like(start, -100.0), torch.full_like(start, 100.0)
    together, used, _ = projected_lbfgs(objective, start, *box, iterations=60, tolerance=1e-6, relative_decrease=0.0)
    for row in range(3):
        rows = torch.tensor([row])

        def alone(x, _rows, with_gradient=True, rows=rows):
            return objective(x, rows, with_gradient)

        final, used_alone, _ = projected_lbfgs(alone, start[rows], box[0][rows], box[1][rows], iterations=60,
                                               tolerance=1e-6, relative_decrease=0.0)
        torch.testing.assert_close(together[row], final[0], rtol=0, atol=1e-9)
        assert int(used[row]) == int(used_alone[0])
    assert int(used[1]) < int(used[0])
