"""MNISTDataModule: pixels, splits, data roots and errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advtrain.data import MNISTDataModule, MNISTUnavailableError, half_indices, resolve_data_dir


def test_pixels_in_unit_box_and_shapes(mnist_root: Path) -> None:
    data = MNISTDataModule(mnist_root, batch_size=16, val_size=1000)
    data.setup()
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (16, 1, 28, 28) and labels.shape == (16,)
    train_images = data.train_set.tensors[0]
    assert train_images.min() == 0.0 and train_images.max() == 1.0
    assert len(data.train_set) == 59_000 and len(data.val_set) == 1000 and len(data.test_set) == 10_000
    assert set(data.test_set.tensors[1].tolist()) == set(range(10))


def test_flatten_gives_vectors(mnist_root: Path) -> None:
    data = MNISTDataModule(mnist_root, flatten=True, val_size=0)
    data.setup("test")
    assert data.test_set.tensors[0].shape == (10_000, 784)
    assert data.input_shape == (784,)


def test_validation_split_is_seeded_and_disjoint(mnist_root: Path) -> None:
    first, again, other = (MNISTDataModule(mnist_root, val_size=500, seed=s) for s in (1, 1, 2))
    for data in (first, again, other):
        data.setup("fit")
    assert torch.equal(first.val_set.tensors[0], again.val_set.tensors[0])
    assert not torch.equal(first.val_set.tensors[0], other.val_set.tensors[0])
    train_rows = {row.numpy().tobytes() for row in first.train_set.tensors[0][:2000]}
    assert not any(row.numpy().tobytes() in train_rows for row in first.val_set.tensors[0])


def test_paper_halves_are_disjoint_and_cover_the_training_set() -> None:
    p1, p2 = half_indices("P1"), half_indices("P2")
    assert len(p1) == len(p2) == 30_000
    assert len(set(p1.tolist()) | set(p2.tolist())) == 60_000


def test_half_is_selectable_from_the_data_module(mnist_root: Path) -> None:
    data = MNISTDataModule(mnist_root, train_subset="P2", val_size=0)
    data.setup("fit")
    assert len(data.train_set) == 30_000


def test_data_root_argument_then_environment_then_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ADVTRAIN_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("ADVTRAIN_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir(None) == tmp_path / "cache" / "advtrain"


def test_missing_data_names_where_it_looked_and_the_fix(tmp_path: Path) -> None:
    data = MNISTDataModule(tmp_path / "empty", download=False)
    with pytest.raises(MNISTUnavailableError, match=r"(?s)empty.*ADVTRAIN_DATA_DIR"):
        data.prepare_data()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_subset": "half"}, "train_subset must be one of"),
        ({"val_size": 60_000}, r"val_size must be in \[0, 60000\)"),
        ({"train_subset": "P1", "val_size": 30_000}, r"val_size must be in \[0, 30000\)"),
        ({"batch_size": 0}, "batch sizes must be positive"),
        ({"shift_pixels": -1}, r"shift_pixels must be in \[0, 28\)"),
        ({"shift_pixels": 28}, r"shift_pixels must be in \[0, 28\)"),
    ],
    ids=["unknown-subset", "val-too-large", "val-too-large-for-half", "zero-batch", "negative-shift", "shift-too-large"],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MNISTDataModule("unused", **kwargs)
