"""Classifier: trains, applies the paper's penalties, and refuses bad batches clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advtrain import Classifier
from advtrain.classifier import layer_penalty
from advtrain.models import fc10, fc100_100_10


def _trainer(tmp_path: Path, epochs: int = 1) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )


def test_training_lowers_the_error(tiny_data, tmp_path: Path) -> None:
    images, labels = tiny_data
    torch.manual_seed(0)
    classifier = Classifier.from_paper_model(fc10(1e-4), lr=0.5, schedule="constant")
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    trainer = _trainer(tmp_path, epochs=30)
    before = trainer.test(classifier, loader, verbose=False)[0]["test/err"]
    trainer.fit(classifier, loader, loader)
    assert {"val/err", "train/err", "train/loss"} <= set(trainer.logged_metrics)
    after = trainer.test(classifier, loader, verbose=False)[0]["test/err"]
    assert after < before - 0.3


def test_penalty_is_lambda_sum_of_squares_over_units() -> None:
    paper_model = fc100_100_10()
    classifier = Classifier.from_paper_model(paper_model)
    module = paper_model.module
    expected = sum(
        strength * getattr(module, name).weight.pow(2).sum() / getattr(module, name).out_features
        for name, strength in {"fc1": 1e-5, "fc2": 1e-5, "logits": 1e-6}.items()
    )
    torch.testing.assert_close(classifier.penalty(), expected)
    scaled = Classifier.from_paper_model(paper_model, penalty_scale=300.0)
    torch.testing.assert_close(scaled.penalty(), 300.0 * expected)
    torch.testing.assert_close(layer_penalty(nn.Conv2d(1, 4, 3, bias=False), 0.0), torch.tensor(0.0))


def test_frozen_layers_are_not_trained() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 5), nn.Linear(5, 10))
    Classifier(model, frozen=["1"])
    assert not model[1].weight.requires_grad and model[2].weight.requires_grad


BAD_BATCHES = [
    ("wrong-shape", lambda: (torch.rand(4, 784), torch.zeros(4, dtype=torch.long)), r"inputs must have shape \(N, 1, 28, 28\), got \(4, 784\)"),
    ("label-too-large", lambda: (torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 10])), r"labels must lie in \[0, 10\), got values from 0 to 10"),
    ("negative-label", lambda: (torch.rand(4, 1, 28, 28), torch.tensor([-1, 1, 2, 3])), r"labels must lie in \[0, 10\)"),
    ("float-labels", lambda: (torch.rand(4, 1, 28, 28), torch.zeros(4)), "labels must be a 1-D integer tensor"),
    ("nan-pixel", lambda: (torch.rand(4, 1, 28, 28).index_fill_(0, torch.tensor([2]), float("nan")), torch.zeros(4, dtype=torch.long)), r"inputs holds 784 non-finite values"),
    ("count-mismatch", lambda: (torch.rand(4, 1, 28, 28), torch.zeros(3, dtype=torch.long)), "labels has 3 entries but the inputs have 4"),
]


@pytest.mark.parametrize(("make", "message"), [case[1:] for case in BAD_BATCHES], ids=[case[0] for case in BAD_BATCHES])
def test_bad_batches_are_refused_by_name(make, message: str) -> None:
    classifier = Classifier.from_paper_model(fc10())
    with pytest.raises(ValueError, match=message):
        classifier.training_step(make(), 0)


def test_unknown_layers_and_settings_are_refused() -> None:
    model = fc100_100_10().module
    with pytest.raises(ValueError, match=r"unknown layer `fc3`; layers are: input, flatten, fc1, sigmoid1"):
        Classifier(model, penalties={"fc3": 1e-5})
    with pytest.raises(ValueError, match=r"layer `sigmoid1` \(Sigmoid\) has no weight to penalise"):
        Classifier(model, penalties={"sigmoid1": 1e-5})
    with pytest.raises(ValueError, match="optimizer must be 'sgd' or 'adam', got 'lbfgs'"):
        Classifier(model, optimizer="lbfgs")


class LearningRates(pl.Callback):
    """The learning rate of every training step, as the optimizer used it."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_triangular_schedule_climbs_to_the_rate_at_two_fifths_then_falls_to_zero(tiny_data, tmp_path: Path) -> None:
    images, labels = tiny_data
    classifier = Classifier.from_paper_model(fc10(1e-4), lr=0.5, optimizer="adam", schedule="triangular")
    rates = LearningRates()
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)  # 4 steps an epoch, 20 in all
    pl.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=tmp_path, callbacks=[rates]).fit(classifier, loader)
    expected = [0.5 * step / 8 if step <= 8 else 0.5 * (20 - step) / 12 for step in range(1, 21)]  # Wong et al.'s, by step
    assert rates.rates == pytest.approx(expected)
    with pytest.raises(ValueError, match="schedule must be 'cosine', 'constant' or 'triangular', got 'cyclic'"):
        Classifier(nn.Linear(2, 2), num_classes=2, schedule="cyclic")
