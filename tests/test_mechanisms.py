"""Tests written against planted bugs: each one fails when its mechanism breaks in the plausible way
named in its docstring (checked by planting the bug), and passes on correct code."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from advtrain.attacks import BoxLBFGS, FastGradient
from advtrain.attacks.box_lbfgs import REFINE_MARGIN
from advtrain.callbacks import LayerwiseAdversarialTraining
from advtrain.pool import AdversarialPool
from advtrain.pooling import EveryStep
from tests.test_attacks import exact_minimum_l2, linear_head
from tests.test_layerwise_callback import RecordGradients, pretrained_classifier, tiny_loader, trainer_for


class NeverRefresh(LayerwiseAdversarialTraining):
    """Pools that keep exactly what a test put in them."""

    def should_refresh(self, layer: str) -> bool:
        return False


def test_mixed_rows_carry_the_pool_labels_not_the_clean_rows(tmp_path: Path) -> None:
    """Bug: the line that gives the mixed rows their pool labels is dropped (they keep the clean
    row's label)."""
    original_labels = tiny_loader().dataset.tensors[1][:16]
    pool_label = int((original_labels[12:] + 1).remainder(3)[0])  # a label row 12 does not have
    callback = NeverRefresh(["input"], module="model", mix_fraction=0.25, capacity=8)
    examples = torch.rand(8, 8, generator=torch.Generator().manual_seed(3))
    callback.pools["input"].add(examples, torch.full((8,), pool_label))
    recorder = RecordGradients()
    trainer_for(tmp_path, [callback, recorder], max_steps=1).fit(pretrained_classifier(), tiny_loader())
    assert torch.equal(recorder.labels[:12], original_labels[:12])
    assert (recorder.labels[12:] == pool_label).all(), recorder.labels
    for row in recorder.inputs[12:]:  # and the rows are pool examples
        assert any(torch.equal(row, example) for example in examples)


def test_the_search_reaches_each_examples_optimum_within_one_percent() -> None:
    """Checked per example against the closed-form optimum (not a mean with slack): a search that stops
    short of convergence, or a final bisection that stops short, is caught."""
    head = linear_head(classes=2).double()
    inputs = torch.rand(32, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.5 + 0.25
    labels = head(inputs).argmax(1).detach()
    exact = exact_minimum_l2(head, inputs, 1 - labels)
    result = BoxLBFGS()(head, inputs, labels, target=1 - labels, bounds=(-math.inf, math.inf))
    assert result.success.all()
    ratio = result.l2 / exact
    assert (ratio >= 1 - 1e-9).all() and (ratio <= 1.01).all(), ratio


class RecordsSuccesses(nn.Module):
    """A tanh network on the first ``features`` values of each row; the last value is the example's
    id, held fixed by the box, so that every point the search evaluates can be traced to its example.
    Records, per example, the smallest L2 distance of an evaluated point that reaches its target by
    ``REFINE_MARGIN``: a success the search found."""

    def __init__(self, origin: torch.Tensor, targets: torch.Tensor, features: int = 10) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))
        self.origin, self.targets, self.features = origin, targets, features
        self.smallest = torch.full((origin.shape[0],), math.inf)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x[:, : self.features])
        with torch.no_grad():
            ids = x[:, self.features].round().long()
            lead = logits.gather(1, self.targets[ids, None])[:, 0] - logits.scatter(1, self.targets[ids, None], -math.inf).amax(1)
            l2 = (x - self.origin[ids]).norm(dim=1)
            success = lead >= REFINE_MARGIN
            self.smallest.scatter_reduce_(0, ids[success], l2[success], reduce="amin")
        return logits


def test_the_search_keeps_each_examples_smallest_success() -> None:
    """Bug: the search keeps the latest success instead of the smallest. Every point the search
    evaluates is recorded; each example's result must be no larger than the smallest success seen
    for it. Without the final bisection (``refine_steps=0``), which would pull any kept success back
    towards the clean input and hide which one was kept: points that lead by less than the margin
    loss's confidence are successes the search moves on from, outwards, so the latest is larger."""
    count, features = 24, 10
    generator = torch.Generator().manual_seed(6)
    inputs = torch.cat([torch.rand(count, features, generator=generator), torch.arange(count).float()[:, None]], dim=1)
    lower = torch.cat([torch.zeros(count, features), inputs[:, features:]], dim=1)
    upper = torch.cat([torch.ones(count, features), inputs[:, features:]], dim=1)  # the id cannot move
    targets = torch.randint(0, 4, (count,), generator=generator)
    head = RecordsSuccesses(inputs, targets)
    labels = head(inputs).argmax(1).detach()
    targets = torch.where(targets == labels, (labels + 1) % 4, targets)
    head.targets = targets
    head.smallest.fill_(math.inf)
    result = BoxLBFGS(search_steps=4, iterations=15, refine_steps=0)(head, inputs, labels, target=targets, bounds=(lower, upper))
    seen = head.smallest
    assert result.success.sum() >= count // 2
    assert torch.equal(torch.isfinite(seen), result.success)
    excess = result.l2[result.success] - seen[result.success]
    assert (excess <= 1e-6).all(), f"{int((excess > 1e-6).sum())} examples kept a larger success than one found"


