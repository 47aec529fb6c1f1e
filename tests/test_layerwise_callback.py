"""LayerwiseAdversarialTraining: gradients stop at the layer, pools resume, misconfiguration fails early."""

from __future__ import annotations

import math
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from advtrain.callbacks import LayerwiseAdversarialTraining
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from advtrain import Classifier
from advtrain.attacks import BoxLBFGS, FastGradient
from advtrain.pooling import EveryStep, Successes, WithinBudget
from tests.mutation_aliases import under_mutmut


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(
        fc1=nn.Linear(8, 12), act1=nn.Sigmoid(), fc2=nn.Linear(12, 12), act2=nn.Sigmoid(), out=nn.Linear(12, 3)))


def tiny_loader(batch_size: int = 16, count: int = 48) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.rand(count, 8, generator=generator)
    labels = (inputs[:, :3] * torch.tensor([1.0, 1.1, 1.2])).argmax(1)
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=False)


def pretrained_classifier() -> Classifier:
    """A tiny classifier trained a little, so attacks have correct examples to work on."""
    classifier = Classifier(tiny_mlp(), num_classes=3, lr=0.5, schedule="constant")
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.5)
    inputs, labels = tiny_loader(count=48).dataset.tensors
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(classifier(inputs), labels).backward()
        optimizer.step()
    return classifier


def trainer_for(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:
    settings = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path, deterministic=True)
    settings.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **settings)


