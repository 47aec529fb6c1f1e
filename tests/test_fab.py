"""FAB (advtrain.attacks.FAB) and its place in the evaluation's ensemble: the exact projection onto
a plane inside a box, the minimal perturbation of a linear model, scale-free steps, and FAB-T's
search run once per row and reused at every budget."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize
from torch import nn

from advtrain.attacks import FAB
from advtrain.attacks.fab import plane_step
from advtrain.budget import perturbation_size
from advtrain.robustness import BoundarySearch, Ensemble, run_ensemble
from real_models import bn_convnet, images, pretrained, resnet18
from test_robustness_ensemble import linear_problem


def smallest_move(point: np.ndarray, normal: np.ndarray, gap: float, lower: np.ndarray, upper: np.ndarray,
                  norm: str) -> np.ndarray | None:
    """The smallest move onto ``normal · d = gap`` inside the box, by a general solver (None where the
    box holds no point of the plane)."""
    n = point.size
    box = [(low, None if np.isinf(high) else high) for low, high in zip(lower - point, upper - point)]
    if norm == "linf":  # minimise ρ with |d_i| <= ρ: a linear program over (d, ρ)
        cost = np.r_[np.zeros(n), 1.0]
        rows = np.vstack([np.c_[np.eye(n), -np.ones(n)], np.c_[-np.eye(n), -np.ones(n)]])
        result = linprog(cost, A_ub=rows, b_ub=np.zeros(2 * n), A_eq=[np.r_[normal, 0.0]], b_eq=[gap], bounds=box + [(0, None)])
        return result.x[:n] if result.status == 0 else None
    result = minimize(lambda d: d @ d, np.zeros(n), jac=lambda d: 2 * d, method="SLSQP", bounds=box,
                      constraints=[{"type": "eq", "fun": lambda d: normal @ d - gap}], options={"ftol": 1e-13, "maxiter": 1000})
    return result.x if abs(normal @ result.x - gap) < 1e-8 else None  # a point of the plane, the best found


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_step_onto_the_plane_is_the_smallest_move_inside_the_box(norm: str) -> None:
    generator = torch.Generator().manual_seed(0)
    reached = unreachable = 0
    for trial in range(120):
        n = 6
        point = torch.rand(1, n, generator=generator, dtype=torch.float64)
        lower, upper = torch.zeros(1, n, dtype=torch.float64), torch.ones(1, n, dtype=torch.float64)
        if trial % 4 == 0:
            upper[0, : n // 2] = torch.inf  # an activation's box: open above
        normal = torch.randn(1, n, generator=generator, dtype=torch.float64)
        normal[0, trial % n] = 0.0 if trial % 3 == 0 else normal[0, trial % n]
        level = (normal * point).sum(1) + 2.0 * torch.randn(1, generator=generator, dtype=torch.float64)
        move = plane_step(point, lower, upper, normal, level, norm)[0].numpy()
        p, w, gap = point[0].numpy(), normal[0].numpy(), float(level - (normal * point).sum())
        assert np.all(p + move >= -1e-12) and np.all(p + move <= upper[0].numpy() + 1e-12)
        best = smallest_move(p, w, gap, lower[0].numpy(), upper[0].numpy(), norm)
        if best is None:  # no point of the plane in the box: the move goes as far towards it as the box allows
            unreachable += 1
            corner = np.where(w * np.sign(gap) > 0, upper[0].numpy() - p, np.where(w * np.sign(gap) < 0, -p, 0.0))
            np.testing.assert_allclose(move, corner, atol=1e-12)
            continue
        reached += 1
        assert w @ move == pytest.approx(gap, abs=1e-9)
        size = (lambda d: np.abs(d).max()) if norm == "linf" else np.linalg.norm
        assert size(move) == pytest.approx(size(best), rel=1e-5, abs=1e-9)
    assert reached > 40 and unreachable > 10  # both cases met


@pytest.mark.parametrize("norm", ["linf", "l2", "rms"])
def test_fab_finds_a_linear_models_smallest_perturbation(norm: str) -> None:
    model, inputs, labels, exact = linear_problem()
    result = FAB(norm=norm, steps=30)(model, inputs, labels)
    assert bool(result.success.all())
    found = perturbation_size(result.perturbation, norm)
    truth = exact["linf" if norm == "linf" else "l2"] / (inputs[0].numel() ** 0.5 if norm == "rms" else 1)
    assert bool((found >= truth * (1 - 1e-4)).all())  # nothing beats the exact minimum
    assert bool((found <= truth * 1.01 + 1e-6).all())  # stepping back from each overshoot of 5% closes in


def test_fab_respects_a_box_that_binds() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 2)
    inputs = torch.rand(32, 8)
    inputs[:, :4] = 0.0  # on the box's face: half the coordinates cannot move one way
    labels = model(inputs).argmax(1)
    result = FAB(norm="l2", steps=30)(model, inputs, labels)
    weight = (model.weight[1] - model.weight[0]).detach().expand(32, -1)
    level = -(model.bias[1] - model.bias[0]).detach().expand(32)  # the boundary: weight · x = level
    move = plane_step(inputs, torch.zeros_like(inputs), torch.ones_like(inputs), weight, level, "l2")
    reachable = (((inputs + move) * weight).sum(1) - level).abs() < 1e-5
    minimal = move.norm(dim=1)
    ok = result.success & reachable
    assert ok.float().mean() > 0.5
    assert bool(((result.l2[ok] >= minimal[ok] * (1 - 1e-4)) & (result.l2[ok] <= minimal[ok] * 1.06)).all())
    assert bool(((result.adversarial >= 0) & (result.adversarial <= 1)).all())


def test_fab_is_not_stopped_by_a_gradient_scaled_towards_zero() -> None:
    net = pretrained(bn_convnet(), *images(64)).eval()
    inputs, labels = images(12, seed=3)
    tiny = nn.Sequential(net, nn.Identity())
    tiny.forward = lambda x: net(x) * 1e-9  # softmax flat, cross-entropy gradient ~1e-9: the plane is unchanged
    plain = FAB(norm="l2", steps=20)(net, inputs, labels)
    scaled = FAB(norm="l2", steps=20)(tiny, inputs, labels)
    assert plain.success.sum() >= 6
    assert torch.equal(plain.success, scaled.success)
    torch.testing.assert_close(scaled.l2[scaled.success], plain.l2[plain.success], rtol=1e-3, atol=1e-4)


def test_the_guide_rank_picks_the_class_linearised_towards() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()
    inputs = images(16, size=8, seed=1)[0]
    labels = model(inputs).argmax(1)
    first, third = (FAB(norm="l2", steps=20, guide_rank=rank)(model, inputs, labels) for rank in (1, 3))
    assert not torch.equal(first.adversarial, third.adversarial)
    beyond = FAB(norm="l2", steps=20, guide_rank=40)(model, inputs, labels)  # past the last wrong class: the last one
    last = FAB(norm="l2", steps=20, guide_rank=4)(model, inputs, labels)
    assert torch.equal(beyond.adversarial, last.adversarial)


def test_fab_on_a_resnet() -> None:
    net = resnet18(num_classes=2)
    inputs, labels = images(16, size=32)
    net = pretrained(net, inputs, labels, steps=15).eval()
    result = FAB(norm="linf", steps=10)(net, inputs[:4], labels[:4])
    assert result.success.any() and bool((result.linf[result.success] < 0.5).all())


@pytest.mark.parametrize(("settings", "message"), [
    ({"steps": 0}, "steps must be"), ({"guide_rank": 0}, "guide_rank must be"), ({"eta": 0.9}, "eta must be at least 1"),
    ({"alpha_max": 1.5}, r"alpha_max must lie in \[0, 1\]"), ({"beta": -0.1}, r"beta must lie in \[0, 1\]"),
    ({"norm": "l1"}, "norm must be one of"), ({"target": "nearest"}, "FAB cannot serve target='nearest'"),
])
def test_bad_settings_are_named(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FAB(**settings)


class CountingFAB(FAB):
    """FAB that counts the rows it searches."""

    rows = 0

    def propose(self, model, batch, targets, policy, generator):  # noqa: D102
        CountingFAB.rows += batch.inputs.shape[0]
        return super().propose(model, batch, targets, policy, generator)


def test_the_boundary_search_runs_once_per_row_and_counts_at_every_budget(monkeypatch) -> None:
    monkeypatch.setattr("advtrain.robustness.FAB", CountingFAB)
    model, inputs, labels, exact = linear_problem(count=24)
    search = BoundarySearch(model, inputs, labels, 1, "l2", (0.0, 1.0), Ensemble(steps=20, targets=9),
                            torch.Generator().manual_seed(0))
    every = torch.arange(24)
    budgets = sorted(float(e) for e in exact["l2"].quantile(torch.tensor([0.25, 0.5, 0.9])))
    CountingFAB.rows = 0
    small = search.breaks(every, budgets[0])
    assert CountingFAB.rows == 24  # one wrong class here, so one search per row
    middle = search.breaks(every, budgets[1])
    large = search.breaks(every[~torch.isin(every, middle)], budgets[2])
    assert CountingFAB.rows == 24  # no row is searched again
    clear = exact["l2"] > 1e-4  # a row on the boundary itself moves by less than float32 resolves
    for budget, hits in zip(budgets, (small, middle)):  # every row the exact minimum lets through, within 6%
        within = clear & (exact["l2"] <= budget / 1.06)
        assert bool(torch.isin(every[within], hits).all()) and bool((exact["l2"][hits] <= budget).all())
    assert bool(torch.isin(every[clear & (exact["l2"] <= budgets[2] / 1.06)], torch.cat([middle, large])).all())


def test_fab_t_joins_the_ensemble_and_can_only_add_breaks() -> None:
    model, inputs, labels, exact = linear_problem(count=32)
    budgets = {"l2": [float(exact["l2"].median())], "linf": [float(exact["linf"].median())]}
    quick = dict(steps=10, targets=1, queries=0, whole_box=False)
    without = run_ensemble(model, inputs, labels, budgets, (0.0, 1.0), ensemble=Ensemble(**quick, fab=False))
    with_fab = run_ensemble(model, inputs, labels, budgets, (0.0, 1.0), ensemble=Ensemble(**quick))
    for norm, (epsilon,) in budgets.items():
        assert "fab-t" not in without.broken_by[norm][epsilon] and "fab-t" in with_fab.broken_by[norm][epsilon]
        assert bool((with_fab.broken[norm][epsilon] >= without.broken[norm][epsilon]).all())
        assert with_fab.robust_error[norm][epsilon] == pytest.approx(float((exact[norm] <= epsilon).float().mean()), abs=2 / 32)


def test_a_row_no_wrong_class_breaks_within_the_budget_is_searched_at_each_rank_once(monkeypatch) -> None:
    monkeypatch.setattr("advtrain.robustness.FAB", CountingFAB)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()
    inputs = images(10, size=8, seed=1)[0]
    labels = model(inputs).argmax(1)
    search = BoundarySearch(model, inputs, labels, 4, "linf", (0.0, 1.0), Ensemble(steps=10, targets=3),
                            torch.Generator().manual_seed(0))
    every = torch.arange(10)
    CountingFAB.rows = 0
    assert search.breaks(every, 1e-6).numel() == 0
    assert CountingFAB.rows == 3 * 10  # three wrong classes, most likely first; never the fourth
    wide = search.breaks(every, 1.0)
    assert CountingFAB.rows == 3 * 10 and wide.numel() == 10  # the points found count at the wider budget
