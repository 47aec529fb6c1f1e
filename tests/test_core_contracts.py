"""Contracts of the core modules that the mutation run (docs/mutation-testing.md) found untested:
what the attack base verifies and reports, batch norm with pool rows in every mode, boxes, budgets,
pooling defaults and pools of another precision."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advtrain.attacks import Attack, BoxLBFGS, Proposal
from advtrain.batch_statistics import SeparateBatchStatistics
from advtrain.box import check_bounds, describe_bounds
from advtrain.budget import perturbation_size
from advtrain.pool import AdversarialPool
from advtrain.pooling import EveryStep, Successes, WithinBudget


class Scripted(Attack):
    """An attack that proposes given points: the base's verification is all that decides."""

    def __init__(self, points: torch.Tensor, *, c: torch.Tensor | None = None, iterations: torch.Tensor | None = None,
                 target: str = "untargeted") -> None:
        super().__init__(target=target)
        self._points, self._c, self._iterations = points, c, iterations

    def propose(self, model, batch, targets, policy, generator) -> Proposal:
        found = torch.ones(len(batch.labels), dtype=torch.bool)
        return Proposal(self._points, found, c=self._c, iterations=self._iterations)


def identity_classifier() -> nn.Linear:
    """Logits equal to the inputs: the class is the largest input value."""
    model = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    return model


INPUTS = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1], [0.7, 0.0, 0.2]])  # all class 0
LABELS = torch.zeros(3, dtype=torch.long)


def test_success_needs_every_value_of_its_own_row_inside_the_box() -> None:
    points = torch.tensor([[0.1, 0.9, 0.0], [0.1, 1.5, 0.1], [0.1, 0.0, 0.9]])  # row 1 leaves the box (1.5 > 1)
    result = Scripted(points)(identity_classifier(), INPUTS, LABELS)
    assert result.success.tolist() == [True, False, True]
    assert torch.equal(result.adversarial[1], INPUTS[1])  # a failure keeps the clean input
    assert math.isinf(float(result.distortion[1])) and math.isfinite(float(result.distortion[0]))


def test_a_targeted_success_must_reach_the_target_not_just_leave_the_label() -> None:
    points = torch.tensor([[0.1, 0.9, 0.0], [0.1, 0.0, 0.9], [0.1, 0.9, 0.0]])
    result = Scripted(points)(identity_classifier(), INPUTS, LABELS, target=torch.tensor([1, 1, 2]))
    assert result.success.tolist() == [True, False, False]  # rows 1 and 2 reached another wrong class
    assert result.target.tolist() == [1, 1, 2]


def test_the_result_reports_c_iterations_and_attempt_as_the_attack_gave_them() -> None:
    points = torch.tensor([[0.1, 0.9, 0.0], [0.9, 0.0, 0.0], [0.1, 0.0, 0.9]])
    plain = Scripted(points)(identity_classifier(), INPUTS, LABELS)
    assert plain.c.dtype == INPUTS.dtype and bool(plain.c.isnan().all())
    assert torch.equal(plain.iterations, torch.zeros(3, dtype=torch.long))
    assert plain.attempt is None  # a search's failures carry no attempt
    given = Scripted(points, c=torch.tensor([0.5, 0.25, 2.0]), iterations=torch.tensor([3, 4, 5]))(
        identity_classifier(), INPUTS, LABELS)
    assert given.c[0] == 0.5 and math.isnan(float(given.c[1])) and given.c[2] == 2.0  # c only where it succeeded
    assert given.iterations.tolist() == [3, 4, 5]


class Records(Attack):
    """Records the policy each call hands to ``propose``; keeps the base's default target."""

    policies = ("untargeted", "random", "runner_up", "least_likely", "nearest")

    def propose(self, model, batch, targets, policy, generator) -> Proposal:
        self.seen = policy
        return Proposal(batch.inputs.clone(), torch.zeros(len(batch.labels), dtype=torch.bool))


def test_the_default_target_is_untargeted_and_propose_gets_the_call_s_policy() -> None:
    attack = Records()
    assert attack.target == "untargeted"
    for policy in ("nearest", "untargeted", "runner_up"):
        attack(identity_classifier(), INPUTS, LABELS, target=policy)
        assert attack.seen == policy
    attack(identity_classifier(), INPUTS, LABELS)
    assert attack.seen == "untargeted"