class RecordGradients(pl.Callback):
    """Keeps the batch as the model sees it, the weights before the step and the gradients."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs, self.labels = batch[0].clone(), batch[1].clone()
        self.weights = {name: p.detach().clone() for name, p in pl_module.named_parameters()}

    def on_after_backward(self, trainer, pl_module):
        self.grads = {name: None if p.grad is None else p.grad.clone() for name, p in pl_module.named_parameters()}


def test_pool_rows_train_only_the_layers_above(tmp_path: Path) -> None:
    classifier = pretrained_classifier()
    callback = LayerwiseAdversarialTraining(["act1"], module="model", mix_fraction=0.5, refresh_size=8, capacity=64)
    recorder = RecordGradients()
    trainer_for(tmp_path, [callback, recorder], max_steps=1).fit(classifier, tiny_loader())
    assert len(callback.pools["act1"]) > 0
    mixed = 8  # half of a batch of 16
    # Expected fc1 gradient: only the clean rows reach it (the loss is a mean over all 16 rows).
    model = tiny_mlp()
    model.load_state_dict({name.removeprefix("model."): w for name, w in recorder.weights.items()})
    clean_loss = nn.functional.cross_entropy(model(recorder.inputs[:-mixed]), recorder.labels[:-mixed], reduction="sum") / 16
    clean_loss.backward()
    torch.testing.assert_close(recorder.grads["model.fc1.weight"], model.fc1.weight.grad)
    # The layers above do get gradient from the pool rows: more than from the clean rows alone.
    assert not torch.allclose(recorder.grads["model.fc2.weight"], model.fc2.weight.grad)


def test_with_every_row_from_the_pool_nothing_below_gets_gradient(tmp_path: Path) -> None:
    classifier = pretrained_classifier()
    callback = LayerwiseAdversarialTraining(["act1"], module="model", mix_fraction=1.0, refresh_size=16, capacity=64)
    recorder = RecordGradients()
    trainer_for(tmp_path, [callback, recorder], max_steps=1).fit(classifier, tiny_loader())
    below = recorder.grads["model.fc1.weight"]
    assert below is None or torch.count_nonzero(below) == 0
    assert torch.count_nonzero(recorder.grads["model.fc2.weight"]) > 0


def test_input_pool_replaces_images_and_labels(tmp_path: Path) -> None:
    classifier = pretrained_classifier()
    callback = LayerwiseAdversarialTraining(["input"], module="model", mix_fraction=0.25, refresh_size=12, capacity=64)
    recorder = RecordGradients()
    trainer_for(tmp_path, [callback, recorder], max_steps=1).fit(classifier, tiny_loader())
    original = tiny_loader().dataset.tensors[0][:16]
    assert torch.equal(recorder.inputs[:12], original[:12]) and not torch.equal(recorder.inputs[12:], original[12:])
    pool = callback.pools["input"]
    assert ((pool.examples[: len(pool)] >= 0) & (pool.examples[: len(pool)] <= 1)).all()


def test_generation_restores_the_mode_and_logs_per_layer(tmp_path: Path) -> None:
    classifier = pretrained_classifier()
    callback = LayerwiseAdversarialTraining(["input", "act2"], module="model", refresh_size=8, capacity=64)
    modes = []

    class Mode(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(pl_module.training)

    trainer = trainer_for(tmp_path, [callback, Mode()], max_steps=2)
    trainer.fit(classifier, tiny_loader())
    assert modes == [True, True]
    for layer in ("input", "act2"):
        for name in ("pool_size", "pool_error", "generation_success", "generation_seconds"):
            assert f"adv/{layer}/{name}" in trainer.logged_metrics
    assert 0.0 <= float(trainer.logged_metrics["adv/act2/generation_success"]) <= 1.0


class RecordingAttack(BoxLBFGS):
    """The generation search, keeping its inputs, each input's best wrong class, its result and
    the labels it reached."""

    def __call__(self, head, inputs, labels, **settings):
        self.inputs = inputs.clone()
        with torch.no_grad():
            logits = head(inputs)
        self.runner_up = logits.scatter(1, labels[:, None], float("-inf")).argmax(1)
        self.result = super().__call__(head, inputs, labels, **settings)
        with torch.no_grad():
            self.reached = head(self.result.adversarial).argmax(1)
        self.success = self.result.success
        return self.result


def test_runner_up_target_pushes_each_example_to_its_best_wrong_class(tmp_path: Path) -> None:
    classifier = pretrained_classifier()
    attack = RecordingAttack(loss="margin", search_steps=2, iterations=10, target="runner_up")
    callback = LayerwiseAdversarialTraining(["act2"], module="model", refresh_size=16, capacity=64, attack=attack)
    trainer_for(tmp_path, [callback], max_steps=1).fit(classifier, tiny_loader())
    assert attack.success.sum() > 0
    reached, expected = attack.reached[attack.success], attack.runner_up[attack.success]
    assert torch.equal(reached, expected)


def _first_refresh(tmp_path: Path, max_distortion: float | None, beyond: str = "drop",
                   stretch: bool = False) -> tuple[LayerwiseAdversarialTraining, RecordingAttack]:
    attack = RecordingAttack(loss="margin", search_steps=2, iterations=10, target="random")
    pooling = Successes() if max_distortion is None else WithinBudget(max_distortion, beyond=beyond, stretch=stretch)
    callback = LayerwiseAdversarialTraining(["input"], module="model", refresh_size=16, capacity=64, attack=attack,
                                            pooling=pooling)
    trainer_for(tmp_path, [callback], max_steps=1).fit(pretrained_classifier(), tiny_loader())
    return callback, attack


def test_max_distortion_keeps_only_the_examples_within_it(tmp_path: Path) -> None:
    unlimited, attack = _first_refresh(tmp_path, None)
    distortions = attack.result.distortion[attack.result.success]
    assert len(unlimited.pools["input"]) == len(distortions) >= 4
    limit = float(distortions.median())
    limited, attack = _first_refresh(tmp_path, limit)
    assert torch.equal(attack.result.distortion, unlimited.attack.result.distortion)  # the same search
    pool = limited.pools["input"]
    assert 0 < len(pool) == int((distortions <= limit).sum()) < len(distortions)
    pooled = pool.examples[:len(pool)].flatten(1)
    nearest = torch.cdist(pooled, attack.inputs.flatten(1)).min(1).values / pooled.shape[1] ** 0.5
    assert bool((nearest <= limit + 1e-6).all())


def test_max_distortion_can_shrink_the_examples_beyond_it_instead(tmp_path: Path) -> None:
    unlimited, _ = _first_refresh(tmp_path, None)
    limit = float(unlimited.attack.result.distortion[unlimited.attack.result.success].median())
    shrunk, attack = _first_refresh(tmp_path, limit, beyond="project")
    result = attack.result
    inputs, adversarial = attack.inputs[result.success], result.adversarial[result.success]
    pool = shrunk.pools["input"]
    assert len(pool) == int(result.success.sum()) >= 4  # every success kept, in order
    pooled = pool.examples[:len(pool)].view_as(adversarial)
    within = result.distortion[result.success] <= limit
    assert 0 < int(within.sum()) < len(within)
    assert torch.equal(pooled[within], adversarial[within])  # those within the limit untouched
    beyond_r, search_r = (pooled - inputs)[~within].flatten(1), (adversarial - inputs)[~within].flatten(1)
    rms = beyond_r.pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, limit))  # the rest exactly at the limit...
    cosine = torch.nn.functional.cosine_similarity(beyond_r, search_r)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))  # ...along the search's own direction
    assert bool(((pooled >= 0) & (pooled <= 1)).all())


@pytest.mark.parametrize("beyond", ["drop", "project"])
def test_examples_within_max_distortion_can_be_stretched_to_it(tmp_path: Path, beyond: str) -> None:
    unlimited, _ = _first_refresh(tmp_path, None)
    limit = float(unlimited.attack.result.distortion[unlimited.attack.result.success].median())
    stretched, attack = _first_refresh(tmp_path, limit, beyond=beyond, stretch=True)
    result = attack.result
    inputs, adversarial = attack.inputs[result.success], result.adversarial[result.success]
    distortion = result.distortion[result.success]
    within = distortion <= limit
    assert 0 < int(within.sum()) < len(within)
    pool = stretched.pools["input"]
    assert len(pool) == (int(within.sum()) if beyond == "drop" else len(within))  # kept in order
    pooled = pool.examples[:len(pool)].view(len(pool), *inputs.shape[1:])
    pooled_rows = within if beyond == "drop" else torch.ones_like(within)
    origins, searched, found = inputs[pooled_rows], adversarial[pooled_rows], distortion[pooled_rows]
    assert bool(((pooled >= 0) & (pooled <= 1)).all())  # clipped back into the box
    expected = (origins + (limit / found)[:, None] * (searched - origins)).clamp(0, 1)
    torch.testing.assert_close(pooled, expected)  # along the search's direction, out to the limit
    rms = (pooled - origins).flatten(1).pow(2).mean(1).sqrt()
    stretched_rows = found < limit
    assert bool((rms[stretched_rows] > found[stretched_rows]).all())  # farther than the search went...
    assert bool((rms <= limit + 1e-6).all())  # ...but never beyond the budget


class RecordingFastGradient(FastGradient):
    """The fast-gradient step, keeping its inputs and its result."""

    def __call__(self, head, inputs, labels, **settings):
        self.inputs = inputs.clone()
        self.result = super().__call__(head, inputs, labels, **settings)
        return self.result


@pytest.mark.parametrize("pool_failures", [False, True])
def test_fast_gradient_pools_its_fooled_rows_or_every_step(tmp_path: Path, pool_failures: bool) -> None:
    attack = RecordingFastGradient(epsilon=0.05)
    callback = LayerwiseAdversarialTraining(["input"], module="model", refresh_size=16, capacity=64, attack=attack,
                                            pooling=EveryStep() if pool_failures else Successes())
    trainer_for(tmp_path, [callback], max_steps=1).fit(pretrained_classifier(), tiny_loader())
    result, pool = attack.result, callback.pools["input"]
    assert 0 < int(result.success.sum()) < len(result)  # some rows fooled, some not
    expected = result.attempt if pool_failures else result.attempt[result.success]
    assert len(pool) == len(expected)
    torch.testing.assert_close(pool.examples[:len(pool)].view_as(expected), expected)
    rms = (result.attempt - attack.inputs).pow(2).mean(1).sqrt()
    assert bool((rms <= 0.05 + 1e-6).all()) and bool((rms > 0.04).any())  # fixed-size steps, some clipped


class RecordingAttackInputs(FastGradient):
    """The fast-gradient step, keeping the rows of every call and what it proposed."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, head, inputs, labels, **settings):
        result = super().__call__(head, inputs, labels, **settings)
        self.calls.append((inputs.clone(), result.attempt.clone()))
        return result


