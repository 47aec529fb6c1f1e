"""DDN (advtrain.attacks.DDN) and its place in the evaluation's ensemble: the minimal L2
perturbation of a linear model, sizes in the box's unit, a saturated softmax, and the search run
once per row and reused at every L2 budget (targeted success and the pools above a real model's
layer: tests/test_attack_contract.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from advtrain.attacks import APGD, DDN, Proposal
from advtrain.budget import perturbation_size
from advtrain.robustness import CachedSearch, Ensemble, run_ensemble
from real_models import bn_convnet, images, pretrained, resnet18
from test_robustness_ensemble import linear_problem


@pytest.mark.parametrize("norm", ["l2", "rms"])
def test_ddn_finds_a_linear_models_smallest_perturbation(norm: str) -> None:
    model, inputs, labels, exact = linear_problem()
    result = DDN(norm=norm, steps=200)(model, inputs, labels)
    assert bool(result.success.all())
    found, truth = result.l2, exact["l2"]
    assert bool((found >= truth * (1 - 1e-4)).all())  # nothing beats the exact minimum
    assert bool((found <= truth * 1.02 + 1e-3).all())  # the norm's walk settles on the boundary
    assert float((found / truth).median()) < 1.005


def test_ddn_sizes_follow_the_boxs_unit() -> None:
    model, inputs, labels, _ = linear_problem(count=32)
    wide = nn.Sequential(nn.Identity(), model)
    wide.forward = lambda x: model(x / 255)  # the same model on pixels in [0, 255]
    unit = DDN(steps=100)(model, inputs, labels)
    scaled = DDN(steps=100)(wide, inputs * 255, labels, bounds=(0.0, 255.0))
    assert bool(unit.success.all()) and torch.equal(unit.success, scaled.success)
    torch.testing.assert_close(scaled.l2 / 255, unit.l2, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("target", ["untargeted", "least_likely"])
def test_ddn_is_not_stopped_by_a_saturated_softmax(target: str) -> None:
    net = pretrained(bn_convnet(), *images(64)).eval()
    inputs, labels = images(12, seed=3)
    saturated = nn.Sequential(net, nn.Identity())
    saturated.forward = lambda x: net(x) * 1e4  # softmax one-hot in float32: the cross-entropy's gradient is 0
    plain = DDN(steps=60)(net, inputs, labels, target=target)
    scaled = DDN(steps=60)(saturated, inputs, labels, target=target)
    assert plain.success.sum() >= 6
    assert torch.equal(plain.success, scaled.success)
    torch.testing.assert_close(scaled.l2[scaled.success], plain.l2[plain.success], rtol=1e-3, atol=1e-4)


def test_ddn_on_a_resnet_stays_in_the_box() -> None:
    net = resnet18(num_classes=2)
    inputs, labels = images(16, size=32)
    net = pretrained(net, inputs, labels, steps=15).eval()
    result = DDN(steps=100)(net, inputs[:4], labels[:4])
    assert result.success.any()
    assert bool(((result.adversarial >= 0) & (result.adversarial <= 1)).all())
    assert bool((result.l2[result.success] < 0.25 * inputs[:4].flatten(1).norm(dim=1)[result.success]).all())


class CountingDDN(DDN):
    """DDN that counts the rows it searches."""

    rows = 0

    def propose(self, model, batch, targets, policy, generator):  # noqa: D102
        CountingDDN.rows += batch.inputs.shape[0]
        return super().propose(model, batch, targets, policy, generator)


def test_the_cached_search_runs_once_per_row_and_counts_at_every_budget() -> None:
    model, inputs, labels, exact = linear_problem(count=24)
    search = CachedSearch(model, inputs, labels, [CountingDDN(steps=100)], "l2", (0.0, 1.0), torch.Generator().manual_seed(0))
    every = torch.arange(24)
    budgets = sorted(float(e) for e in exact["l2"].quantile(torch.tensor([0.25, 0.5, 0.9])))
    CountingDDN.rows = 0
    small = search.breaks(every, budgets[0])
    middle = search.breaks(every[~torch.isin(every, small)], budgets[1])
    large = search.breaks(every[~torch.isin(every, torch.cat([small, middle]))], budgets[2])
    assert CountingDDN.rows == 24  # no row is searched again
    for budget, hits in zip(budgets, (small, torch.cat([small, middle]), torch.cat([small, middle, large]))):
        assert bool(torch.isin(every[exact["l2"] * 1.02 + 1e-3 <= budget], hits).all())  # every row well inside
        assert bool((exact["l2"][hits] <= budget).all())  # and nothing over the budget


class StillAPGD(APGD):
    """APGD that never moves: the ensemble's fixed-budget attacks find nothing."""

    def propose(self, model, batch, targets, policy, generator):  # noqa: D102
        return Proposal(batch.inputs.clone(), torch.ones_like(batch.labels, dtype=torch.bool))


