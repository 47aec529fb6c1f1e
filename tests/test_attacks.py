"""BoxLBFGS: the linear optimum, the exact box, verified success, an untouched model, bad inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advtrain.attacks import BoxLBFGS, choose_targets
from advtrain.layers import split_at


def linear_head(dims: int = 20, classes: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(dims, classes)


def exact_minimum_l2(head: nn.Linear, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Closed form without a box: the smallest r that makes the target logit beat every other.

    For 2 classes the optimum is the distance to one hyperplane."""
    with torch.no_grad():
        logits = head(inputs)
        label = logits.argmax(1)
        w = head.weight[targets] - head.weight[label]  # (N, D)
        gap = logits.gather(1, label[:, None]).squeeze(1) - logits.gather(1, targets[:, None]).squeeze(1)
        return gap / w.norm(dim=1)


@pytest.mark.parametrize("backend", ["torch", "scipy"])
@pytest.mark.parametrize("loss", ["ce", "margin"])
def test_linear_binary_optimum_is_found(backend: str, loss: str) -> None:
    head = linear_head(classes=2)
    inputs = torch.rand(8, 20, dtype=torch.float64) * 0.5 + 0.25
    head = head.double()
    labels = head(inputs).argmax(1).detach()
    targets = 1 - labels
    exact = exact_minimum_l2(head, inputs, targets)
    result = BoxLBFGS(backend=backend, loss=loss, search_steps=16)(
        head, inputs, labels, target=targets, bounds=(-math.inf, math.inf))
    assert result.success.all()
    assert (result.l2 >= exact * (1 - 1e-9)).all()  # nothing can beat the optimum
    assert (result.l2 <= exact * 1.01).all(), (result.l2 / exact)


@pytest.mark.parametrize("backend", ["torch", "scipy"])
def test_result_is_verified_and_inside_per_unit_box(backend: str) -> None:
    head = linear_head()
    inputs = torch.rand(16, 20) * 0.2 + 0.4
    labels = head(inputs).argmax(1).detach()
    lower, upper = torch.full((20,), 0.3), torch.linspace(0.65, 0.9, 20)
    result = BoxLBFGS(backend=backend)(head, inputs, labels, bounds=(lower, upper))
    assert result.success.any()
    assert ((result.adversarial >= lower) & (result.adversarial <= upper)).all()
    with torch.no_grad():
        predicted = head(result.adversarial).argmax(1)
    assert torch.equal(predicted[result.success], result.target[result.success])
    assert torch.allclose(result.perturbation, result.adversarial - inputs)
    torch.testing.assert_close(result.distortion, result.l2 / math.sqrt(20))
    assert torch.isinf(result.l2[~result.success]).all()


def test_more_search_steps_do_not_increase_distortion() -> None:
    head = linear_head()
    inputs = torch.rand(12, 20)
    labels = head(inputs).argmax(1).detach()
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same random targets in every call
    few = BoxLBFGS(loss="ce", search_steps=2, refine_steps=0, target="random")(head, inputs, labels, generator=seeded())
    many = BoxLBFGS(loss="ce", search_steps=10, refine_steps=0, target="random")(head, inputs, labels, generator=seeded())
    both = few.success & many.success
    assert both.sum() >= 10 and many.l2[both].mean() < 0.95 * few.l2[both].mean()
    refined = BoxLBFGS(loss="ce", search_steps=10, target="random")(head, inputs, labels, generator=seeded())  # same path, then pulled back
    assert torch.equal(refined.success, many.success)
    assert (refined.l2[both] <= many.l2[both] + 1e-6).all() and refined.l2[both].mean() < many.l2[both].mean()


def test_infinite_upper_bound_like_relu_activations() -> None:
    torch.manual_seed(3)
    head = nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 4))
    activations = torch.relu(torch.randn(10, 30))
    labels = head(activations).argmax(1).detach()
    result = BoxLBFGS()(head, activations, labels, target="least_likely", bounds=(0.0, math.inf))
    assert result.success.all() and (result.adversarial >= 0).all()


def test_hidden_layer_of_a_sigmoid_network() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(49, 20), nn.Sigmoid(), nn.Linear(20, 20), nn.Sigmoid(), nn.Linear(20, 5))
    prototypes = torch.rand(5, 1, 7, 7)
    classes = torch.arange(5).repeat(20)
    images = (prototypes[classes] + 0.1 * torch.randn(100, 1, 7, 7)).clamp(0, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):  # a trained network: every class is reachable
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), classes).backward()
        optimizer.step()
    bottom, head = split_at(model, "2")
    images = images[:10]
    labels = model(images).argmax(1).detach()
    result = BoxLBFGS()(head, bottom(images).detach(), labels, bounds=(0.0, 1.0))
    assert result.success.all()