class RecordBatches(pl.Callback):
    """Every batch as the model trains on it (after the pools callback mixed it)."""

    def __init__(self) -> None:
        self.trained: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.trained.append((batch[0].clone(), batch[1].clone()))


def _sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows[torch.argsort(rows.sum(1))]


def test_adversarial_training_is_a_pool_of_the_batch_own_examples_refreshed_every_step(tmp_path: Path) -> None:
    """PGD and fast adversarial training as an input pool: every step trains on exactly its own
    batch's attacked rows, misclassified rows included, each with its own label."""
    attack = RecordingAttackInputs(epsilon=0.1, norm="linf", random_start=True, step_size=0.125)
    callback = LayerwiseAdversarialTraining(["input"], module="model", mix_fraction=1.0, refresh_every=1, refresh_size=16,
                                            capacity=16, attack=attack, pooling=EveryStep(misclassified=True))
    recorder = RecordBatches()
    loader = tiny_loader()
    classifier = Classifier(tiny_mlp(), num_classes=3, lr=0.5, schedule="constant")  # untrained: many rows wrong
    first_inputs, first_labels = next(iter(loader))
    assert bool((classifier(first_inputs).argmax(1) != first_labels).any())
    trainer_for(tmp_path, [callback, recorder], max_steps=3).fit(classifier, loader)
    assert len(attack.calls) == 3
    for (clean, labels), (attacked, proposed), (trained, trained_labels) in zip(loader, attack.calls, recorder.trained):
        torch.testing.assert_close(attacked, clean)  # every row of this batch attacked, right or wrong
        order = torch.argsort(trained.sum(1))
        torch.testing.assert_close(trained[order], _sorted_rows(proposed))  # trained on exactly those examples
        for row, label in zip(trained, trained_labels):  # each example carries the label of its own clean row
            source = (proposed - row).abs().sum(1).argmin()
            assert int(label) == int(labels[source])


