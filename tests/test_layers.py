"""Layer listing, cutting models in two, and activation boxes."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from advtrain.layers import LayerCutError, cut_at, known_bounds, layer_bounds, layer_names, split_at
from advtrain.models import fc100_100_10, mnist_convnet
from tests.real_models import TransformerClassifier, resnet18


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
    with pytest.raises(LayerCutError, match="cannot be traced by torch.fx .* pass example inputs"):
        layer_names(DataDependent())
    assert layer_names(DataDependent(), torch.rand(2, 2)) == ["input", "fc"]  # running it tells


# ---- models we did not write: containers are layers, skip connections are held at clean values


def test_resnet18_offers_containers_once_and_no_reused_module() -> None:
    model = resnet18()
    names = layer_names(model)
    assert names == layer_names(model, torch.rand(2, 3, 32, 32))  # traced and run agree
    assert len(names) == len(set(names))
    assert {"layer2", "layer3", "layer2.0", "layer1.1", "maxpool", "avgpool"} <= set(names)
    assert names.index("maxpool") < names.index("layer1.0.conv1") < names.index("layer1.0") < names.index("layer1")
    assert "layer1.0.relu" not in names  # BasicBlock calls its ReLU twice
    with pytest.raises(LayerCutError, match=r"`layer1.0.relu` runs 2 times .* enclosing module instead: layer1.0, layer1"):
        cut_at(model, "layer1.0.relu", torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"unknown layer `layer9`; layers are: input, conv1, bn1"):
        cut_at(model, "layer9")


@pytest.mark.parametrize("layer", ["input", "conv1", "maxpool", "layer1.0", "layer2", "layer3", "layer2.0.conv1",
                                   "layer3.0.downsample", "avgpool"])
def test_every_cut_of_resnet18_gives_back_the_model(layer: str) -> None:
    model = resnet18().eval()
    inputs = torch.rand(3, 3, 32, 32)
    cut = cut_at(model, layer, inputs)
    with torch.no_grad():
        torch.testing.assert_close(cut.head_for(inputs)(cut.bottom(inputs)), model(inputs))
    crosses = layer in ("layer2.0.conv1", "layer3.0.downsample")  # inside a block: the skip bypasses it
    assert cut.crosses(inputs) == crosses


def test_replayed_head_holds_the_skip_at_each_rows_clean_values() -> None:
    model = resnet18().eval()
    inputs = torch.rand(4, 3, 32, 32)
    cut = cut_at(model, "layer2.0.conv1", inputs)
    assert cut.crossing
    with torch.no_grad():
        activations = cut.bottom(inputs)
        rows = torch.tensor([2, 0, 2])
        selected = cut.head_for(inputs).select(rows)(activations[rows])
        torch.testing.assert_close(selected, model(inputs)[rows])
        with pytest.raises(ValueError, match="made for 4 rows, got 3; narrow it with head.select"):
            cut.head_for(inputs)(activations[rows])
        # only the layer's output moves: perturbing it changes the logits, the skip does not follow
        moved = cut.head_for(inputs)(activations + 0.1)
        assert not torch.allclose(moved, model(inputs))


def test_transformer_encoder_layer_inside_nn_transformer_encoder() -> None:
    model = TransformerClassifier().eval()
    inputs = torch.rand(5, 6, 4)
    names = layer_names(model, inputs)
    assert {"embed", "encoder.layers.0", "encoder.layers.1", "encoder", "head"} <= set(names)
    assert "encoder.layers.0.self_attn" not in names  # returns a tuple
    cut = cut_at(model, "encoder.layers.0", inputs)
    assert not cut.crosses(inputs)
    with torch.no_grad():
        torch.testing.assert_close(cut.head_for(inputs)(cut.bottom(inputs)), model(inputs))


def test_in_place_layers_above_the_cut_leave_the_activations_alone() -> None:
    model = resnet18().eval()  # bn1 is followed by ReLU(inplace=True)
    inputs = torch.rand(2, 3, 32, 32)
    cut = cut_at(model, "bn1", inputs)
    activations = cut.bottom(inputs).detach().requires_grad_(True)
    before = activations.detach().clone()
    cut.head_for(inputs)(activations).sum().backward()
    assert torch.equal(activations.detach(), before) and activations.grad is not None


def test_boxes_of_blocks_that_end_in_a_known_activation() -> None:
    model = resnet18()
    assert known_bounds(model, "layer2") == (0.0, math.inf)  # a stage of BasicBlocks, each ending in ReLU
    assert known_bounds(model, "layer2.1") == (0.0, math.inf)
    assert known_bounds(model, "maxpool") == (0.0, math.inf)  # max-pooling of the stem's ReLU
    assert known_bounds(model, "layer2.1.bn2") is None
    assert known_bounds(TransformerClassifier(), "encoder.layers.0") is None  # ends in LayerNorm: unbounded


def test_known_boxes_follow_the_layer_type() -> None:
    convnet = mnist_convnet().module
    assert known_bounds(convnet, "input") == (0.0, 1.0)
    assert known_bounds(convnet, "relu1") == (0.0, math.inf)
    assert known_bounds(convnet, "pool1") == (0.0, math.inf)  # max-pooling of a ReLU output
    assert known_bounds(convnet, "flatten") == (0.0, math.inf)
    assert known_bounds(convnet, "conv1") is None
    assert known_bounds(fc100_100_10().module, "sigmoid2") == (0.0, 1.0)
    assert known_bounds(nested(), "block") == (-1.0, 1.0)


def test_layer_bounds_follow_one_policy_and_refuse_bad_boxes() -> None:
    model = fc100_100_10().module
    boxes = layer_bounds(model, ["input", "sigmoid1", "fc2"], overrides={"input": (-1.0, 2.0)})
    assert boxes == {"input": (-1.0, 2.0), "sigmoid1": (0.0, 1.0), "fc2": (-math.inf, math.inf)}  # fc2: no type range
    assert layer_bounds(model, ["input"]) == {"input": (0.0, 1.0)}
    with pytest.raises(ValueError, match="unknown layer `fc7`; layers are: input, "):
        layer_bounds(model, ["fc1"], overrides={"fc7": (0.0, 1.0)})
    with pytest.raises(ValueError, match=r"bounds for layer `fc2` \(1, 0\) have lower > upper"):
        layer_bounds(model, ["fc2"], overrides={"fc2": (1.0, 0.0)})
    with pytest.raises(ValueError, match=r"leave no room: lower equals upper everywhere"):
        layer_bounds(model, ["fc2"], overrides={"fc2": (0.5, 0.5)})