def test_model_is_left_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    model.train()
    model[0].weight.requires_grad_(False)
    marker = torch.full_like(model[2].weight, 7.0)
    model[2].weight.grad = marker.clone()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    inputs = torch.rand(6, 20)
    BoxLBFGS(search_steps=2, iterations=5)(model, inputs, torch.zeros(6, dtype=torch.long), target=torch.ones(6, dtype=torch.long))
    assert model.training and model[1].training
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad and model[2].bias.requires_grad
    assert torch.equal(model[2].weight.grad, marker) and model[2].bias.grad is None and model[0].weight.grad is None
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_works_under_inference_mode_and_in_float64() -> None:
    head = linear_head().double()
    inputs = torch.rand(5, 20, dtype=torch.float64)
    labels = head(inputs).argmax(1).detach()
    with torch.inference_mode():
        result = BoxLBFGS(search_steps=4)(head, inputs, labels, bounds=(-math.inf, math.inf))
    assert result.success.all() and result.adversarial.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype: torch.dtype) -> None:
    head = linear_head(classes=2).to(dtype)
    inputs = (torch.rand(8, 20) * 0.5 + 0.25).to(dtype)
    labels = head(inputs).argmax(1).detach()
    attack = BoxLBFGS(loss="margin", search_steps=16)
    on_cpu = attack(head, inputs, labels, target=1 - labels, bounds=(-math.inf, math.inf))
    on_gpu = attack(head.cuda(), inputs.cuda(), labels.cuda(), target=(1 - labels).cuda(), bounds=(-math.inf, math.inf))
    assert on_gpu.success.all() and on_gpu.adversarial.is_cuda
    torch.testing.assert_close(on_gpu.l2.cpu(), on_cpu.l2, rtol=1e-3, atol=1e-5)


def test_nearest_is_no_farther_than_any_single_target() -> None:
    head = linear_head(classes=4)
    inputs = torch.rand(6, 20)
    labels = head(inputs).argmax(1).detach()
    attack = BoxLBFGS(search_steps=8)
    nearest = attack(head, inputs, labels, target="nearest", bounds=(-math.inf, math.inf))
    assert nearest.success.all() and (nearest.target != labels).all()
    for offset in (1, 2, 3):
        single = attack(head, inputs, labels, target=(labels + offset) % 4, bounds=(-math.inf, math.inf))
        assert (nearest.l2 <= single.l2 * 1.001).all()


@pytest.mark.parametrize(("loss", "slack"), [("margin", 1.05), ("ce", 1.25)])
def test_untargeted_finds_the_nearest_decision_boundary_in_one_search(loss: str, slack: float) -> None:
    head = linear_head(classes=4).double()
    inputs = torch.rand(8, 20, dtype=torch.float64)
    labels = head(inputs).argmax(1).detach()
    # leaving a linear model's class region means crossing the closest of its pairwise boundaries
    exact = torch.stack([exact_minimum_l2(head, inputs, (labels + offset) % 4) for offset in (1, 2, 3)]).min(0).values
    result = BoxLBFGS(loss=loss, search_steps=16)(head, inputs, labels, target="untargeted",
                                                  bounds=(-math.inf, math.inf))
    assert result.success.all()
    with torch.no_grad():
        reached = head(result.adversarial).argmax(1)
    assert torch.equal(result.target, reached) and (reached != labels).all()
    ratio = result.l2 / exact
    assert (ratio >= 1 - 1e-9).all()
    # the margin's pull follows the best other class, which is not always the nearest boundary;
    # cross-entropy spreads its pull over every other class and lands further out
    assert (ratio <= slack).all(), ratio
    if loss == "margin":
        assert float(ratio.median()) <= 1.001, ratio


@pytest.mark.parametrize("target", ["nearest", "untargeted", "random"])
def test_refined_examples_stay_just_past_the_boundary_in_any_batch(target: str) -> None:
    head = linear_head(dims=50, classes=5)
    inputs = torch.rand(40, 50)
    labels = head(inputs).argmax(1).detach()
    result = BoxLBFGS()(head, inputs, labels, target=target, bounds=(-math.inf, math.inf))
    assert result.success.all()
    with torch.no_grad():
        logits = head(result.adversarial)
        others = logits.scatter(1, result.target[:, None], -math.inf).amax(1)
        lead = logits.gather(1, result.target[:, None])[:, 0] - others
        assert (lead >= 5e-5).all(), lead.min()  # refined to a margin of zero, rounding could flip it
        assert (lead <= 0.02).all(), lead.max()  # still the minimal example, not pushed further
        alone = torch.stack([head(row[None])[0].argmax() for row in result.adversarial])
    assert torch.equal(alone, result.target)