def _plain_adversarial_training(model: nn.Module, loader: DataLoader, epsilon: float, steps: int, step_size: float,
                                 lr: float, momentum: float) -> nn.Module:
    """Madry et al.'s loop written out with no advtrain code: each step trains on its batch's own L∞
    PGD examples only (here from x, no random start), SGD with Nesterov momentum."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True)
    for inputs, labels in loader:
        points = inputs.clone()
        for _ in range(steps):
            points = points.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(nn.functional.cross_entropy(model(points), labels), points)
            points = torch.minimum(torch.maximum(points.detach() + step_size * gradient.sign(), inputs - epsilon),
                                   inputs + epsilon).clamp(0, 1)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(points.detach()), labels).backward()
        optimizer.step()
    return model


@pytest.mark.parametrize("way", ["pgd", "fast"])
def test_pgd_and_fast_ways_train_the_weights_the_plain_loop_trains(tmp_path: Path, way: str) -> None:
    """``recipes/configs/pgd-mnist.yaml`` and ``fast-mnist.yaml`` as the callback runs them (mix
    share 1, refresh every step, every row kept): step for step the same weights as a plain
    PyTorch loop of PGD (fast: FGSM) adversarial training, random start aside."""
    from advtrain.attacks import PGD

    epsilon, lr = 0.3, 0.5
    attack, steps, step_size = (PGD(epsilon=epsilon, norm="linf", steps=5, step_size=0.1, random_start=False), 5, 0.1) \
        if way == "pgd" else (FastGradient(epsilon=epsilon, norm="linf", step_size=0.375, random_start=False), 1, 0.375)
    loader = tiny_loader(batch_size=16, count=64)
    callback = LayerwiseAdversarialTraining(["input"], module="model", mix_fraction=1.0, refresh_every=1, refresh_size=16,
                                            capacity=16, attack=attack, pooling=EveryStep(misclassified=True))
    classifier = Classifier(tiny_mlp(), num_classes=3, lr=lr, momentum=0.9, schedule="constant")
    trainer_for(tmp_path, [callback], max_epochs=1).fit(classifier, loader)
    plain = _plain_adversarial_training(tiny_mlp(), loader, epsilon, steps, step_size, lr, momentum=0.9)
    clean = tiny_mlp()
    moved = sum(float((a - b).detach().abs().max()) for a, b in zip(plain.parameters(), clean.parameters()))
    assert moved > 0.05  # the four steps changed the weights, so agreeing below is not trivial
    for (name, ours), theirs in zip(classifier.model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=lambda text, name=name: f"{name}: {text}")


class KeepEverything:
    """A user's own pooling policy, duck-typed: ``check`` and ``__call__``, no ``misclassified``."""

    def check(self, attack) -> None:
        pass

    def __call__(self, inputs, result, box):
        return result.adversarial, torch.ones(len(inputs), dtype=torch.bool)


@pytest.mark.parametrize("pooling", [EveryStep(), KeepEverything()], ids=["every-step", "duck-typed-policy"])
def test_by_default_only_correct_rows_are_attacked(tmp_path: Path, pooling) -> None:
    """Also for a user's policy without a ``misclassified`` attribute."""
    attack = RecordingAttackInputs(epsilon=0.1, norm="linf")
    callback = LayerwiseAdversarialTraining(["input"], module="model", mix_fraction=0.25, refresh_size=12, capacity=64,
                                            attack=attack, pooling=pooling)
    classifier = Classifier(tiny_mlp(), num_classes=3, lr=0.5, schedule="constant")
    clean, labels = next(iter(tiny_loader()))
    correct = clean[:12][classifier(clean[:12]).argmax(1) == labels[:12]]
    assert 0 < len(correct) < 12
    trainer_for(tmp_path, [callback], max_steps=1).fit(classifier, tiny_loader())
    torch.testing.assert_close(attack.calls[0][0], correct)
    assert len(callback.pools["input"]) == len(correct)


