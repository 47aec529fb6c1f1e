"""The plain-PyTorch peers (benchmarks/reference_fast_gradient.py): their steps are what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]


def load_reference():
    spec = importlib.util.spec_from_file_location("reference_fast_gradient", REPO / "benchmarks" / "reference_fast_gradient.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    losses = {method: float(loss(model, images, labels).detach()) for method, loss in reference.METHODS.items()}
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
