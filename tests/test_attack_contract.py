"""The contract every attack keeps (advtrain.attacks.Attack), checked for every generator."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from advtrain.attacks import APGD, DDN, FAB, PGD, Attack, BoxLBFGS, FastGradient, Square
from advtrain.callbacks import LayerwiseAdversarialTraining
from advtrain.pooling import EveryStep, Successes, WithinBudget
from tests.real_models import PlainModule, TransformerClassifier, bn_convnet, images, loader, pretrained, resnet18, sequences

ATTACKS = {
    "box-lbfgs": lambda: BoxLBFGS(search_steps=3, iterations=20),
    "fast-gradient": lambda: FastGradient(epsilon=0.1),
    "pgd-linf": lambda: PGD(epsilon=0.1, norm="linf", steps=5),
    "pgd-l2": lambda: PGD(epsilon=3.0, norm="l2", steps=5),
    "apgd-ce-linf": lambda: APGD(epsilon=0.1, norm="linf", steps=5),
    "apgd-dlr-rms": lambda: APGD(epsilon=0.1, norm="rms", steps=5, loss="dlr", restarts=2),
    "square-linf": lambda: Square(epsilon=0.3, queries=50),
    "square-l2": lambda: Square(epsilon=3.0, norm="l2", queries=100),
    "fab-linf": lambda: FAB(norm="linf", steps=10),
    "fab-rms": lambda: FAB(norm="rms", steps=10, guide_rank=2),
    "ddn-l2": lambda: DDN(steps=20),
}


class BatchNormDropoutNet(nn.Module):
    """Batch norm and dropout, left in train mode by the caller."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.norm(self.conv(x)))).mean((2, 3)))


def trained_net() -> nn.Module:
    inputs, labels = images(32, size=8)
    return pretrained(BatchNormDropoutNet(), inputs, labels, steps=40)


def snapshot(model: nn.Module) -> dict:
    return {"modes": [m.training for m in model.modules()],
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "flags": [p.requires_grad for p in model.parameters()],
            "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()]}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_model_is_left_as_found_and_evaluated_as_in_eval_mode(name: str) -> None:
    model = trained_net().train()
    model.fc.weight.grad = torch.full_like(model.fc.weight, 2.0)
    model.conv.weight.requires_grad_(False)
    before = snapshot(model)
    inputs, labels = images(8, size=8, seed=1)
    result = ATTACKS[name]()(model, inputs, labels)
    after = snapshot(model)
    assert after["modes"] == before["modes"] and after["flags"] == before["flags"]
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key  # batch-norm statistics included
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(after["grads"], before["grads"]))
    # every reported success is one in eval mode, checked here independently
    model.eval()
    with torch.no_grad():
        reached = model(result.adversarial).argmax(1)
    assert torch.equal(result.success, (reached != labels) & torch.isfinite(result.distortion))
    assert bool(((result.adversarial >= 0) & (result.adversarial <= 1)).all())
    assert result.success.any()
    one = ATTACKS[name]()(model.train(), inputs[:1], labels[:1])  # one row: batch norm in train mode would fail
    assert len(one) == 1