class CountsForwards(nn.Module):
    """A model whose buffer changes in every forward pass, eval mode included."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(6, 3)
        self.register_buffer("forwards", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.linear(x)


def test_the_attack_base_puts_back_buffers_that_an_eval_forward_changed() -> None:
    """Bug: the attack base does not restore buffers (batch norm's do not change in eval mode, so no
    other test exercises the restore)."""
    model = CountsForwards()
    model.forwards.fill_(7)
    for attack in (BoxLBFGS(search_steps=2, iterations=5), FastGradient(epsilon=0.1)):
        attack(model, torch.rand(4, 6), torch.tensor([0, 1, 2, 0]))
        assert int(model.forwards) == 7, type(attack).__name__


def test_a_full_pool_replaces_random_slots_all_over_it() -> None:
    """Bug: a full pool always overwrites its first slots (the existing test only catches "always
    slot 0")."""
    pool = AdversarialPool(10, seed=0)
    pool.add(torch.zeros(10, 2), torch.arange(10))
    touched = torch.zeros(10, dtype=torch.long)
    for round_ in range(1, 61):
        before = pool.examples.clone()
        assert pool.add(torch.full((3, 2), float(round_)), torch.zeros(3, dtype=torch.long)) == 3
        changed = (pool.examples != before).any(1)
        assert int(changed.sum()) == 3  # three distinct slots each time
        touched += changed.long()
    assert (touched > 0).all(), touched  # 180 replacements reach every slot...
    assert touched.max() < 40  # ...none of them far more often than the uniform 18


def test_pool_error_is_the_share_of_the_pool_the_model_gets_wrong(tmp_path: Path) -> None:
    """Bug: ``pool_error`` computed with the wrong comparison (the tests checked only that it was
    logged). With learning rate 0 the model after fit is the model of the last refresh."""
    classifier = pretrained_classifier()
    classifier.hparams["lr"] = 0.0
    callback = LayerwiseAdversarialTraining(["input"], module="model", refresh_every=1, refresh_size=32, capacity=64,
                                            attack=FastGradient(epsilon=0.2), pooling=EveryStep())
    trainer_for(tmp_path, [callback], max_steps=3).fit(classifier, tiny_loader())
    pool = callback.pools["input"]
    assert 0 < len(pool) <= 256  # the statistic samples min(256, size) entries: all of them here
    with torch.no_grad():
        wrong = (classifier.model(pool.examples[: len(pool)]).argmax(1) != pool.labels[: len(pool)]).float().mean()
    assert 0.0 < float(wrong) < 1.0  # a share that tells a flipped comparison apart
    assert math.isclose(callback.stats["input"]["pool_error"], float(wrong), abs_tol=1e-6)



def test_the_final_bisection_projects_its_points_onto_the_box() -> None:
    """Bug: the final bisection skips the projection onto the box. Where no shorter step keeps the
    target, the bisection returns ``x + 1·(best − x)``, which rounds past a bound that ``best``
    touches when ``x`` and the bound differ in magnitude (float32: 31.26 + (0.99 − 31.26) < 0.99).
    The public search reaches that case only by chance in a small test, so ``_refine`` is driven
    directly, with a target no shorter step keeps."""
    generator = torch.Generator().manual_seed(0)
    count = 4096
    origin = torch.rand(count, 1, generator=generator) * 100 + 1  # (N, 1): one value a row, far above its bound
    lower = torch.rand(count, 1, generator=generator)  # per-unit lower bounds in [0, 1)
    upper = torch.full_like(lower, math.inf)
    best = lower.clone()  # each row's success lies on its lower bound
    assert bool((origin + (best - origin) < lower).any())  # the rounding this test is about happens here
    never_shorter = lambda logits, targets: torch.zeros(len(targets), dtype=torch.bool)  # noqa: E731
    refined = BoxLBFGS()._refine(lambda x: x, origin, best, torch.zeros(count, dtype=torch.long),
                                 torch.ones(count, dtype=torch.bool), origin.shape, never_shorter, lower, upper)
    assert bool((refined >= lower).all()), f"{int((refined < lower).sum())} rows left the box"
    assert torch.allclose(refined, best, rtol=0, atol=1e-5)  # one rounding step of values near 100
