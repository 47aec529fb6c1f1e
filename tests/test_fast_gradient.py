"""FastGradient: one L2 step of the asked size along the loss gradient, clipped to the box."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advtrain.attacks import AttackResult, FastGradient


def linear_head() -> nn.Linear:
    torch.manual_seed(0)
    head = nn.Linear(6, 4)
    head.eval()
    return head


def batch(count: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = 0.2 + 0.6 * torch.rand(count, 6, generator=generator)
    with torch.no_grad():
        labels = linear_head()(inputs).argmax(1)  # every row classified correctly
    return inputs, labels


def analytic_gradient(head: nn.Linear, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """d CE / d x = (softmax − one-hot) W, per row."""
    with torch.no_grad():
        probabilities = head(inputs).softmax(1)
    return (probabilities - nn.functional.one_hot(labels, 4).float()) @ head.weight.detach()


def test_untargeted_step_has_the_asked_size_along_the_loss_gradient() -> None:
    head, (inputs, labels) = linear_head(), batch()
    result = FastGradient(epsilon=0.05)(head, inputs, labels, bounds=(-math.inf, math.inf))
    step = result.attempt - inputs
    rms = step.pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, 0.05))
    cosine = nn.functional.cosine_similarity(step, analytic_gradient(head, inputs, labels))
    torch.testing.assert_close(cosine, torch.ones_like(cosine))


def test_targeted_step_descends_the_target_loss() -> None:
    head, (inputs, labels) = linear_head(), batch()
    targets = (labels + 1) % 4
    result = FastGradient(epsilon=0.05)(head, inputs, labels, target=targets, bounds=(-math.inf, math.inf))
    cosine = nn.functional.cosine_similarity(result.attempt - inputs, -analytic_gradient(head, inputs, targets))
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    assert torch.equal(result.target, targets)


def test_result_follows_the_attack_convention_and_keeps_every_step() -> None:
    head, (inputs, labels) = linear_head(), batch(64)
    result = FastGradient(epsilon=0.05)(head, inputs, labels, bounds=(0.0, 1.0))
    assert isinstance(result, AttackResult)
    assert 0 < int(result.success.sum()) < len(result)  # a step this size fools some rows, not all
    with torch.no_grad():
        reached = head(result.attempt).argmax(1)
    assert torch.equal(result.success, reached != labels)  # checked by a fresh forward pass
    fooled = result.success
    assert torch.equal(result.adversarial[fooled], result.attempt[fooled])
    assert torch.equal(result.adversarial[~fooled], inputs[~fooled])
    assert torch.equal(result.target[fooled], reached[fooled])
    with torch.no_grad():
        runner_up = head(inputs).scatter(1, labels[:, None], float("-inf")).argmax(1)
    assert torch.equal(result.target[~fooled], runner_up[~fooled])
    assert bool(torch.isinf(result.distortion[~fooled]).all())
    measured = (result.adversarial - inputs)[fooled].pow(2).mean(1).sqrt()
    torch.testing.assert_close(result.distortion[fooled], measured)
    assert bool((result.distortion[fooled] <= 0.05 + 1e-6).all())
    assert bool(((result.attempt >= 0) & (result.attempt <= 1)).all())  # clipped to the box
    assert torch.equal(result.to("cpu").attempt, result.attempt)
    torch.testing.assert_close(result.linf[fooled], (result.adversarial - inputs)[fooled].abs().amax(1))


def test_clipping_at_the_box_edge_shortens_the_step() -> None:
    head = linear_head()
    inputs = torch.ones(8, 6)  # on the upper face: every outward component is cut off
    with torch.no_grad():
        labels = head(inputs).argmax(1)
    result = FastGradient(epsilon=0.2)(head, inputs, labels, bounds=(0.0, 1.0))
    rms = (result.attempt - inputs).pow(2).mean(1).sqrt()
    assert bool((rms < 0.2).all()) and bool((result.attempt <= 1).all())


def test_parameters_and_their_gradients_are_left_as_they_were() -> None:
    head, (inputs, labels) = linear_head(), batch()
    head.weight.grad = torch.full_like(head.weight, 3.0)
    FastGradient()(head, inputs, labels)
    assert torch.equal(head.weight.grad, torch.full_like(head.weight, 3.0))
    assert head.weight.requires_grad and head.bias.grad is None


@pytest.mark.parametrize(
    ("call", "message"),
    [(lambda attack, x, y: attack(linear_head(), x, y, target="nearest"), r"FastGradient cannot serve target='nearest'"),
     (lambda attack, x, y: attack(linear_head(), x.masked_fill(x > 0.5, math.nan), y), "non-finite"),
     (lambda attack, x, y: attack(linear_head(), x, y + 4), "labels"),
     (lambda attack, x, y: attack(linear_head(), x + 1.0, y), "outside the box")],
    ids=["nearest", "nan", "labels", "box"],
)
def test_bad_input_is_refused_with_a_clear_error(call, message: str) -> None:
    inputs, labels = batch()
    with pytest.raises(ValueError, match=message):
        call(FastGradient(), inputs, labels)


@pytest.mark.parametrize("distortion", [0.0, -1.0, math.inf, math.nan])
def test_step_size_must_be_positive_and_finite(distortion: float) -> None:
    with pytest.raises(ValueError, match="epsilon must be positive and finite"):
        FastGradient(epsilon=distortion)