def test_refresh_statistics_add_up_and_say_zero_kept_when_nothing_was_attacked(tmp_path: Path) -> None:
    """seconds_generating is the sum of every refresh's own seconds, each within the fit's wall time;
    a refresh with no correct row attacks and keeps nothing."""
    import time

    callback = LayerwiseAdversarialTraining(["input"], module="model", mix_fraction=0.25, refresh_every=1, refresh_size=12,
                                            capacity=64, attack=FastGradient(epsilon=0.1, norm="linf"), pooling=EveryStep())
    seconds, distortions = [], []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seconds.append(callback.stats["input"]["generation_seconds"])
            distortions.append(callback.stats["input"]["generation_distortion"])

    started = time.perf_counter()
    trainer_for(tmp_path, [callback, Watch()], max_steps=3).fit(pretrained_classifier(), tiny_loader())
    wall = time.perf_counter() - started
    assert len(seconds) == 3 and all(0 < value < wall for value in seconds)
    assert callback.seconds_generating == pytest.approx(sum(seconds))
    # FGSM at L-inf 0.1 moves every pixel by 0.1 but where the box [0, 1] clips it: rms just below 0.1
    # (nan for a refresh whose attack fooled no row)
    found = [value for value in distortions if not math.isnan(value)]
    assert found and all(0.08 < value <= 0.1 + 1e-6 for value in found), distortions
    inputs = tiny_loader().dataset.tensors[0][:12]
    wrong = (callback._classifier(inputs).argmax(1) + 1) % 3  # every row misclassified
    callback.refresh("input", inputs, wrong)
    assert callback.stats["input"]["generation_attacked"] == 0 and callback.stats["input"]["generation_kept"] == 0
    assert math.isnan(callback.stats["input"]["generation_distortion"])
    assert math.isnan(callback.stats["input"]["generation_success"])


@pytest.mark.parametrize(("batch_size", "mix_fraction", "refresh_size"), [(16, 0.25, 20), (16, 0.5, 20), (4, 0.25, 5)],
                         ids=["12-clean-rows", "half-mixed", "fewer-rows-than-features"])
def test_a_refresh_attacks_the_newest_refresh_size_rows(tmp_path: Path, batch_size: int, mix_fraction: float,
                                                        refresh_size: int) -> None:
    """Each step keeps the rows the pool leaves clean (the first batch_size - mixed); a refresh at the
    second step attacks the newest refresh_size of the two steps' clean rows."""
    attack = RecordingAttackInputs(epsilon=0.1, norm="linf")
    callback = LayerwiseAdversarialTraining(["input"], module="model", mix_fraction=mix_fraction, refresh_every=1,
                                            refresh_size=refresh_size, capacity=64, attack=attack,
                                            pooling=EveryStep(misclassified=True))
    trainer_for(tmp_path, [callback], max_steps=2).fit(pretrained_classifier(), tiny_loader(batch_size))
    clean = batch_size - round(mix_fraction * batch_size)
    batches = [inputs[:clean] for inputs, _ in tiny_loader(batch_size)]
    torch.testing.assert_close(attack.calls[0][0], batches[0][-refresh_size:])
    torch.testing.assert_close(attack.calls[1][0], torch.cat([batches[0], batches[1]])[-refresh_size:])


def test_rows_to_mix_rounds_the_share_and_mixes_at_least_one_row() -> None:
    def rows(share: float, batch: int) -> int:
        return LayerwiseAdversarialTraining(["input"], mix_fraction=share).rows_to_mix(batch)

    assert [rows(0.02, 16), rows(0.05, 16), rows(0.05, 32), rows(0.05, 64), rows(0.25, 16), rows(1.0, 16)] == [1, 1, 2, 3, 4, 16]


