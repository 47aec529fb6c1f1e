"""Models we did not write, at test size: torchvision's resnet18 (random weights), a transformer
classifier around ``nn.TransformerEncoder``, a BatchNorm convnet, and a plain LightningModule that
keeps its network in ``self.net``; with small synthetic data each learns in a few steps."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def resnet18(num_classes: int = 2) -> nn.Module:
    """torchvision's resnet18, random weights (seeded)."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


class TransformerClassifier(nn.Module):
    """Sequences ``(N, T, features)`` -> a linear embedding, ``nn.TransformerEncoder``, mean over
    positions, a linear head."""

    def __init__(self, features: int = 4, width: int = 16, classes: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(features, width)
        layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def bn_convnet(classes: int = 2) -> nn.Sequential:
    """A small convnet with batch norm after every convolution."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes))


def images(count: int = 64, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random RGB images in [0, 1], labelled by whether red outshines green: learnt in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.rand(count, 3, size, size, generator=generator)
    inputs[: count // 2, 0] *= 0.6  # a clear margin between the classes
    inputs[count // 2 :, 1] *= 0.6
    labels = (inputs[:, 0].mean((1, 2)) > inputs[:, 1].mean((1, 2))).long()
    return inputs, labels


def sequences(count: int = 64, length: int = 6, features: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random sequences in [0, 1], labelled by whether feature 0 outweighs feature 1 on average."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.rand(count, length, features, generator=generator)
    inputs[: count // 2, :, 0] *= 0.5
    inputs[count // 2 :, :, 1] *= 0.5
    labels = (inputs[..., 0].mean(1) > inputs[..., 1].mean(1)).long()
    return inputs, labels


class DictItems(Dataset):
    """Items as dicts under the given keys."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, keys: tuple[str, str] = ("image", "label")) -> None:
        self.inputs, self.labels, self.keys = inputs, labels, keys

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {self.keys[0]: self.inputs[index], self.keys[1]: self.labels[index]}


class PlainModule(pl.LightningModule):
    """A user's own LightningModule: the network in ``self.net``, cross-entropy, SGD; reads tuple or
    dict batches; ``augment`` is applied to the inputs inside ``training_step``."""

    def __init__(self, net: nn.Module, lr: float = 0.05, keys: tuple[str, str] | None = None, augment=None) -> None:
        super().__init__()
        self.net, self.lr, self.keys, self.augment = net, lr, keys, augment

    def _split(self, batch):
        return (batch[self.keys[0]], batch[self.keys[1]]) if self.keys else (batch[0], batch[1])

    def training_step(self, batch, batch_idx):
        inputs, labels = self._split(batch)
        if self.augment is not None:
            inputs, labels = self.augment(inputs, labels)
        loss = nn.functional.cross_entropy(self.net(inputs), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        inputs, labels = self._split(batch)
        self.log("val/err", (self.net(inputs).argmax(1) != labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def loader(inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(TensorDataset(inputs, labels), batch_size=batch_size, shuffle=shuffle)


def pretrained(net: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, steps: int = 30, lr: float = 0.05) -> nn.Module:
    """``net`` after a few full-batch steps of plain training (batch-norm statistics included), so
    that it classifies the data well above chance and attacks have correct rows to work on."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(inputs), labels).backward()
        optimizer.step()
    return net
