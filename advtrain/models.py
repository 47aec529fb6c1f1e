"""The paper's MNIST models (Table 1) as plain ``nn.Sequential`` with named layers, and a small
residual network with batch norm.

Each builder returns a :class:`PaperModel`: the module, its per-layer weight penalties (applied by
:class:`advtrain.Classifier` as ``λ·Σw²/k`` with ``k`` the number of units in the layer) and the
input shape it expects. Every model takes images ``(N, 1, 28, 28)`` with pixels in [0, 1].
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

MNIST_SHAPE = (1, 28, 28)


@dataclass
class PaperModel:
    """A model of the paper with what training it needs.

    Attributes:
        name: the paper's name for it, e.g. ``"FC100-100-10"``.
        module: the classifier, images to logits.
        penalties: layer name to λ; the penalty of a layer is ``λ·Σw²/k``, ``k`` its units.
        input_shape: the shape of one input.
        frozen: layers trained beforehand and left untouched by classification training.
    """

    name: str
    module: nn.Sequential
    penalties: dict[str, float] = field(default_factory=dict)
    input_shape: tuple[int, ...] = MNIST_SHAPE
    frozen: tuple[str, ...] = ()


def _mlp(name: str, hidden: tuple[int, ...], penalties: tuple[float, ...], dropout: float) -> PaperModel:
    """Sigmoid multilayer perceptron: flatten, then ``fc{i}``/``sigmoid{i}`` pairs, then ``logits``."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = 28 * 28
    for index, units in enumerate(hidden, start=1):
        layers[f"fc{index}"] = nn.Linear(width, units)
        layers[f"sigmoid{index}"] = nn.Sigmoid()
        if dropout > 0:
            layers[f"dropout{index}"] = nn.Dropout(dropout)
        width = units
    layers["logits"] = nn.Linear(width, 10)
    names = [f"fc{index}" for index in range(1, len(hidden) + 1)] + ["logits"]
    return PaperModel(name, nn.Sequential(layers), dict(zip(names, penalties)))


def fc10(weight_decay: float = 1e-4) -> PaperModel:
    """FC10(λ): softmax regression on the pixels, penalty λ on its weights."""
    return _mlp(f"FC10({weight_decay:g})", (), (weight_decay,), 0.0)


def sigmoid_mlp(hidden: Sequence[int], dropout: float = 0.0) -> PaperModel:
    """FC{hidden}-10: sigmoid layers of the given widths, penalties 1e-5 on each and 1e-6 on the
    logits, as the paper's FC networks (optional dropout after each sigmoid layer)."""
    widths = tuple(hidden)
    if not widths or any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ValueError(f"hidden must be one or more positive integer widths, got {list(hidden)!r}")
    name = "FC" + "-".join(str(w) for w in widths) + "-10"
    return _mlp(name, widths, (1e-5,) * len(widths) + (1e-6,), dropout)


def fc100_100_10(dropout: float = 0.0) -> PaperModel:
    """FC100-100-10: two sigmoid layers of 100, penalties 1e-5, 1e-5, 1e-6 (optional dropout)."""
    return sigmoid_mlp((100, 100), dropout)


def fc200_200_10(dropout: float = 0.0) -> PaperModel:
    """FC200-200-10: two sigmoid layers of 200, penalties 1e-5, 1e-5, 1e-6."""
    return sigmoid_mlp((200, 200), dropout)


def fc123_456_10(dropout: float = 0.0) -> PaperModel:
    """FC123-456-10: sigmoid layers of 123 and 456, penalties 1e-5, 1e-5, 1e-6 (Table 3)."""
    return sigmoid_mlp((123, 456), dropout)


def ae400_10() -> PaperModel:
    """AE400-10: a 400-unit sigmoid encoder, trained first as a sparse autoencoder and then frozen
    (:func:`pretrain_sparse_autoencoder`), with a softmax layer on top (penalty 1e-6)."""
    layers = OrderedDict(
        flatten=nn.Flatten(),
        encoder=nn.Linear(28 * 28, 400),
        sigmoid=nn.Sigmoid(),
        logits=nn.Linear(400, 10),
    )
    return PaperModel("AE400-10", nn.Sequential(layers), {"logits": 1e-6}, frozen=("encoder",))


def mnist_convnet() -> PaperModel:
    """A small ReLU convnet: two 5×5 convolutions with max-pooling, then 128 units and logits."""
    layers = OrderedDict(
        conv1=nn.Conv2d(1, 32, 5),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 64, 5),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc=nn.Linear(64 * 4 * 4, 128),
        relu3=nn.ReLU(),
        logits=nn.Linear(128, 10),
    )
    return PaperModel("ConvNet", nn.Sequential(layers), {"fc": 1e-5, "logits": 1e-6})


def madry_convnet() -> PaperModel:
    """Madry et al.'s MNIST convnet (their ``mnist_challenge`` model, not one of the paper's): two
    5×5 convolutions of 32 and 64 channels with zero padding, each with ReLU and 2×2 max-pooling,
    then 1024 ReLU units and logits; no weight penalty (they used none).

    Reference: Madry et al., "Towards deep learning models resistant to adversarial attacks" (2018).
    """
    layers = OrderedDict(
        conv1=nn.Conv2d(1, 32, 5, padding=2),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(32, 64, 5, padding=2),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc=nn.Linear(64 * 7 * 7, 1024),
        relu3=nn.ReLU(),
        logits=nn.Linear(1024, 10),
    )
    return PaperModel("MadryConvNet", nn.Sequential(layers), {})