class WarmUp(LayerwiseAdversarialTraining):
    """A warm-up, as the docs suggest: no pool before the second epoch."""

    def is_active(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch >= 1


def test_overriding_is_active_gives_a_warm_up(tmp_path: Path) -> None:
    callback = WarmUp(["input"], module="model", mix_fraction=0.25, refresh_size=16, capacity=64)
    epochs = []

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            epochs.append((len(callback.pools["input"]), callback.steps_taken["input"]))

    trainer_for(tmp_path, [callback, Watch()], max_epochs=2).fit(pretrained_classifier(), tiny_loader())
    assert epochs[0] == (0, 0) and epochs[1][0] > 0 and epochs[1][1] == 3  # three batches of 16 in the second epoch


def _run(tmp_path: Path, epochs: int, ckpt: str | None = None, save: str | None = None):
    torch.manual_seed(0)
    classifier = pretrained_classifier()
    callback = LayerwiseAdversarialTraining(["input", "act1"], module="model", refresh_size=30, capacity=20, refresh_every=2)
    trainer = trainer_for(tmp_path, [callback], max_epochs=epochs)
    trainer.fit(classifier, tiny_loader(), ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return classifier, callback


def test_interrupt_and_resume_continues_the_same_run(tmp_path: Path) -> None:
    straight_model, straight = _run(tmp_path / "a", epochs=2)
    checkpoint = str(tmp_path / "mid.ckpt")
    _run(tmp_path / "b", epochs=1, save=checkpoint)
    resumed_model, resumed = _run(tmp_path / "c", epochs=2, ckpt=checkpoint)
    for layer in ("input", "act1"):
        a, b = straight.pools[layer], resumed.pools[layer]
        assert len(a) == len(b) > 0
        assert torch.equal(a.examples[: len(a)], b.examples[: len(b)]) and torch.equal(a.labels, b.labels)
    assert straight.steps_taken == resumed.steps_taken
    for (name, p), (_, q) in zip(straight_model.named_parameters(), resumed_model.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)


def test_state_pickles() -> None:
    callback = LayerwiseAdversarialTraining(["input"], capacity=4)
    callback.pools["input"].add(torch.rand(3, 8), torch.tensor([0, 1, 2]))
    callback.steps_taken["input"], callback.empty_refreshes["input"] = 7, 2  # a warning one refresh away
    callback._recent = [(torch.rand(5, 8), torch.arange(5))]
    torch.rand(1, generator=callback.generator)
    state = pickle.loads(pickle.dumps(callback.state_dict()))
    other = LayerwiseAdversarialTraining(["input"], capacity=4)
    other.load_state_dict(state)
    assert torch.equal(other.pools["input"].examples, callback.pools["input"].examples)
    assert other.steps_taken == {"input": 7} and other.empty_refreshes == {"input": 2}
    assert len(other._recent) == 1 and all(torch.equal(a, b) for a, b in zip(other._recent[0], callback._recent[0]))
    assert torch.equal(other.generator.get_state(), callback.generator.get_state())
    assert callback.state_key != LayerwiseAdversarialTraining(["input", "act1"], capacity=4).state_key


def test_an_old_single_rank_checkpoint_restores_and_a_rank_beyond_it_keeps_fresh_pools() -> None:
    callback = LayerwiseAdversarialTraining(["input"], capacity=4)
    callback.pools["input"].add(torch.rand(3, 8), torch.tensor([0, 1, 2]))
    callback.steps_taken["input"] = 5
    flat = callback._own_state()
    del flat["empty_refreshes"]  # a checkpoint from before the rank list and the empty-pool counter
    old = LayerwiseAdversarialTraining(["input"], capacity=4)
    old.load_state_dict(flat)
    assert len(old.pools["input"]) == 3 and old.steps_taken == {"input": 5} and old.empty_refreshes == {"input": 0}
    beyond = LayerwiseAdversarialTraining(["input"], capacity=4)
    beyond._rank = 1  # a second rank resuming a checkpoint written by one
    with pytest.warns(UserWarning, match=r"^the checkpoint holds pools of 1 rank\(s\); rank 1 starts with empty pools$") as caught:
        beyond.load_state_dict(callback.state_dict())
    if not under_mutmut():  # mutmut's trampoline adds a frame between the methods
        assert caught[0].filename == __file__  # the warning names the line that loaded the state
    assert len(beyond.pools["input"]) == 0 and beyond.steps_taken == {"input": 0}


class DictBatches(Dataset):
    def __init__(self) -> None:
        self.inputs, self.labels = tiny_loader().dataset.tensors

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.inputs[index], "target": self.labels[index]}


class DictClassifier(Classifier):
    def training_step(self, batch, batch_idx):
        return super().training_step((batch["image"], batch["target"]), batch_idx)


def test_dict_batches_with_configured_keys(tmp_path: Path) -> None:
    classifier = pretrained_classifier()
    dict_classifier = DictClassifier(classifier.model, num_classes=3)
    callback = LayerwiseAdversarialTraining(["act1"], module="model", refresh_size=8, capacity=64)  # keys found by name
    trainer_for(tmp_path, [callback], max_steps=2).fit(dict_classifier, DataLoader(DictBatches(), batch_size=16))
    assert len(callback.pools["act1"]) > 0


class SlicedBatches(torch.utils.data.IterableDataset):
    """Batches that are slices of one stored tensor, as a hand-written loader might yield."""

    def __init__(self) -> None:
        self.inputs, self.labels = tiny_loader().dataset.tensors

    def __iter__(self):
        for start in range(0, len(self.inputs), 16):
            yield self.inputs[start:start + 16], self.labels[start:start + 16]


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        hidden = torch.relu(self.fc1(x))
        return self.out(hidden + self.fc2(hidden))


@pytest.mark.parametrize(
    ("make", "loader", "message"),
    [
        (lambda: LayerwiseAdversarialTraining(["fc9"], module="model"), tiny_loader, r"unknown layer `fc9`; layers are: input, fc1"),
        (lambda: LayerwiseAdversarialTraining(["act1"], module="net"), tiny_loader, r"module `net` is not a submodule"),
        (lambda: LayerwiseAdversarialTraining(["fc2"], module="model"), tiny_loader,
         r"tensors computed below layer `fc2` reach the logits around it \(a skip connection\)"),
        (lambda: LayerwiseAdversarialTraining(["act1"], module="model", capacity=3, mix_fraction=0.25), tiny_loader,
         r"capacity 3 is below the 4 rows mixed into each batch of 16"),
        (lambda: LayerwiseAdversarialTraining(["act1"], module="model", batch_keys=("image", "label")),
         lambda: DataLoader(DictBatches(), batch_size=16), r"the dict batch has no key 'label' .* its keys are: image, target"),
        (lambda: LayerwiseAdversarialTraining(["input"], module="model"), lambda: DataLoader(SlicedBatches(), batch_size=None),
         r"the batch's inputs share memory with a larger tensor"),
    ],
    ids=["unknown-layer", "unknown-module", "unclean-cut", "capacity", "unreadable-batch", "batch-slices-a-dataset"],
)
def test_misconfiguration_fails_before_the_first_step(tmp_path: Path, make, loader, message: str) -> None:
    steps = []

    class Count(pl.Callback):
        def on_train_batch_end(self, *args):
            steps.append(1)

    model = Residual() if "skip connection" in message else tiny_mlp()
    classifier = Classifier(model, num_classes=3)
    with pytest.raises(ValueError, match=message):
        trainer_for(tmp_path, [make(), Count()], max_steps=2).fit(classifier, loader())
    assert steps == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [({"layers": []}, "layers must be a non-empty list"), ({"mix_fraction": 0.0}, r"mix_fraction must be in \(0, 1\]"),
     ({"capacity": 0}, "capacity must be a positive integer"),
     ({"layers": "fc1"}, r"layers must be a list of layer names, got the string 'fc1'; for one layer write \['fc1'\]"),
     ({"pooling": EveryStep()}, r"EveryStep pools the rows a fixed-budget attack moved; BoxLBFGS is a search"),
     ({"bounds": {"fc9": (0.0, 1.0)}}, r"bounds are given for 'fc9', which is not among the layers")],
    ids=["no-layers", "mix", "capacity", "string-layers", "every-step-with-a-search", "bounds-of-another-layer"],
)
def test_bad_settings_fail_at_construction(settings: dict, message: str) -> None:
    arguments = {"layers": ["input", "act1"], **settings}
    with pytest.raises(ValueError, match=message):
        LayerwiseAdversarialTraining(**arguments)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"] if torch.cuda.is_available() else ["bf16-mixed"])