def test_untargeted_failures_report_the_runner_up_inside_the_box() -> None:
    head = linear_head(classes=4)
    inputs = torch.full((3, 20), 0.5)
    labels = head(inputs).argmax(1).detach()
    box = (inputs - 1e-4, inputs + 1e-4)  # far too small to leave the class
    result = BoxLBFGS(search_steps=2)(head, inputs, labels, target="untargeted", bounds=box)
    assert not result.success.any() and torch.equal(result.adversarial, inputs)
    assert torch.equal(result.target, choose_targets("runner_up", labels, head(inputs).detach(), 4))


def test_target_policies() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4] * 20)
    logits = torch.randn(100, 5)
    random = choose_targets("random", labels, logits, 5, generator=torch.Generator().manual_seed(1))
    again = choose_targets("random", labels, logits, 5, generator=torch.Generator().manual_seed(1))
    assert (random != labels).all() and torch.equal(random, again)
    assert len(set(random.tolist())) == 5
    least = choose_targets("least_likely", labels, logits, 5)
    masked = logits.scatter(1, labels[:, None], float("inf"))
    assert torch.equal(least, masked.argmin(1)) and (least != labels).all()
    runner_up = choose_targets("runner_up", labels, logits, 5)
    ranked = logits.argsort(1, descending=True)
    second = torch.where(ranked[:, 0] == labels, ranked[:, 1], ranked[:, 0])  # the best wrong class
    assert torch.equal(runner_up, second) and (runner_up != labels).all()


BAD = [
    ("outside-box", dict(inputs=torch.full((2, 20), 1.5)), r"inputs lie outside the box at 40 values"),
    ("non-finite", dict(inputs=torch.tensor([[float("nan")] * 20, [0.5] * 20])), r"inputs holds 20 non-finite values"),
    ("label-range", dict(labels=torch.tensor([0, 3])), r"labels must lie in \[0, 3\), got values from 0 to 3"),
    ("label-count", dict(labels=torch.tensor([0, 1, 2])), r"labels has 3 entries but the inputs have 2"),
    ("target-range", dict(target=torch.tensor([1, 5])), r"target must lie in \[0, 3\)"),
    ("target-is-label", dict(target=torch.tensor([0, 2])), r"target equals the true label for 1 examples"),
    ("unknown-policy", dict(target="farthest"), r"target must be a tensor of labels or one of \('random'"),
    ("bounds-order", dict(bounds=(1.0, 0.0)), r"bounds \(1, 0\) have lower > upper somewhere"),
    ("bounds-shape", dict(bounds=(torch.zeros(7), 1.0)), r"bounds must broadcast to the inputs' shape \(2, 20\)"),
    ("integer-inputs", dict(inputs=torch.zeros(2, 20, dtype=torch.long)), r"inputs must be a floating-point tensor"),
]


@pytest.mark.parametrize("overrides, message", [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_inputs_are_named(overrides: dict, message: str) -> None:
    call = dict(inputs=torch.full((2, 20), 0.5), labels=torch.tensor([0, 1]), target="random", bounds=(0.0, 1.0))
    call.update(overrides)
    inputs, labels = call.pop("inputs"), call.pop("labels")
    with pytest.raises(ValueError, match=message):
        BoxLBFGS()(linear_head(), inputs, labels, **call)


@pytest.mark.parametrize(
    "settings, message",
    [({"loss": "l2"}, "loss must be 'ce', 'margin' or 'both'"), ({"backend": "jax"}, "backend must be"),
     ({"search_steps": 0}, "search_steps must be a positive integer"), ({"c_growth": 1.0}, "c_growth must be greater than 1"),
     ({"c_init": -1.0}, "c_init must be positive")],
    ids=["loss", "backend", "steps", "growth", "c-init"],
)
def test_bad_settings_fail_at_construction(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BoxLBFGS(**settings)


def test_repr_shows_the_settings() -> None:
    assert "search_steps=6" in repr(BoxLBFGS()) and repr(BoxLBFGS()).startswith("BoxLBFGS(target='untargeted', loss='margin'")
    assert "c_init=None" in repr(BoxLBFGS()) and "c_init=2.0" in repr(BoxLBFGS(c_init=2.0))


def test_smallest_candidate_per_row_with_repeated_rows() -> None:
    from advtrain.attacks.box_lbfgs import smallest_per_row

    values = torch.tensor([3.0, 1.0, 1.0, math.inf, 2.0, 0.5])
    rows = torch.tensor([0, 0, 0, 1, 2, 3])
    found, pick = smallest_per_row(values, rows, count=5)
    assert found.tolist() == [0, 2, 3]  # row 1 has no finite candidate, row 4 none at all
    assert pick.tolist() == [1, 4, 5]  # row 0: the first of its two smallest