def wong_convnet() -> PaperModel:
    """Wong et al.'s MNIST convnet of fast adversarial training (``mnist_net`` of their code):
    two 4×4 convolutions of stride 2 with 16 and 32 channels, each with ReLU, then 100 ReLU units
    and logits; no weight penalty.

    Reference: Wong et al., "Fast is better than free: revisiting adversarial training" (2020).
    """
    layers = OrderedDict(
        conv1=nn.Conv2d(1, 16, 4, stride=2, padding=1),
        relu1=nn.ReLU(),
        conv2=nn.Conv2d(16, 32, 4, stride=2, padding=1),
        relu2=nn.ReLU(),
        flatten=nn.Flatten(),
        fc=nn.Linear(32 * 7 * 7, 100),
        relu3=nn.ReLU(),
        logits=nn.Linear(100, 10),
    )
    return PaperModel("WongConvNet", nn.Sequential(layers), {})


def small_resnet(widths: Sequence[int] = (16, 32, 64), weight_decay: float = 5e-4) -> PaperModel:
    """A residual convnet with batch norm for MNIST (not one of the paper's models): a 3×3 stem,
    then one torchvision ``BasicBlock`` per stage (``stage1`` at 28×28, ``stage2`` and ``stage3``
    halving the resolution), global average pooling and logits. Every convolution and the logits
    carry the penalty of plain weight decay ``weight_decay`` (``λ = weight_decay · k / 2`` in
    :class:`advtrain.Classifier`'s ``λ·Σw²/k``).

    Its stage outputs end in a ReLU, so their boxes are ``[0, inf)``; ``stem``, ``stage1``,
    ``stage2``, ``stage3`` are the natural layers for per-layer pools.
    """
    from torchvision.models.resnet import BasicBlock

    if len(widths) != 3 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise ValueError(f"widths must be three positive channel counts, got {list(widths)!r}")
    first, second, third = widths

    def stage(inputs: int, outputs: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inputs != outputs:
            downsample = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))
        return nn.Sequential(BasicBlock(inputs, outputs, stride=stride, downsample=downsample))

    layers = OrderedDict(
        stem=nn.Sequential(nn.Conv2d(1, first, 3, padding=1, bias=False), nn.BatchNorm2d(first), nn.ReLU(inplace=True)),
        stage1=stage(first, first, 1),
        stage2=stage(first, second, 2),
        stage3=stage(second, third, 2),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        logits=nn.Linear(third, 10),
    )
    module = nn.Sequential(layers)
    penalties = {name: weight_decay * child.weight.shape[0] / 2 for name, child in module.named_modules()
                 if isinstance(child, (nn.Conv2d, nn.Linear))}
    return PaperModel("SmallResNet", module, penalties)


#: Command-line names of the builders.
MODEL_BUILDERS: dict[str, Callable[[], PaperModel]] = {
    "fc10-1e-4": lambda: fc10(1e-4),
    "fc10-1e-2": lambda: fc10(1e-2),
    "fc10-1": lambda: fc10(1.0),
    "fc100-100-10": fc100_100_10,
    "fc200-200-10": fc200_200_10,
    "fc123-456-10": fc123_456_10,
    "ae400-10": ae400_10,
    "convnet": mnist_convnet,
    "small-resnet": small_resnet,
    "madry-convnet": madry_convnet,
    "wong-convnet": wong_convnet,
}


def build_model(name: str) -> PaperModel:
    """The paper's model by its command-line name (see :data:`MODEL_BUILDERS`)."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; models are: {', '.join(MODEL_BUILDERS)}")
    return MODEL_BUILDERS[name]()


def pretrain_sparse_autoencoder(
    encoder: nn.Linear,
    images: torch.Tensor,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    sparsity: float = 0.05,
    sparsity_weight: float = 3.0,
    weight_decay: float = 1e-6,
    seed: int = 0,
) -> list[float]:
    """Train ``encoder`` as the hidden layer of a sparse sigmoid autoencoder, then freeze it.

    The decoder (sigmoid output, discarded afterwards) reconstructs the pixels; the sparsity term is
    the KL divergence between ``sparsity`` and each unit's mean activation (Ng's sparse autoencoder).

    Returns:
        The mean reconstruction loss of each epoch.
    """
    if images.ndim < 2 or images.flatten(1).shape[1] != encoder.in_features:
        raise ValueError(f"images must have {encoder.in_features} values each, got shape {tuple(images.shape)}")
    generator = torch.Generator().manual_seed(seed)
    inputs = images.flatten(1).to(encoder.weight.device, encoder.weight.dtype)
    decoder = nn.Linear(encoder.out_features, encoder.in_features).to(inputs.device, inputs.dtype)
    encoder.requires_grad_(True)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=lr)
    history = []
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator).to(inputs.device)
        total = 0.0
        for start in range(0, len(inputs), batch_size):
            batch = inputs[order[start : start + batch_size]]
            hidden = torch.sigmoid(encoder(batch))
            reconstruction = torch.sigmoid(decoder(hidden))
            loss = nn.functional.binary_cross_entropy(reconstruction, batch)
            rho = hidden.mean(0).clamp(1e-6, 1 - 1e-6)
            kl = sparsity * torch.log(sparsity / rho) + (1 - sparsity) * torch.log((1 - sparsity) / (1 - rho))
            penalty = weight_decay * (encoder.weight.pow(2).sum() + decoder.weight.pow(2).sum())
            optimizer.zero_grad()
            (loss + sparsity_weight * kl.sum() / encoder.out_features + penalty).backward()
            optimizer.step()
            total += loss.item() * len(batch)
        history.append(total / len(inputs))
    encoder.requires_grad_(False)
    return history