def test_mixed_precision_generates_and_injects(tmp_path: Path, precision: str) -> None:
    """Under autocast the hidden layer's output is half precision; pool rows are injected in its dtype
    and generation (float64 search outside autocast) still succeeds."""
    classifier = pretrained_classifier()
    callback = LayerwiseAdversarialTraining(["input", "act2"], module="model", refresh_size=8, capacity=64,
                                            mix_fraction=0.25)
    recorder = RecordGradients()
    trainer = trainer_for(tmp_path, [callback, recorder], max_steps=2, precision=precision,
                          accelerator="gpu" if precision == "16-mixed" else "cpu")
    trainer.fit(classifier, tiny_loader())
    assert len(callback.pools["input"]) > 0 and len(callback.pools["act2"]) > 0
    assert float(trainer.logged_metrics["adv/act2/generation_success"]) > 0.0
    assert torch.count_nonzero(recorder.grads["model.out.weight"]) > 0
    assert all(torch.isfinite(p).all() for p in classifier.parameters())


def test_a_mix_fraction_that_rounds_to_no_row_says_so(tmp_path: Path) -> None:
    callback = LayerwiseAdversarialTraining(["input"], module="model", mix_fraction=0.02, capacity=64)
    with pytest.warns(UserWarning, match=r"mix_fraction 0.02 of a batch of 16 rows rounds to no row; one row of each "
                                         r"batch \(6.2%\) is mixed in instead"):
        trainer_for(tmp_path, [callback], max_steps=1).fit(pretrained_classifier(), tiny_loader())