def test_repr_shows_settings_and_hides_private_state() -> None:
    attack = Scripted(torch.zeros(3, 3))
    assert repr(attack) == "Scripted(target='untargeted')"
    assert repr(BoxLBFGS(search_steps=2)).startswith("BoxLBFGS(target='untargeted', loss='margin', backend='torch', search_steps=2")


# ---- batch norm with pool rows ----

def _batch(rows: int = 10) -> torch.Tensor:
    return torch.randn(rows, 4, 3, 3, generator=torch.Generator().manual_seed(0)) * 2 + 1


def test_unarmed_batch_norm_is_plain_batch_norm_before_and_after_use() -> None:
    x = _batch()
    norm, reference = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    separate = SeparateBatchStatistics(norm)
    torch.testing.assert_close(norm(x), reference(x))  # never armed: every row on the batch's statistics
    separate.arm(3)
    norm(x)
    separate.disarm()
    reference(x[:7])  # the armed pass updated the running statistics from the clean rows only
    torch.testing.assert_close(norm(x), reference(x))  # disarmed again
    torch.testing.assert_close(norm.running_mean, reference.running_mean)
    separate.remove()
    separate.remove()  # removing twice is harmless


def test_an_armed_batch_norm_in_eval_mode_uses_its_running_statistics_for_every_row() -> None:
    x = _batch()
    norm = nn.BatchNorm2d(4)
    norm.running_mean.fill_(0.5)
    norm.running_var.fill_(2.0)
    norm.eval()
    separate = SeparateBatchStatistics(norm)
    separate.arm(3)
    torch.testing.assert_close(norm(x), nn.functional.batch_norm(x, norm.running_mean, norm.running_var, norm.weight,
                                                                 norm.bias, False))
    separate.remove()


def test_batch_norm_without_running_statistics_normalises_pool_rows_with_the_batch_s_own() -> None:
    x = _batch()
    norm = nn.BatchNorm2d(4, track_running_stats=False)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    separate = SeparateBatchStatistics(norm)
    separate.arm(3)
    output = norm(x)
    clean = x[:7]
    mean, var = clean.mean((0, 2, 3)), clean.var((0, 2, 3), unbiased=False)
    expected = (x[7:] - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + norm.eps).sqrt()
    torch.testing.assert_close(output[:7], nn.functional.batch_norm(clean, None, None, norm.weight, norm.bias, True))
    torch.testing.assert_close(output[7:], expected * norm.weight.view(1, -1, 1, 1) + norm.bias.view(1, -1, 1, 1))
    separate.arm(10)  # every row a pool row and no running statistics: the rows' own
    torch.testing.assert_close(norm(x), nn.functional.batch_norm(x, None, None, norm.weight, norm.bias, True))
    separate.remove()