def test_ddn_joins_the_ensemble_in_l2_only_and_can_only_add_breaks(monkeypatch) -> None:
    monkeypatch.setattr("advtrain.robustness.APGD", StillAPGD)
    model, inputs, labels, exact = linear_problem(count=32)
    budgets = {"l2": [float(exact["l2"].median())], "linf": [float(exact["linf"].median())], "rms": [float(exact["l2"].median()) / 4]}
    weak = dict(targets=0, queries=0, fab=False, whole_box=False)  # APGD standing still: DDN must do it all
    without = run_ensemble(model, inputs, labels, budgets, (0.0, 1.0), ensemble=Ensemble(**weak, ddn=0))
    with_ddn = run_ensemble(model, inputs, labels, budgets, (0.0, 1.0), ensemble=Ensemble(**weak, ddn=200))
    assert "ddn" not in without.broken_by["l2"][budgets["l2"][0]] and "ddn" not in with_ddn.broken_by["linf"][budgets["linf"][0]]
    for norm in ("l2", "rms"):
        (epsilon,) = budgets[norm]
        assert without.robust_error[norm][epsilon] == 0
        breaks = exact["l2"] / (inputs[0].numel() ** 0.5 if norm == "rms" else 1) <= epsilon
        assert with_ddn.broken_by[norm][epsilon]["ddn"] == int(with_ddn.broken[norm][epsilon].sum())
        assert bool((with_ddn.broken[norm][epsilon] <= breaks).all())  # nothing over the budget
        assert with_ddn.robust_error[norm][epsilon] >= float(breaks.float().mean()) - 2 / 32  # nearly all within it
    CountingDDN.rows = 0
    monkeypatch.setattr("advtrain.robustness.DDN", CountingDDN)
    run_ensemble(model, inputs, labels, {"l2": sorted(float(e) for e in exact["l2"].quantile(torch.tensor([0.2, 0.5, 0.8])))},
                 (0.0, 1.0), ensemble=Ensemble(**weak, ddn=100))
    assert 0 < CountingDDN.rows <= 32  # once per row over three budgets


def test_the_evaluation_perturbation_sizes_count_in_rms_as_in_l2() -> None:
    model, inputs, labels, _ = linear_problem(count=8)
    l2, rms = (DDN(norm=norm, steps=100)(model, inputs, labels) for norm in ("l2", "rms"))
    torch.testing.assert_close(perturbation_size(rms.perturbation, "rms") * inputs[0].numel() ** 0.5, l2.l2)


@pytest.mark.parametrize(("settings", "message"), [
    ({"steps": 0}, "steps must be"), ({"gamma": 1.0}, r"gamma must lie in \(0, 1\)"), ({"gamma": 0.0}, "gamma must lie"),
    ({"init_epsilon": 0.0}, "init_epsilon must be a positive finite number"),
    ({"max_step": float("inf")}, "max_step must be a positive finite number"),
    ({"norm": "linf"}, "DDN searches in L2"), ({"norm": "l1"}, "norm must be one of"),
    ({"target": "nearest"}, "DDN cannot serve target='nearest'"),
])
def test_bad_settings_are_named(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DDN(**settings)


def test_a_negative_ddn_step_count_in_the_ensemble_is_named() -> None:
    with pytest.raises(ValueError, match="ddn"):
        Ensemble(ddn=-1)