def test_a_step_replaces_rows_at_its_own_layer_only_when_another_layer_has_the_same_shape(tmp_path: Path) -> None:
    """act1 and act2 both give 12 features: a step of act1's pool must leave act2's output as the
    layers between compute it, not overwrite it with act1's pool rows too."""
    classifier = pretrained_classifier()
    callback = LayerwiseAdversarialTraining(["act1", "act2"], module="model", mix_fraction=0.25, refresh_size=16,
                                            capacity=64)
    seen = {}

    act1_out, act2_out, fc2_weights = [], [], []

    class Watch(pl.Callback):
        """After the callback (first in the list): its hooks exist by now, so these run after them
        and see the outputs it returned."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["injected"] = None if callback._injection is None else callback._injection.activations.clone()
            seen["layer"] = callback.layer_for_step(trainer.global_step)
            fc2_weights.append((pl_module.model.fc2.weight.detach().clone(), pl_module.model.fc2.bias.detach().clone()))
            model = pl_module.model
            model.act1.register_forward_hook(lambda m, a, out: act1_out.append(out.detach().clone()) if m.training else None)
            model.act2.register_forward_hook(lambda m, a, out: act2_out.append(out.detach().clone()) if m.training else None)

    trainer_for(tmp_path, [callback, Watch()], max_steps=1).fit(classifier, tiny_loader())
    assert seen["layer"] == "act1" and seen["injected"] is not None
    rows = seen["injected"].shape[0]
    assert torch.equal(act1_out[0][-rows:], seen["injected"])  # act1's own rows replaced
    weight, bias = fc2_weights[0]
    assert torch.allclose(act2_out[0], torch.sigmoid(act1_out[0] @ weight.T + bias), atol=1e-6)  # act2 as computed


class Untraceable(nn.Module):
    """tiny_mlp's layers behind a forward torch.fx cannot trace (a branch on a shape), so a hidden
    layer's head is the model replayed on the clean inputs with the layer's output replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_mlp()

    def forward(self, x):
        hidden = self.net.act1(self.net.fc1(x))
        if hidden.shape[0] == 0:
            return hidden[:, :3]
        return self.net.out(self.net.act2(self.net.fc2(hidden)))


def test_a_model_torch_fx_cannot_trace_pools_hidden_rows_through_its_replayed_head(tmp_path: Path) -> None:
    """Refreshes of 4 rows at every step, the weights held (lr 0): the pool outgrows the rows the
    replayed head was made for, and the pool error is still measured on every pooled row."""
    classifier = pretrained_classifier()
    classifier.hparams.lr = 0.0
    model = Untraceable()
    model.net.load_state_dict(classifier.model.state_dict())
    classifier.model = model
    callback = LayerwiseAdversarialTraining(["net.act1"], module="model", mix_fraction=0.25, refresh_size=4, refresh_every=1,
                                            capacity=64, attack=BoxLBFGS(iterations=30))
    trainer_for(tmp_path, [callback], max_steps=3).fit(classifier, tiny_loader())
    pool = callback.pools["net.act1"]
    assert len(pool) > 4  # more pool rows than the 4 clean rows of the last refresh
    examples, labels = pool.examples[: len(pool)], pool.labels[: len(pool)]
    with torch.no_grad():  # the head above act1, run directly: each pooled row is misclassified there
        predicted = model.net.out(model.net.act2(model.net.fc2(examples))).argmax(1)
    assert bool((predicted != labels).all())
    assert callback.stats["net.act1"]["pool_error"] == 1.0


class CallsLayersOneByOne(Classifier):
    """training_step runs the children of ``self.model`` one by one, never the module's forward."""

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        for block in self.model:
            inputs = block(inputs)
        return nn.functional.cross_entropy(inputs, labels)


@pytest.mark.parametrize(("module", "layer", "hint"), [("model", "0.1", ""), (None, "model.0.1", " (e.g. module='model')")],
                         ids=["module-given", "module-none"])
def test_a_layer_run_outside_the_classifier_is_refused_with_a_hint_only_where_one_helps(tmp_path: Path, module, layer,
                                                                                       hint: str) -> None:
    torch.manual_seed(0)
    network = nn.Sequential(nn.Sequential(nn.Linear(8, 12), nn.Sigmoid()), nn.Linear(12, 3))
    classifier = CallsLayersOneByOne(network, num_classes=3)
    callback = LayerwiseAdversarialTraining([layer], module=module, mix_fraction=0.25, refresh_size=16, capacity=64,
                                            attack=FastGradient(epsilon=0.1), pooling=EveryStep())
    with pytest.raises(ValueError) as refused:
        trainer_for(tmp_path, [callback], max_steps=2).fit(classifier, tiny_loader())
    assert str(refused.value).endswith(f"Pass that submodule as module=...{hint}, with layer names inside it")