def test_pool_rows_beside_a_constant_channel_get_eps_in_the_variance() -> None:
    x = _batch()
    x[:, 0] = 3.0  # channel 0 constant: its variance is 0, and only eps keeps the division finite
    norm = nn.BatchNorm2d(4)
    separate = SeparateBatchStatistics(norm)
    separate.arm(3)
    output = norm(x)
    separate.remove()
    assert torch.isfinite(output).all()
    # (3 - 3) / sqrt(0 + eps), up to the rounding of the mean that batch norm's kernel gives the clean rows too
    torch.testing.assert_close(output[7:, 0], torch.zeros_like(output[7:, 0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(output[7:, 0], output[:3, 0])  # pool rows normalised as the same clean values are
    x[7:, 0] = 3.0 + 1e-3  # a pool row just off the clean rows' constant: scaled by 1 / sqrt(eps)
    separate = SeparateBatchStatistics(norm)
    separate.arm(3)
    output = norm(x)
    separate.remove()
    torch.testing.assert_close(output[7:, 0], torch.full_like(output[7:, 0], 1e-3 / math.sqrt(norm.eps)), rtol=1e-3, atol=0)


# ---- boxes, budgets, pooling ----

@pytest.mark.parametrize(("bounds", "message"), [
    (1.0, r"bounds must be a pair \(lower, upper\) of numbers or tensors, got 1.0"),
    ((0.0, 1.0, 2.0), r"bounds must be a pair"),
    (("a", 1.0), r"bounds must be a pair \(lower, upper\) of numbers or tensors, got \('a', 1.0\)"),
    ((math.nan, 1.0), r"bounds hold NaN: \(nan, 1\)"),
    ((0.0, math.nan), r"bounds hold NaN: \(0, nan\)"),
    ((torch.zeros(3), torch.ones(4)), r"the lower and upper bounds of bounds do not broadcast together"),
    ((2.0, 2.0), r"bounds \(2, 2\) leave no room: lower equals upper everywhere, so no perturbation can move; widen "
                 r"the box$"),
    ((torch.zeros(3), torch.zeros(3)), r"bounds \(per-unit tensor, per-unit tensor\) leave no room"),
], ids=["scalar", "triple", "text", "nan-low", "nan-high", "shapes", "point", "per-unit-point"])
def test_malformed_boxes_are_named(bounds, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_bounds(bounds)


def test_boxes_with_room_pass_as_given() -> None:
    for box in [(0.0, 1.0), (0.5, 0.5 + 1e-9), (-math.inf, math.inf), (torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])), [0, 1]]:
        assert check_bounds(box) == (box[0], box[1])
    assert describe_bounds((torch.tensor(0.25), torch.ones(2, 2))) == "(0.25, per-unit tensor)"


def test_sizes_of_single_values_and_empty_rows() -> None:
    assert float(perturbation_size(torch.tensor([[-2.0]]), "rms")) == 2.0
    assert torch.equal(perturbation_size(torch.zeros(3, 0), "linf"), torch.zeros(3))


def test_pooling_defaults_and_reprs() -> None:
    assert (repr(Successes()), repr(EveryStep())) == ("Successes()", "EveryStep()")
    inputs = torch.full((2, 4), 0.5)
    adversarial = inputs + torch.tensor([[0.0625, 0.0, 0.0, 0.0], [0.25, 0.0, 0.0, 0.0]])
    from tests.test_budget import _result

    examples, keep = WithinBudget(0.125, norm="linf")(inputs, _result(inputs, adversarial), (0.0, 1.0))
    assert torch.equal(examples, adversarial) and keep.tolist() == [True, False]  # no stretch by default


def test_every_step_refuses_anything_not_marked_fixed_budget() -> None:
    class Plain:
        pass

    for attack in (Plain(), BoxLBFGS()):
        with pytest.raises(ValueError, match=r"EveryStep pools the rows a fixed-budget attack moved; .* is a search whose "
                                             r"failures carry no perturbation: use FastGradient or PGD, or pool Successes\(\)"):
            EveryStep().check(attack)


# ---- pools ----

def test_a_pool_keeps_the_precision_it_is_given_through_a_checkpoint() -> None:
    pool = AdversarialPool(4)
    examples = torch.rand(3, 2, dtype=torch.float64) + 1e-12  # values float32 would round
    pool.add(examples, torch.tensor([0, 1, 2]))
    assert pool.examples.dtype == torch.float64 and torch.equal(pool.examples[:3], examples)
    restored = AdversarialPool(4)
    restored.load_state_dict(pool.state_dict())
    assert restored.examples.dtype == torch.float64 and torch.equal(restored.examples[:3], examples)
    assert torch.equal(restored.labels[:3], torch.tensor([0, 1, 2]))


def test_a_pool_emptied_by_a_checkpoint_refuses_to_sample() -> None:
    pool = AdversarialPool(4)
    state = pool.state_dict()
    state["examples"] = torch.zeros(0, 2)  # a saved pool with room allocated but nothing in it
    pool.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"^the pool is empty; add examples before sampling$"):
        pool.sample(1)


def test_a_pool_s_draws_come_from_its_own_seeded_generator() -> None:
    draws = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # the global generator must not matter
        pool = AdversarialPool(8)
        pool.add(torch.arange(5.0)[:, None], torch.arange(5))
        draws.append(pool.sample(12)[1])  # more than it holds: drawn with replacement
    assert torch.equal(draws[0], draws[1])
    other = AdversarialPool(8, seed=1)
    other.add(torch.arange(5.0)[:, None], torch.arange(5))
    assert not torch.equal(other.sample(12)[1], draws[0])  # the default seed is 0, not any seed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_rows_of_a_batch_norm_without_affine_weights_in_any_precision(dtype) -> None:
    x = _batch().to(dtype)
    norm = nn.BatchNorm2d(4, affine=False).to(dtype)
    separate = SeparateBatchStatistics(norm)
    separate.arm(3)
    output = norm(x)
    separate.remove()
    assert output.dtype == dtype
    clean = x[:7].float()
    mean, var = clean.mean((0, 2, 3)), clean.var((0, 2, 3), unbiased=False)
    expected = (x[7:].float() - mean.view(1, -1, 1, 1)) / (var.view(1, -1, 1, 1) + norm.eps).sqrt()
    torch.testing.assert_close(output[7:].float(), expected.to(dtype).float())
