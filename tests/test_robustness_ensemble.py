"""The evaluation's ensemble (APGD, Square) and the checks that flag a broken evaluation: exact
answers on linear models, worst case per example, masked models flagged and ordinary ones not."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from advtrain.attacks import APGD, PGD, Square
from advtrain.attacks.apgd import checkpoints, dlr_loss
from advtrain.attacks.square import window_share
from advtrain.budget import perturbation_size
from advtrain.evaluation_checks import EvaluationCheckWarning, output_checks, result_checks
from advtrain.robustness import Ensemble, RobustnessResult, run_ensemble, verified_breaks
from real_models import TransformerClassifier, bn_convnet, images, pretrained, resnet18, sequences

QUICK = Ensemble(steps=20, targets=2, queries=300)


def linear_problem(count: int = 64, features: int = 16, seed: int = 0):
    """A linear two-class model ``x ↦ (0, w·x + b)`` and inputs well inside the unit box, so the
    exact smallest perturbation that flips each row is known: ``|w·x + b| / ‖w‖_dual``."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(features, generator=generator)
    inputs = 0.4 + 0.2 * torch.rand(count, features, generator=generator)
    bias = -(inputs @ weight).median()
    model = nn.Linear(features, 2)
    with torch.no_grad():
        model.weight.copy_(torch.stack([torch.zeros(features), weight]))
        model.bias.copy_(torch.tensor([0.0, float(bias)]))
    labels = model(inputs).argmax(1)
    score = (inputs @ weight + bias).abs()
    exact = {"linf": score / weight.abs().sum(), "l2": score / weight.norm()}
    return model, inputs, labels, exact


def test_apgd_checkpoints_follow_autoattack() -> None:
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [1]


def test_dlr_is_the_margin_over_the_spread_and_scale_free() -> None:
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    assert float(dlr_loss(logits, torch.tensor([0]))) == pytest.approx(-(3 - 1) / (3 - 0))
    assert float(dlr_loss(logits, torch.tensor([0]), torch.tensor([2]))) == pytest.approx(-(3 - 0) / (3 - (0 - 1) / 2))
    assert float(dlr_loss(100 * logits, torch.tensor([1]))) == pytest.approx(float(dlr_loss(logits, torch.tensor([1]))))


def test_square_windows_shrink_on_autoattacks_schedule() -> None:
    assert window_share(0, 5000, 0.8) == 0.8 and window_share(5, 5000, 0.8) == 0.8  # progress 10: not yet
    assert window_share(25, 5000, 0.8) == 0.4 and window_share(4999, 5000, 0.8) == 0.8 / 512


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-dlr", "square"])
def test_attacks_break_exactly_the_rows_a_linear_model_lets_them(attack: str, norm: str) -> None:
    model, inputs, labels, exact = linear_problem()
    epsilon = float(exact[norm].median())
    make = {"apgd-ce": lambda: APGD(epsilon=epsilon, norm=norm, steps=30),
            "apgd-dlr": lambda: APGD(epsilon=epsilon, norm=norm, steps=30, loss="dlr"),
            "square": lambda: Square(epsilon=epsilon, norm=norm, queries=400)}[attack]
    result = make()(model, inputs, labels, generator=torch.Generator().manual_seed(0))
    fooled = model(result.attempt).argmax(1) != labels
    assert bool((perturbation_size(result.attempt - inputs, norm) <= epsilon * (1 + 1e-5)).all())
    assert bool(((result.attempt >= 0) & (result.attempt <= 1)).all())
    assert not bool(fooled[exact[norm] > epsilon * 1.001].any())  # none broken that cannot be
    reachable = exact[norm] < (0.9 if attack == "square" else 0.999) * epsilon  # Square: a random search
    assert bool(fooled[reachable].all()), f"{int((~fooled[reachable]).sum())} reachable rows missed"


