"""random_shift and the data module's shifted training batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from advtrain.data import MNISTDataModule, random_shift


def shifted_by(image: torch.Tensor, down: int, right: int) -> torch.Tensor:
    """``image`` (C, H, W) moved ``down`` rows and ``right`` columns, zero-filled (a reference)."""
    moved = torch.zeros_like(image)
    height, width = image.shape[1:]
    moved[:, max(down, 0):height + min(down, 0), max(right, 0):width + min(right, 0)] = \
        image[:, max(-down, 0):height - max(down, 0), max(-right, 0):width - max(right, 0)]
    return moved


def offsets_of(images: torch.Tensor, shifted: torch.Tensor, max_pixels: int) -> list[tuple[int, int]]:
    """For each image, the one offset of up to ``max_pixels`` that turns it into its shifted copy."""
    found = []
    for image, result in zip(images, shifted):
        matches = [(down, right) for down in range(-max_pixels, max_pixels + 1)
                   for right in range(-max_pixels, max_pixels + 1)
                   if torch.equal(shifted_by(image, down, right), result)]
        assert len(matches) == 1, f"not a single whole-pixel shift of its image: {matches}"
        found.append(matches[0])
    return found


def test_each_image_is_moved_by_its_own_offset_within_the_limit() -> None:
    images = torch.rand(200, 2, 9, 7, generator=torch.Generator().manual_seed(0)) + 0.1  # no zero pixels
    original = images.clone()
    shifted = random_shift(images, 2, torch.Generator().manual_seed(1))
    assert torch.equal(images, original), "the input must not change"
    offsets = offsets_of(images, shifted, 2)
    assert set(offsets) == {(down, right) for down in range(-2, 3) for right in range(-2, 3)}, \
        "every offset up to 2 pixels should occur in 200 draws"


def test_a_seeded_generator_repeats_the_offsets_and_zero_pixels_copies() -> None:
    images = torch.rand(16, 1, 28, 28)
    first = random_shift(images, 1, torch.Generator().manual_seed(3))
    again = random_shift(images, 1, torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert not torch.equal(first, images)
    copy = random_shift(images, 0)
    assert torch.equal(copy, images) and copy.data_ptr() != images.data_ptr()


@pytest.mark.parametrize(
    ("shape", "max_pixels", "message"),
    [((16, 784), 1, r"shape \(N, C, H, W\), got shape \(16, 784\)"),
     ((2, 1, 28, 28), -1, r"max_pixels must be in \[0, 28\)"),
     ((2, 1, 5, 28), 5, r"max_pixels must be in \[0, 5\) for 5×28 images, got 5")],
    ids=["flat-images", "negative", "as-large-as-the-image"],
)
def test_bad_arguments_are_refused(shape: tuple[int, ...], max_pixels: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        random_shift(torch.zeros(shape), max_pixels)


class RecordsBatches(pl.LightningModule):
    """A linear classifier that keeps the images of every training and validation batch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(784, 10)
        self.seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.seen["train"].append(batch[0].clone())
        return torch.nn.functional.cross_entropy(self.linear(batch[0].flatten(1)), batch[1])

    def validation_step(self, batch: list[torch.Tensor], batch_idx: int) -> None:
        self.seen["val"].append(batch[0].clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_recording(data: MNISTDataModule, steps: int, epochs: int = 1, checkpoint: Path | None = None,
                  save_to: Path | None = None) -> RecordsBatches:
    """Train :class:`RecordsBatches` on ``steps`` batches of ``data`` per epoch for ``epochs``
    epochs (resuming from ``checkpoint``; saving a checkpoint to ``save_to``) and validate on one batch."""
    model = RecordsBatches()
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=steps, limit_val_batches=1, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, datamodule=data, ckpt_path=checkpoint)
    if save_to is not None:
        trainer.save_checkpoint(save_to)
    return model


class InOrder(MNISTDataModule):
    """MNIST whose training batches come in the same order every epoch (to compare shifts)."""

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.batch_size)


@pytest.mark.parametrize("flatten", [False, True], ids=["images", "vectors"])
def test_training_batches_are_shifted_and_validation_batches_are_not(mnist_root: Path, flatten: bool) -> None:
    data = MNISTDataModule(mnist_root, batch_size=32, val_size=100, shift_pixels=1, flatten=flatten)
    model = fit_recording(data, steps=2)
    loader = iter(data.train_dataloader())
    for seen in model.seen["train"]:
        originals = next(loader)[0]
        assert seen.shape == originals.shape
        offsets = offsets_of(originals.view(-1, 1, 28, 28), seen.view(-1, 1, 28, 28), 1)
        assert len(set(offsets)) > 1, "the images of a batch should get different offsets"
    assert torch.equal(model.seen["val"][0], next(iter(data.val_dataloader()))[0])


def test_every_fit_sees_the_same_offsets_and_a_resumed_fit_continues_them(mnist_root: Path, tmp_path: Path) -> None:
    def data() -> InOrder:
        return InOrder(mnist_root, batch_size=32, val_size=100, shift_pixels=2)

    shared = data()
    whole = fit_recording(shared, steps=2, epochs=2).seen["train"]
    assert all(torch.equal(a, b) for a, b in zip(whole, fit_recording(shared, steps=2, epochs=2).seen["train"]))
    assert not torch.equal(whole[0], whole[2]), "the second epoch draws new offsets"

    fit_recording(data(), steps=2, epochs=1, save_to=tmp_path / "one-epoch.ckpt")
    resumed = fit_recording(data(), steps=2, epochs=2, checkpoint=tmp_path / "one-epoch.ckpt").seen["train"]
    assert len(resumed) == 2
    assert torch.equal(resumed[0], whole[2]) and torch.equal(resumed[1], whole[3])
    assert MNISTDataModule(mnist_root).state_dict() == {}, "nothing to save without shifts"
