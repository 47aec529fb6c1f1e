"""Layer listing, cutting models in two, and activation boxes."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from advtrain.layers import LayerCutError, known_bounds, layer_bounds, layer_names, split_at
from advtrain.models import fc100_100_10, mnist_convnet


class TwoBranch(nn.Module):
    """Not a Sequential: traced by torch.fx. A residual block between `fc1` and `fc3`."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(5, 5)
        self.fc3 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(x))
        return self.fc3(hidden + self.fc2(hidden))


class Chain(nn.Module):
    """Not a Sequential, but a clean chain with a functional op in the middle."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)) * self.scale)


def nested() -> nn.Sequential:
    block = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), act=nn.Tanh()))
    return nn.Sequential(OrderedDict(stem=nn.Linear(3, 4), block=block, head=nn.Linear(4, 2)))


def test_layer_names_in_execution_order() -> None:
    assert layer_names(fc100_100_10().module) == ["input", "flatten", "fc1", "sigmoid1", "fc2", "sigmoid2", "logits"]
    assert layer_names(nested()) == ["input", "stem", "block.fc", "block.act", "block", "head"]
    assert layer_names(TwoBranch()) == ["input", "fc1", "act", "fc2", "fc3"]


CASES = [
    ("fc100", lambda: fc100_100_10().module, (5, 1, 28, 28)),
    ("convnet", lambda: mnist_convnet().module, (5, 1, 28, 28)),
    ("nested", nested, (5, 3)),
    ("fx-chain", Chain, (5, 6)),
]


@pytest.mark.parametrize(("build", "shape"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_head_of_bottom_is_the_model_at_every_layer(build, shape) -> None:
    torch.manual_seed(0)
    model = build()
    inputs = torch.rand(shape)
    expected = model(inputs)
    for name in layer_names(model):
        bottom, head = split_at(model, name)
        torch.testing.assert_close(head(bottom(inputs)), expected, msg=f"cut at {name}")


def test_cut_shares_parameters_with_the_model() -> None:
    model = fc100_100_10().module
    bottom, head = split_at(model, "sigmoid1")
    assert bottom.fc1 is model.fc1 and head.logits is model.logits
    assert isinstance(head[0], nn.Linear) and head[0] is model.fc2


def test_nested_cut_keeps_names() -> None:
    bottom, head = split_at(nested(), "block.fc")
    assert [name for name, _ in bottom.named_modules() if name] == ["stem", "block", "block.fc"]
    assert [name for name, _ in head.named_modules() if name] == ["block", "block.act", "head"]


def test_skip_connection_crossing_the_cut_is_named() -> None:
    with pytest.raises(LayerCutError, match=r"cannot be cut cleanly at `fc2`.*\(act\)"):
        split_at(TwoBranch(), "fc2")


def test_clean_cut_of_the_residual_model_matches() -> None:
    torch.manual_seed(1)
    model = TwoBranch()
    inputs = torch.rand(4, 6)
    bottom, head = split_at(model, "act")
    torch.testing.assert_close(head(bottom(inputs)), model(inputs))


def test_unknown_layer_lists_the_layers() -> None:
    with pytest.raises(ValueError, match=r"unknown layer `fc9`; layers are: input, flatten, fc1, sigmoid1"):
        split_at(fc100_100_10().module, "fc9")
    with pytest.raises(ValueError, match=r"unknown layer `fc9`; layers are: input, fc1, act, fc2, fc3"):
        split_at(TwoBranch(), "fc9")


def test_untraceable_model_gets_a_clear_error() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(LayerCutError, match="neither an nn.Sequential nor traceable by torch.fx"):
        split_at(DataDependent(), "fc")


def test_known_boxes_follow_the_layer_type() -> None:
    convnet = mnist_convnet().module
    assert known_bounds(convnet, "input") == (0.0, 1.0)
    assert known_bounds(convnet, "relu1") == (0.0, math.inf)
    assert known_bounds(convnet, "pool1") == (0.0, math.inf)  # max-pooling of a ReLU output
    assert known_bounds(convnet, "flatten") == (0.0, math.inf)
    assert known_bounds(convnet, "conv1") is None
    assert known_bounds(fc100_100_10().module, "sigmoid2") == (0.0, 1.0)
    assert known_bounds(nested(), "block") == (-1.0, 1.0)


def test_layer_bounds_estimates_overrides_and_refuses() -> None:
    model = fc100_100_10().module
    inputs = torch.rand(50, 1, 28, 28)
    boxes = layer_bounds(model, ["input", "sigmoid1", "fc2"], inputs=inputs, overrides={"input": (-1.0, 2.0)})
    assert boxes["input"] == (-1.0, 2.0) and boxes["sigmoid1"] == (0.0, 1.0)
    low, high = boxes["fc2"]
    activations = split_at(model, "fc2")[0](inputs)
    assert low.shape == (100,) and torch.equal(low, activations.amin(0)) and torch.equal(high, activations.amax(0))
    with pytest.raises(ValueError, match=r"layer `fc2` \(Linear\) has no range known from its type; pass inputs="):
        layer_bounds(model, ["fc2"])
    with pytest.raises(ValueError, match="unknown layer `fc7`"):
        layer_bounds(model, ["fc1"], overrides={"fc7": (0.0, 1.0)})
