"""MNIST as a LightningDataModule: pixels in [0, 1], a seeded validation split, the paper's halves."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from advtrain.data.shift import random_shift
from advtrain.data.sources import ensure_mnist

#: Which training images to use: all 60,000, or one of the paper's disjoint halves (Table 3).
TrainSubset = Literal["all", "P1", "P2"]
TRAIN_SUBSETS: tuple[str, ...] = ("all", "P1", "P2")

#: The seed of the P′/P″ split is fixed, so the halves are the same whatever ``seed`` is.
HALVES_SEED = 1312_6199


def default_data_dir() -> Path:
    """``$ADVTRAIN_DATA_DIR`` if set, else the user cache folder (``$XDG_CACHE_HOME/advtrain``)."""
    if os.environ.get("ADVTRAIN_DATA_DIR"):
        return Path(os.environ["ADVTRAIN_DATA_DIR"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "advtrain"


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data root: the argument, else ``$ADVTRAIN_DATA_DIR``, else the user cache folder."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def half_indices(subset: TrainSubset, count: int = 60_000) -> torch.Tensor:
    """Indices of the training images in ``subset``: P1 and P2 are disjoint halves (P′ and P″)."""
    if subset == "all":
        return torch.arange(count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(HALVES_SEED))
    return order[: count // 2] if subset == "P1" else order[count // 2 :]


class EpochShuffle(Sampler[int]):
    """The order ``RandomSampler(generator=torch.Generator().manual_seed(seed))`` gives in epoch
    ``e``, computed from ``(seed, e)`` alone: Lightning sets the epoch (``set_epoch``), so a run
    resumed from a checkpoint sees the same batches as one that was never interrupted."""

    def __init__(self, count: int, seed: int) -> None:
        self.count, self.seed, self.epoch = count, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order to give next."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(2 * self.epoch):  # RandomSampler draws two permutations an epoch (one cut to nothing)
            torch.randperm(self.count, generator=generator)
        yield from torch.randperm(self.count, generator=generator).tolist()


class MNISTDataModule(pl.LightningDataModule):
    """MNIST with pixels in [0, 1] (the attack box), held as tensors in memory.

    Args:
        data_dir: data root in torchvision's layout (``<root>/MNIST/raw``); ``None`` takes
            ``$ADVTRAIN_DATA_DIR``, else the user cache folder. Missing files are downloaded
            (see :mod:`advtrain.data.sources`).
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test.
        val_size: images taken out of the training set for validation (seeded); 0 for none.
        train_subset: ``"all"``, or ``"P1"`` / ``"P2"``, the paper's disjoint halves P′ and P″.
        flatten: give images as vectors of 784 instead of ``(1, 28, 28)``.
        seed: seeds the validation split and the shuffling.
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest).
        download: try the download sources where the data root holds no MNIST.
        shift_pixels: move each training image, in each batch the Trainer trains on, by a random
            offset of up to this many pixels in each direction (zero-filled; see
            :func:`~advtrain.data.shift.random_shift`); validation and test images are never moved.
            0 (the default) for none. The offsets come from a generator seeded by ``seed`` at each
            ``setup("fit")`` whose state is in the module's ``state_dict``, so every fit sees the
            same sequence and a resumed run continues it.

    Raises:
        ValueError: a setting outside its range.
        advtrain.data.MNISTUnavailableError: no copy of MNIST could be found or fetched.

    Example::

        data = MNISTDataModule(batch_size=128, val_size=5000)
        data.setup("fit")
        images, labels = next(iter(data.train_dataloader()))  # (128, 1, 28, 28), (128,)
    """

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        *,
        batch_size: int = 128,
        eval_batch_size: int = 1000,
        val_size: int = 5000,
        train_subset: TrainSubset = "all",
        flatten: bool = False,
        seed: int = 0,
        num_workers: int = 0,
        download: bool = True,
        shift_pixels: int = 0,
    ) -> None:
        super().__init__()
        if train_subset not in TRAIN_SUBSETS:
            raise ValueError(f"train_subset must be one of {TRAIN_SUBSETS}, got {train_subset!r}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        available = 60_000 if train_subset == "all" else 30_000
        if not 0 <= val_size < available:
            raise ValueError(f"val_size must be in [0, {available}) for train_subset={train_subset!r}, got {val_size}")
        if not 0 <= shift_pixels < 28:
            raise ValueError(f"shift_pixels must be in [0, 28) for 28×28 images, got {shift_pixels}")
        self.data_dir = resolve_data_dir(data_dir)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_size = val_size
        self.train_subset = train_subset
        self.flatten = flatten
        self.seed = seed
        self.num_workers = num_workers
        self.download = download
        self.shift_pixels = shift_pixels
        self._shift_generator = torch.Generator().manual_seed(seed)
        self.source: str | None = None
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None
        self._test: TensorDataset | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one image as the loaders give it."""
        return (784,) if self.flatten else (1, 28, 28)

    def prepare_data(self) -> None:
        """Find or fetch the raw files (once per node)."""
        self.source = ensure_mnist(self.data_dir, download=self.download)

    def _load(self, train: bool) -> TensorDataset:
        from torchvision.datasets import MNIST

        ensure_mnist(self.data_dir, download=self.download)
        dataset = MNIST(str(self.data_dir), train=train, download=False)
        images = dataset.data.to(torch.float32).div_(255.0).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]
        if self.flatten:
            images = images.flatten(1)
        return TensorDataset(images, dataset.targets.long())

    def setup(self, stage: str | None = None) -> None:
        """Load the split(s) that ``stage`` needs into memory; ``"fit"`` also restarts the shift offsets
        from ``seed`` (a checkpoint being resumed then restores their place)."""
        if stage in (None, "fit"):
            self._shift_generator.manual_seed(self.seed)
        if stage in (None, "fit", "validate") and self._train is None:
            full = self._load(train=True)
            indices = half_indices(self.train_subset)
            shuffled = indices[torch.randperm(len(indices), generator=torch.Generator().manual_seed(self.seed))]
            val_indices, train_indices = shuffled[: self.val_size], shuffled[self.val_size :]
            images, labels = full.tensors
            self._train = TensorDataset(images[train_indices], labels[train_indices])
            self._val = TensorDataset(images[val_indices], labels[val_indices])
        if stage in (None, "test", "predict") and self._test is None:
            self._test = self._load(train=False)

    def _dataset(self, split: str) -> TensorDataset:
        dataset = {"train": self._train, "val": self._val, "test": self._test}[split]
        if dataset is None:
            self.setup("fit" if split != "test" else "test")
            dataset = {"train": self._train, "val": self._val, "test": self._test}[split]
        return dataset

    @property
    def train_set(self) -> TensorDataset:
        """The training images and labels (after the validation split)."""
        return self._dataset("train")

    @property
    def val_set(self) -> TensorDataset:
        """The validation images and labels."""
        return self._dataset("val")

    @property
    def test_set(self) -> TensorDataset:
        """The 10,000 test images and labels."""
        return self._dataset("test")

    def on_after_batch_transfer(self, batch: list[torch.Tensor], dataloader_idx: int) -> list[torch.Tensor]:
        """Shift the images of a training batch (``shift_pixels`` > 0); other batches pass unchanged."""
        if self.shift_pixels == 0 or self.trainer is None or not self.trainer.training:
            return batch
        images, labels = batch
        shifted = random_shift(images.view(-1, 1, 28, 28), self.shift_pixels, self._shift_generator)
        return [shifted.view_as(images), labels]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shift generator's state, so a checkpoint resumes the same offsets."""
        return {"shift_generator": self._shift_generator.get_state()} if self.shift_pixels else {}

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if "shift_generator" in state_dict:
            self._shift_generator.set_state(state_dict["shift_generator"])

    def train_dataloader(self) -> DataLoader:
        """Shuffled, seeded training batches: each epoch's order follows from ``seed`` and the epoch."""
        # the loader's own generator seeds its workers, so iterating it leaves the global random state alone
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=EpochShuffle(len(self.train_set), self.seed),
                          generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches; no loader where ``val_size`` is 0."""
        if self.val_size == 0:
            return []
        return DataLoader(self.val_set, batch_size=self.eval_batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """Test batches in the original order."""
        return DataLoader(self.test_set, batch_size=self.eval_batch_size, num_workers=self.num_workers)