@pytest.mark.parametrize("name", list(ATTACKS))
def test_norms_are_reported_beside_the_papers_distortion(name: str) -> None:
    model = trained_net().eval()
    inputs, labels = images(8, size=8, seed=1)
    result = ATTACKS[name]()(model, inputs, labels)
    found = result.success
    r = (result.adversarial - inputs).flatten(1)[found]
    torch.testing.assert_close(result.l2[found], r.norm(dim=1))
    torch.testing.assert_close(result.linf[found], r.abs().amax(1))
    torch.testing.assert_close(result.distortion[found], r.pow(2).mean(1).sqrt())
    assert bool(torch.isinf(result.l2[~found]).all() and torch.isinf(result.linf[~found]).all())


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_generator_decides_random_targets_and_starts(name: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()  # five classes: four wrong ones to draw
    inputs = images(16, size=8, seed=1)[0]
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    attack = ATTACKS[name]()
    run = lambda seed: attack(model, inputs, labels, target="random", generator=torch.Generator().manual_seed(seed))  # noqa: E731
    first, again, other = run(0), run(0), run(5)
    assert torch.equal(first.adversarial, again.adversarial) and torch.equal(first.target, again.target)
    drawn = lambda result: torch.where(result.success, result.target, -1)  # noqa: E731
    assert not torch.equal(drawn(first), drawn(other)) or not torch.equal(first.adversarial, other.adversarial)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: FastGradient(target="nearest"), r"FastGradient cannot serve target='nearest'"),
    (lambda: PGD(epsilon=0.1, target="nearest"), r"PGD cannot serve target='nearest'"),
    (lambda: BoxLBFGS(target="closest"), r"target must be a tensor of labels or one of"),
    (lambda: LayerwiseAdversarialTraining(attack=BoxLBFGS(), pooling=EveryStep()), r"EveryStep pools the rows a fixed-budget"),
    (lambda: PGD(epsilon=0.0), r"epsilon must be positive and finite"),
    (lambda: PGD(epsilon=0.1, norm="l1"), r"norm must be one of 'linf', 'l2', 'rms'"),
    (lambda: WithinBudget(0.05, beyond="shrink"), r"beyond must be 'drop' or 'project'"),
], ids=["fast-gradient-nearest", "pgd-nearest", "unknown-policy", "every-step-search", "pgd-budget", "pgd-norm",
        "within-budget-beyond"])
def test_a_policy_an_attack_cannot_serve_is_refused_when_it_is_built(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_a_call_cannot_ask_for_a_policy_the_attack_cannot_serve() -> None:
    inputs, labels = images(4, size=8)
    with pytest.raises(ValueError, match=r"FastGradient cannot serve target='nearest'"):
        FastGradient()(trained_net(), inputs, labels, target="nearest")


@pytest.mark.parametrize("norm", ["linf", "l2", "rms"])
def test_pgd_stays_inside_its_budget_and_raises_the_loss(norm: str) -> None:
    model = trained_net().eval()
    inputs, labels = images(16, size=8, seed=2)
    epsilon = {"linf": 0.03, "l2": 0.5, "rms": 0.5 / math.sqrt(inputs[0].numel())}[norm]
    result = PGD(epsilon=epsilon, norm=norm, steps=10)(model, inputs, labels)
    r = (result.attempt - inputs).flatten(1)
    size = {"linf": r.abs().amax(1), "l2": r.norm(dim=1), "rms": r.norm(dim=1) / math.sqrt(r.shape[1])}[norm]
    assert bool((size <= epsilon * (1 + 1e-5)).all())
    assert bool(((result.attempt >= 0) & (result.attempt <= 1)).all())
    with torch.no_grad():
        clean = nn.functional.cross_entropy(model(inputs), labels)
        attacked = nn.functional.cross_entropy(model(result.attempt), labels)
    assert attacked > clean


def test_pgd_finds_what_the_minimal_search_says_is_within_its_budget() -> None:
    model = trained_net().eval()
    inputs, labels = images(16, size=8, seed=2)
    minimal = BoxLBFGS()(model, inputs, labels)
    budget = float(minimal.l2[minimal.success].median())
    pgd = PGD(epsilon=1.5 * budget, norm="l2", steps=40)(model, inputs, labels)
    within = minimal.success & (minimal.l2 <= budget)
    assert within.any() and bool(pgd.success[within].float().mean() >= 0.75)


def test_the_callback_hands_its_generator_over_and_mutates_no_attack(tmp_path: Path) -> None:
    attack = PGD(epsilon=0.05, steps=3, target="random")
    before = repr(attack), copy.deepcopy(vars(attack))
    callback = LayerwiseAdversarialTraining(["input"], module="net", attack=attack, pooling=EveryStep(), mix_fraction=0.25)
    pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[callback]).fit(PlainModule(pretrained(bn_convnet(), *images(64))), loader(*images(64)))
    assert (repr(attack), vars(attack)) == before
    assert len(callback.pools["input"]) > 0
    assert isinstance(callback.pooling, EveryStep) and isinstance(LayerwiseAdversarialTraining().pooling, Successes)