def trained_mlp(count: int = 96, seed: int = 0):
    """A ten-class ReLU MLP fit to random 8×8 'images' labelled by a random linear map."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.rand(count, 1, 8, 8, generator=generator)
    labels = (inputs.flatten(1) @ torch.randn(64, 10, generator=generator)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model.eval(), inputs, labels


class Quantised(nn.Module):
    """The model behind ``torch.round`` of its input to 8 levels: gradients vanish everywhere."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 8) / 8)


class SquareRootInput(Quantised):
    """The model behind ``sqrt`` of its input: infinite gradients at zero pixels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.sqrt(x))


class Probabilities(Quantised):
    """The model's softmax: probabilities, not logits."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).softmax(1)


class Noisy(Quantised):
    """Gaussian noise on every input, even in eval mode: two forward passes disagree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x + 0.3 * torch.randn_like(x))


THREATS = {"linf": [0.05, 0.1, 0.2], "l2": [0.5, 1.0, 2.0]}


def test_the_ensemble_is_the_worst_case_per_example_and_grows_with_the_budget() -> None:
    model, inputs, labels = trained_mlp()
    result = run_ensemble(model, inputs, labels, THREATS, (0.0, 1.0), ensemble=QUICK)
    correct = model(inputs).argmax(1) == labels
    for norm, epsilons in THREATS.items():
        errors = [result.robust_error[norm][e] for e in epsilons]
        assert errors == sorted(errors) and result.clean_error <= errors[0]
        assert result.clean_error < errors[-1] < 1.0 or errors[-1] == 1.0
        for epsilon in epsilons:
            alone = PGD(epsilon=epsilon, norm=norm, steps=20)(model, inputs, labels, generator=torch.Generator().manual_seed(3))
            pgd_broken = ~correct | (model(alone.attempt).argmax(1) != labels)
            assert bool((result.broken[norm][epsilon] | ~pgd_broken).all()) or \
                result.robust_error[norm][epsilon] >= float(pgd_broken.float().mean())
            tally = result.broken_by[norm][epsilon]
            assert sum(tally.values()) == round(result.robust_error[norm][epsilon] * len(labels)) - int((~correct).sum())
            assert result.first_attack_error[norm][epsilon] <= result.robust_error[norm][epsilon]
    assert result.whole_box_error >= 0.95
    assert result_checks(result) == [] and output_checks(model, inputs, labels) == []


@pytest.mark.parametrize(("wrap", "expected"), [
    (Quantised, {"gradients", "gradient-free", "whole box"}),
    (SquareRootInput, {"gradients"}),
    (Probabilities, {"probabilities"}),
    (Noisy, {"randomness"}),
], ids=["round", "sqrt", "softmax", "noise"])
def test_masked_and_broken_models_are_flagged(wrap, expected: set[str]) -> None:
    model, inputs, labels = trained_mlp()
    inputs = inputs * (inputs > 0.1)  # zero pixels, as MNIST has: sqrt's gradient is infinite there
    masked = wrap(model).eval()
    torch.manual_seed(0)
    failed = {check.name for check in output_checks(masked, inputs, labels)}
    if wrap is Quantised:
        failed |= {check.name for check in result_checks(run_ensemble(masked, inputs, labels, THREATS, (0.0, 1.0),
                                                                      ensemble=QUICK))}
    assert expected <= failed


def test_the_budget_check_fires_when_the_error_falls_with_a_larger_budget() -> None:
    result = RobustnessResult(examples=100, clean_error=0.0, first_attack_error={"linf": {0.1: 0.5, 0.2: 0.3, 0.3: 0.9}},
                              whole_box_error=1.0)
    (check,) = result_checks(result)
    assert check.name == "budget" and "0.500, 0.300, 0.900" in check.message
    result.first_attack_error["linf"][0.2] = 0.49  # one example of 100: within the margin
    assert result_checks(result) == []


ORDINARY = {
    "resnet18": lambda: (resnet18(), *images(32, size=32)),
    "transformer": lambda: (TransformerClassifier(), *sequences(32)),
    "bn-convnet": lambda: (bn_convnet(), *images(32, size=16)),
}


@pytest.mark.parametrize("name", list(ORDINARY))
def test_no_check_fires_on_ordinary_models(name: str) -> None:
    net, inputs, labels = ORDINARY[name]()
    net = pretrained(net, inputs, labels, lr=0.01 if name == "resnet18" else 0.05).eval()
    budgets = {"linf": [0.01, 0.03, 0.1], "l2": [0.3, 1.0]}
    result = run_ensemble(net, inputs, labels, budgets, (0.0, 1.0), ensemble=Ensemble(steps=20, targets=1, queries=100))
    checks = output_checks(net, inputs, labels) + result_checks(result)
    assert checks == [], [check.message for check in checks]
    assert result.robust_error["linf"][0.1] > result.clean_error  # the attacks did work


def test_the_callback_warns_for_each_failed_check_and_logs_their_count(tmp_path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from advtrain import Classifier
    from advtrain.callbacks import AdversarialEvaluation

    model, inputs, labels = trained_mlp()
    inputs = inputs * (inputs > 0.1)
    results = {}
    for name, net in [("plain", model), ("round", Quantised(model))]:
        callback = AdversarialEvaluation(examples=48, budgets={"linf": [0.1, 0.2]}, ensemble=QUICK, figure_examples=0)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, callbacks=[callback])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            metrics = trainer.test(Classifier(net, num_classes=10), DataLoader(TensorDataset(inputs, labels), batch_size=48),
                                   verbose=False)[0]
        named = {str(w.message).split("'")[1] for w in caught if issubclass(w.category, EvaluationCheckWarning)}
        results[name] = (metrics["adv_test/checks_failed"], named, callback.reports["test"].checks_failed)
    assert results["plain"] == (0.0, set(), [])
    count, named, listed = results["round"]
    assert count == len(listed) >= 3 and named == set(listed) and {"gradients", "whole box"} <= named
    assert math.isfinite(count)


class Bowl(nn.Module):
    """Two logits; the wrong class's logit peaks, still below the true one's, at ``centre``: APGD's
    loss has its maximum inside the ball, which a fixed step of 2ε overshoots forever."""

    def __init__(self, centre: torch.Tensor) -> None:
        super().__init__()
        self.centre = centre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.ones(x.shape[0]), -((x.flatten(1) - self.centre) ** 2).sum(1)], 1)


@pytest.mark.parametrize(("norm", "epsilon"), [("l2", 0.5), ("linf", 0.1)])
def test_apgd_halves_its_step_to_settle_on_a_maximum_inside_the_ball(norm: str, epsilon: float) -> None:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.full((8, 16), 0.5)
    centre = inputs[0] + 0.03 * torch.randn(16, generator=generator)  # 0.11 from the inputs in L2
    result = APGD(epsilon=epsilon, norm=norm, steps=50)(Bowl(centre), inputs, torch.zeros(8, dtype=torch.long),
                                                        generator=generator)
    assert float((result.attempt - centre).norm(dim=1).max()) < 0.06  # a fixed step stays 0.11 or more away


def test_only_points_inside_the_box_within_the_budget_and_misclassified_count() -> None:
    model, inputs, labels, exact = linear_problem(count=6)
    keep = exact["linf"] > 1e-3  # the median row lies on the boundary
    inputs, labels, exact = inputs[keep], labels[keep], {norm: size[keep] for norm, size in exact.items()}
    weight = model.weight[1] - model.weight[0]
    toward = torch.where(labels == 0, 1.0, -1.0)[:, None] * weight.sign()  # L∞ steepest way to the other class
    far = inputs + 1.5 * exact["linf"][:, None] * toward  # flips every row, at 1.5 times its distance
    epsilon = float(exact["linf"].max()) * 1.2
    assert bool((model(far).argmax(1) != labels).all())
    within = (far - inputs).abs().amax(1) <= epsilon
    assert verified_breaks(model, inputs, labels, far, "linf", epsilon, (0.0, 1.0)).tolist() == within.tolist()
    assert not bool(within.all()) and bool(within.any())
    inside = (far <= 0.6).all(1)
    assert verified_breaks(model, inputs, labels, far, "linf", epsilon, (0.0, 0.6)).tolist() == (within & inside).tolist()
    assert not bool((within & inside).all()) and bool((within & inside).any())  # some refused for the box alone
    assert not verified_breaks(model, inputs, labels, inputs, "linf", epsilon, (0.0, 1.0)).any()  # not misclassified
    # the budget is read in the norm given: in L2 the same points lie sqrt(16) times as far
    in_l2 = (far - inputs).norm(dim=1) <= epsilon
    assert verified_breaks(model, inputs, labels, far, "l2", epsilon, (0.0, 1.0)).tolist() == in_l2.tolist() != within.tolist()


def test_a_float64_point_exactly_on_a_bound_counts_as_inside() -> None:
    """0.1 has no exact float32 value: the box is compared in the inputs' own precision."""
    model = nn.Linear(2, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        model.bias.zero_()
    inputs = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
    points = torch.tensor([[0.1, 0.2]], dtype=torch.float64)  # class 1 now, on the lower bound
    assert verified_breaks(model, inputs, torch.tensor([0]), points, "linf", 0.5, (0.1, 0.9)).tolist() == [True]


def test_a_random_model_is_flagged_not_a_crash_when_the_search_saw_other_correct_rows(tmp_path) -> None:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from advtrain import Classifier
    from advtrain.callbacks import AdversarialEvaluation

    model, inputs, labels = trained_mlp()
    callback = AdversarialEvaluation(examples=48, budgets={"linf": [0.1]}, ensemble=QUICK, figure_examples=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[callback])
    torch.manual_seed(0)
    with pytest.warns(EvaluationCheckWarning, match="'randomness'"):
        trainer.test(Classifier(Noisy(model), num_classes=10), DataLoader(TensorDataset(inputs, labels), batch_size=48),
                     verbose=False)
    assert "randomness" in callback.reports["test"].checks_failed


class RowCounter(nn.Module):
    """A linear model that counts the rows it is asked about."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3)
        self.rows = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.rows += inputs.shape[0]
        return self.linear(inputs.flatten(1))


def test_apgd_stops_each_row_once_it_is_misclassified() -> None:
    """Rows fooled early cost no further forward passes; those that never are run every step, and the
    result is the same rows broken."""
    model = RowCounter()
    inputs = torch.rand(8, 4, generator=torch.Generator().manual_seed(1))
    labels = model(inputs).argmax(1).detach()
    model.rows = 0
    easy = APGD(epsilon=50.0, norm="linf", steps=100)(model, inputs, labels, bounds=(-100.0, 100.0),
                                                      generator=torch.Generator().manual_seed(0))
    assert easy.success.all()
    assert model.rows < 8 * 10  # every row stops within a few steps, not after 100
    model.rows = 0
    hard = APGD(epsilon=1e-4, norm="linf", steps=100)(model, inputs, labels, bounds=(-100.0, 100.0),
                                                      generator=torch.Generator().manual_seed(0))
    assert not hard.success.any()
    assert model.rows >= 8 * 101  # no row fooled: every step on every row


def test_clean_logits_given_save_a_forward_pass_and_change_nothing() -> None:
    model, inputs, labels = trained_mlp()
    counter = RowCounter()
    counter.linear = model  # count the rows the ensemble asks the trained model about
    alone = run_ensemble(counter, inputs, labels, {"linf": [0.1]}, (0.0, 1.0), ensemble=QUICK)
    asked_alone, counter.rows = counter.rows, 0
    with torch.no_grad():
        logits = model(inputs)
    given = run_ensemble(counter, inputs, labels, {"linf": [0.1]}, (0.0, 1.0), ensemble=QUICK, clean_logits=logits)
    assert asked_alone - counter.rows == len(labels)  # exactly the clean pass saved
    assert given.robust_error == alone.robust_error and torch.equal(given.broken["linf"][0.1], alone.broken["linf"][0.1])
    with pytest.raises(ValueError, match="clean_logits has 3 rows for 96 labels"):
        run_ensemble(model, inputs, labels, {"linf": [0.1]}, (0.0, 1.0), ensemble=QUICK, clean_logits=logits[:3])
