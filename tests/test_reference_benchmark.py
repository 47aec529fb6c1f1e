"""The plain-PyTorch peers (benchmarks/reference_fast_gradient.py): their steps are what they say."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from script_modules import load_script

REPO = Path(__file__).resolve().parents[1]


def load_reference():
    return load_script("benchmarks/reference_fast_gradient.py", "reference_fast_gradient")


def test_step_has_the_distortion_and_follows_the_loss_gradient() -> None:
    reference = load_reference()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    images = 0.25 + 0.5 * torch.rand(8, 1, 28, 28)  # far enough inside [0, 1] for 0.01 not to clip
    labels = torch.arange(8)
    stepped = reference.fast_gradient_step(model, images, labels, 0.01)
    change = (stepped - images).flatten(1)
    assert torch.allclose(change.pow(2).mean(1).sqrt(), torch.full((8,), 0.01), rtol=1e-4)
    gradient = images.clone().requires_grad_(True)
    grad, = torch.autograd.grad(nn.functional.cross_entropy(model(gradient), labels), gradient)
    cosine = nn.functional.cosine_similarity(change, grad.flatten(1), dim=1)
    assert torch.allclose(cosine, torch.ones(8), atol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_step_stays_in_the_box() -> None:
    reference = load_reference()
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    images = torch.ones(4, 1, 28, 28)
    stepped = reference.fast_gradient_step(model, images, torch.zeros(4, dtype=torch.long), 0.5)
    assert stepped.min() >= 0 and stepped.max() <= 1


def test_pgd_examples_stay_in_the_ball_and_the_box_and_raise_the_loss() -> None:
    reference = load_reference()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    images, labels = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    for steps, step_size in ((40, 0.01), (1, 0.375)):  # Madry et al.'s PGD, Wong et al.'s fast step
        points = reference.pgd_examples(model, images, labels, epsilon=0.3, steps=steps, step_size=step_size)
        assert float((points - images).abs().max()) <= 0.3 + 1e-6
        assert float(points.min()) >= 0 and float(points.max()) <= 1
        loss = lambda x: nn.functional.cross_entropy(model(x), labels, reduction="none")  # noqa: E731
        assert bool((loss(points) > loss(images)).all())
        assert not points.requires_grad and all(p.grad is None for p in model.parameters())
    moved = reference.pgd_examples(model, images, labels, epsilon=0.3, steps=40, step_size=0.01) - images
    assert float((moved.abs() > 0.29).float().mean()) > 0.5  # 40 steps reach the ball's surface on most pixels


def test_every_method_trains_on_its_own_loss() -> None:
    reference = load_reference()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    images, labels = torch.rand(8, 1, 28, 28), torch.arange(8)
    clean = float(nn.functional.cross_entropy(model(images), labels).detach())
    losses = {method: float(loss(model, images, labels, None).detach()) for method, loss in reference.METHODS.items()}
    assert losses["pgd"] > losses["fast"] > clean  # a stronger adversary, a larger loss
    assert clean < losses["pools"] < losses["pgd"]  # half clean, half one small step


def test_order_seed_keeps_the_initial_weights_and_changes_only_the_randomness_after_them() -> None:
    """``--order-seed``: the same seed's weights to start from, another seed's batches and starts."""
    from types import SimpleNamespace

    from torch.utils.data import TensorDataset

    reference = load_reference()
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(96, 1, 28, 28, generator=generator)
    data = SimpleNamespace(train_set=TensorDataset(images, torch.randint(10, (96,), generator=generator)))
    starts = []
    original = reference.fc100_100_10

    def recording_model(*args, **kwargs):
        built = original(*args, **kwargs)
        starts.append([p.detach().clone() for p in built.module.parameters()])
        return built

    reference.fc100_100_10 = recording_model
    train = lambda order_seed: [p.detach() for p in reference.train_one_seed(  # noqa: E731
        data, 0, 1, 32, 0.1, 1.0, method="fast", order_seed=order_seed)[0].parameters()]
    first, again, other = train(1), train(1), train(2)
    assert all(torch.equal(a, b) for a, b in zip(starts[0], starts[2]))  # one seed, one starting point
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # and one order seed, one run
    assert not all(torch.equal(a, b) for a, b in zip(first, other))  # another order, another run


def _matched_run_data(count: int, seed: int, batch_size: int):
    from torch.utils.data import DataLoader, TensorDataset

    from advtrain.data.mnist import EpochShuffle
    from tests.test_layerwise_callback import tiny_loader

    inputs, labels = tiny_loader(count=count).dataset.tensors  # the callback tests' data, in the recipe's order
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, sampler=EpochShuffle(count, seed))
    return inputs, labels, loader


def _callback_way(way: str, seed: int, batch_size: int, attack=None):
    """The recipe's ``pgd`` or ``fast`` way as ``recipes/configs/pgd-mnist.yaml`` and ``fast-mnist.yaml``
    set it, with the recipe's capacity and refresh size (the batch's rows)."""
    from advtrain.attacks import PGD, FastGradient
    from advtrain.callbacks import LayerwiseAdversarialTraining
    from advtrain.pooling import EveryStep

    if attack is None:
        attack = PGD(epsilon=0.3, norm="linf", steps=40, step_size=0.01, random_start=True) if way == "pgd" else \
            FastGradient(epsilon=0.3, norm="linf", random_start=True, step_size=0.375)
    return LayerwiseAdversarialTraining(["input"], module="model", mix_fraction=1.0, refresh_every=1,
                                        refresh_size=batch_size, capacity=batch_size, attack=attack,
                                        pooling=EveryStep(misclassified=True), seed=seed)


@pytest.mark.parametrize("way", ["pgd", "fast"])
def test_with_the_callbacks_randomness_the_loop_trains_the_weights_the_callback_trains(tmp_path: Path, way: str) -> None:
    """``--callback-randomness``: over two epochs, random starts on, the loop's PGD (fast) steps and
    the callback's way train the same weights: the same batch order, the same random starts, and at
    each epoch's shorter last batch (40 rows in batches of 16) the same draw from the pool, whose
    rows include examples of the batch before."""
    from advtrain import Classifier
    from tests.test_layerwise_callback import tiny_mlp, trainer_for

    reference = load_reference()
    seed, count, batch_size, lr = 3, 40, 16, 0.5
    inputs, labels, loader = _matched_run_data(count, seed, batch_size)
    classifier = Classifier(tiny_mlp(), num_classes=3, lr=lr, momentum=0.9, schedule="constant")
    trainer_for(tmp_path, [_callback_way(way, seed, batch_size)], max_epochs=2).fit(classifier, loader)

    model = tiny_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    matched = reference.CallbackRandomness(count, seed, batch_size)
    for epoch in range(2):
        order = matched.epoch_order(epoch)
        for start in range(0, count, batch_size):
            batch, batch_labels = inputs[order[start:start + batch_size]], labels[order[start:start + batch_size]]
            loss = matched.loss(way, model, batch, batch_labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    moved = sum(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), tiny_mlp().parameters()))
    assert moved > 0.05
    for (name, ours), theirs in zip(classifier.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-4, atol=1e-5, msg=lambda text, name=name: f"{name}: {text}")


def test_the_loops_random_starts_are_the_callbacks_also_past_an_epochs_shorter_last_batch(tmp_path: Path) -> None:
    """At an epoch's last, shorter batch the callback attacks the newest full batch's worth of rows
    (some of the batch before): the loop draws as many, so the starts agree in every later epoch."""
    from advtrain import Classifier
    from advtrain.attacks import PGD
    from tests.test_layerwise_callback import tiny_mlp, trainer_for

    class RecordStarts(PGD):
        def _start(self, origin, generator):
            point = super()._start(origin, generator)
            self.starts.append(point.clone())
            return point

    reference = load_reference()
    seed, count, batch_size = 5, 40, 16  # batches of 16, 16, 8 each epoch
    inputs, labels, loader = _matched_run_data(count, seed, batch_size)
    attack = RecordStarts(epsilon=0.3, norm="linf", steps=2, step_size=0.1, random_start=True)
    attack.starts = []
    classifier = Classifier(tiny_mlp(), num_classes=3, lr=0.5, schedule="constant")
    trainer_for(tmp_path, [_callback_way("pgd", seed, batch_size, attack)], max_epochs=3).fit(classifier, loader)

    matched = reference.CallbackRandomness(count, seed, batch_size)
    expected = []
    for epoch in range(3):
        order = matched.epoch_order(epoch)
        for start in range(0, count, batch_size):
            batch = inputs[order[start:start + batch_size]]
            expected.append(batch + 0.3 * (matched.uniform(batch) * 2 - 1))
    assert len(attack.starts) == len(expected) == 9
    assert [len(start) for start in attack.starts] == [16] * 9  # the short batches' refreshes attack 16 rows
    for step, (theirs, ours) in enumerate(zip(attack.starts, expected)):
        torch.testing.assert_close(theirs[-len(ours):], ours, msg=lambda text, step=step: f"step {step}: {text}")


def test_weight_difference_reads_a_saved_state_dict_and_refuses_another_network(tmp_path: Path) -> None:
    reference = load_reference()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    saved = {name: value + 0.25 if name == "0.bias" else value.clone() for name, value in model.state_dict().items()}
    torch.save(saved, tmp_path / "pgd.pt")
    measured = reference.weight_difference(model, tmp_path / "pgd.pt")
    assert measured["max_abs_difference"] == pytest.approx(0.25)
    assert measured["max_abs_weight"] == pytest.approx(max(float(v.abs().max()) for v in model.state_dict().values()))
    torch.save({"other.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="are not FC100-100-10's"):
        reference.weight_difference(model, tmp_path / "other.pt")


def test_jitter_moves_every_weight_by_its_relative_scale_and_leaves_the_global_stream_alone() -> None:
    reference = load_reference()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    before = [p.detach().clone() for p in model.parameters()]
    state = torch.get_rng_state()
    reference.jitter_weights(model, 1e-3, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    relative = torch.cat([(p.detach() / b - 1).flatten() for p, b in zip(model.parameters(), before)])
    assert (relative != 0).all()  # every weight moved
    assert 0.8e-3 < float(relative.std()) < 1.2e-3  # by 1e-3·N(0, 1)
    again = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 10))
    again.load_state_dict(dict(zip(model.state_dict(), before)))
    reference.jitter_weights(again, 1e-3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))  # the seed decides
    again.load_state_dict(dict(zip(model.state_dict(), before)))
    reference.jitter_weights(again, 1e-3, seed=6)
    assert not any(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