#: the minimal searches that serve the evaluation (FAB-T, DDN) beside BoxLBFGS
MINIMAL_SEARCHES = {"fab-l2": lambda: FAB(norm="l2", steps=10), "ddn": lambda: DDN(steps=10)}


@pytest.mark.parametrize(("make", "least"), [(lambda: FAB(norm="linf", steps=20), 1), (lambda: DDN(steps=50), 8)],
                         ids=["fab", "ddn"])
def test_a_targeted_search_succeeds_only_on_reaching_the_target(make, least: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()
    inputs = images(16, size=8, seed=1)[0]
    labels = model(inputs).argmax(1)
    result = make()(model, inputs, labels, target="least_likely")
    with torch.no_grad():
        reached = model(result.adversarial).argmax(1)
    assert result.success.sum() >= least
    assert torch.equal(result.success, reached == result.target) and bool((result.target != labels).all())


@pytest.mark.parametrize("search", list(MINIMAL_SEARCHES))
@pytest.mark.parametrize(("build", "data", "layer"), [
    (lambda: pretrained(resnet18(), *images(96), steps=10), lambda: images(96), "layer2"),  # a skip-connection head, box [0, ∞)
    (lambda: pretrained(TransformerClassifier(), *sequences(64)), lambda: sequences(64), "encoder.layers.0"),  # an open box
], ids=["resnet18", "transformer"])
def test_a_minimal_search_generates_the_callbacks_pool_above_a_layer_of_a_real_model(tmp_path: Path, build, data, layer: str,
                                                                                    search: str) -> None:
    callback = LayerwiseAdversarialTraining([layer], module="net", attack=MINIMAL_SEARCHES[search]())
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[callback], max_steps=3)
    trainer.fit(PlainModule(build(), lr=0.02), loader(*data()))
    pool = callback.pools[layer]
    assert len(pool) > 0
    lower, upper = callback.boxes[layer]
    stored = pool.examples[: len(pool)]
    assert bool(((stored >= lower) & (stored <= upper)).all()) and bool(stored.isfinite().all())


def test_every_generator_is_an_attack() -> None:
    for make in ATTACKS.values():
        attack = make()
        assert isinstance(attack, Attack) and repr(attack).startswith(type(attack).__name__ + "(target=")
    assert math.isclose(PGD(epsilon=1.0, steps=10).step_size, 0.25)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_inputs_of_another_precision_are_cast_to_the_models(dtype: torch.dtype) -> None:
    model = trained_net().eval()
    inputs, labels = images(4, size=8, seed=1)
    result = BoxLBFGS(search_steps=2, iterations=10)(model, inputs.to(dtype), labels)
    assert result.adversarial.dtype == torch.float32 and result.success.any()


def test_labels_may_be_a_list_and_a_one_class_model_is_refused() -> None:
    model = trained_net().eval()
    inputs, labels = images(4, size=8, seed=1)
    result = FastGradient(epsilon=0.1)(model, inputs, labels.tolist())
    assert len(result) == 4 and torch.equal(result.target[~result.success] != labels[~result.success], torch.ones_like(labels[~result.success], dtype=torch.bool))
    with pytest.raises(ValueError, match="labels must be integer class indices"):
        FastGradient()(model, inputs, [0.5, 1.0, 0.0, 1.0])
    one_class = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1))
    with pytest.raises(ValueError, match="the model returns logits for 1 class; an adversarial example needs a second"):
        BoxLBFGS()(one_class, inputs, torch.zeros(4, dtype=torch.long))
