"""Addressing a model's layers: list them, cut a model in two at one, and know each one's box.

A *layer* is named as in ``model.named_modules()``; ``"input"`` names the input itself. Cutting at
a layer gives ``(bottom, head)`` with ``head(bottom(x)) == model(x)``: ``bottom`` ends with the layer's
output, ``head`` is everything above it. Both share the model's parameters (no copies), so an attack
on ``head`` always sees the current weights.

Reference: Szegedy et al. (2013), Section 4.2 (adversarial examples on each layer's outputs).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping

import torch
from torch import fx, nn

INPUT = "input"

#: Output ranges of activations whose range does not depend on the data.
_KNOWN_RANGES: dict[type[nn.Module], tuple[float, float]] = {
    nn.Sigmoid: (0.0, 1.0),
    nn.Tanh: (-1.0, 1.0),
    nn.ReLU: (0.0, math.inf),
    nn.ReLU6: (0.0, 6.0),
    nn.Softmax: (0.0, 1.0),
    nn.Hardsigmoid: (0.0, 1.0),
    nn.Hardtanh: (-1.0, 1.0),
}
#: Modules that keep their input's range: a box above one of them is the box below it.
_RANGE_PRESERVING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)

Bounds = tuple[float | torch.Tensor, float | torch.Tensor]


class LayerCutError(ValueError):
    """A model cannot be cut cleanly at the requested layer."""


def _sequential_layers(module: nn.Sequential, prefix: str = "") -> list[str]:
    """Names at which a tree of ``nn.Sequential`` can be cut, in execution order."""
    names = []
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.Sequential):
            names.extend(_sequential_layers(child, prefix=f"{name}."))
        names.append(name)
    return names


def _is_sequential_tree(model: nn.Module) -> bool:
    return isinstance(model, nn.Sequential)


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError...
        raise LayerCutError(
            f"{type(model).__name__} is neither an nn.Sequential nor traceable by torch.fx ({error}); "
            "wrap the part you need in nn.Sequential or make it traceable"
        ) from error


def layer_names(model: nn.Module) -> list[str]:
    """The layers of ``model`` one can cut at, in execution order, starting with ``"input"``.

    For a tree of ``nn.Sequential`` these are its children at every depth (a nested block comes
    after its own layers); for other models, the modules that torch.fx records as calls.
    """
    if _is_sequential_tree(model):
        return [INPUT, *_sequential_layers(model)]
    graph = _trace(model).graph
    return [INPUT, *(str(node.target) for node in graph.nodes if node.op == "call_module")]


def _unknown_layer(name: str, model: nn.Module) -> ValueError:
    return ValueError(f"unknown layer `{name}`; layers are: {', '.join(layer_names(model))}")


def _split_sequential(model: nn.Sequential, path: list[str]) -> tuple[nn.Sequential, nn.Sequential]:
    children = list(model.named_children())
    index = next(i for i, (child_name, _) in enumerate(children) if child_name == path[0])
    below, (name, child), above = children[:index], children[index], children[index + 1 :]
    if len(path) == 1:
        return nn.Sequential(OrderedDict([*below, (name, child)])), nn.Sequential(OrderedDict(above))
    child_bottom, child_head = _split_sequential(child, path[1:])
    bottom = nn.Sequential(OrderedDict([*below, (name, child_bottom)]))
    head = nn.Sequential(OrderedDict([(name, child_head), *above]))
    return bottom, head


def _split_graph(model: nn.Module, name: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    traced = _trace(model)
    nodes = list(traced.graph.nodes)
    cuts = [i for i, node in enumerate(nodes) if node.op == "call_module" and node.target == name]
    if not cuts:
        raise _unknown_layer(name, model)
    if len(cuts) > 1:
        raise LayerCutError(f"layer `{name}` is called {len(cuts)} times in the forward pass; a cut there is ambiguous")
    cut = cuts[0]
    below, cut_node, above = nodes[:cut], nodes[cut], nodes[cut + 1 :]
    below_set = set(below)
    crossing = sorted(
        {arg.name for node in above for arg in node.all_input_nodes if arg in below_set and arg.op != "get_attr"}
    )
    if crossing:
        raise LayerCutError(
            f"the model cannot be cut cleanly at `{name}`: tensors computed below it are used above it "
            f"({', '.join(crossing)}), e.g. by a skip connection; cut at a layer that all paths pass through"
        )

    bottom_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in [*below, cut_node]:
        env[node] = bottom_graph.node_copy(node, lambda n: env[n])
    bottom_graph.output(env[cut_node])

    head_graph = fx.Graph()
    env = {cut_node: head_graph.placeholder(f"{name.replace('.', '_')}_output")}
    for node in below:  # parameters read directly (get_attr) may be needed on both sides
        if node.op == "get_attr":
            env[node] = head_graph.node_copy(node, lambda n: env[n])
    for node in above:
        env[node] = head_graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(traced, bottom_graph, "Bottom"), fx.GraphModule(traced, head_graph, "Head")


def split_at(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """Cut ``model`` after layer ``name`` into ``(bottom, head)`` with ``head(bottom(x)) == model(x)``.

    Args:
        model: a tree of ``nn.Sequential``, or any model torch.fx can trace.
        name: a layer from :func:`layer_names`; ``"input"`` gives ``(nn.Identity(), model)``.

    Raises:
        ValueError: ``name`` is not a layer of the model (the message lists the layers).
        LayerCutError: a tensor from below the cut is used above it (a skip connection), named in
            the message; or the model can be neither walked nor traced.

    Example::

        bottom, head = split_at(model, "sigmoid1")
        hidden = bottom(images)          # the activations of sigmoid1
        logits = head(hidden)            # == model(images)
    """
    if name == INPUT:
        return nn.Identity(), model
    if _is_sequential_tree(model):
        names = _sequential_layers(model)
        if name not in names:
            raise _unknown_layer(name, model)
        return _split_sequential(model, name.split("."))
    return _split_graph(model, name)


def _module_before(model: nn.Module, name: str) -> str | None:
    """The layer that feeds ``name`` in a sequential model (None at the first)."""
    names = [n for n in layer_names(model) if n != INPUT and not isinstance(model.get_submodule(n), nn.Sequential)]
    index = names.index(name) if name in names else -1
    return names[index - 1] if index > 0 else None


def known_bounds(model: nn.Module, name: str, input_bounds: Bounds = (0.0, 1.0)) -> Bounds | None:
    """The output box of layer ``name`` where it follows from the layer type alone, else ``None``.

    ``"input"`` has ``input_bounds``; sigmoid [0, 1], tanh [-1, 1], ReLU [0, inf); max-pooling,
    flatten, dropout and identity keep the box of the layer below them.
    """
    if name == INPUT:
        return input_bounds
    if name not in layer_names(model):
        raise _unknown_layer(name, model)
    module = model.get_submodule(name)
    while isinstance(module, nn.Sequential) and len(module) > 0:  # a block ends with its last layer
        name, module = f"{name}.{list(module._modules)[-1]}", module[-1]
    for kind, box in _KNOWN_RANGES.items():
        if isinstance(module, kind):
            return box
    if isinstance(module, _RANGE_PRESERVING) and _is_sequential_tree(model):
        below = _module_before(model, name)
        return known_bounds(model, below if below is not None else INPUT, input_bounds)
    return None


@torch.no_grad()
def estimated_bounds(model: nn.Module, name: str, inputs: torch.Tensor) -> Bounds:
    """Per-unit ``(min, max)`` of layer ``name``'s outputs over clean ``inputs``."""
    bottom, _ = split_at(model, name)
    was_training = model.training
    model.eval()
    try:
        activations = bottom(inputs)
    finally:
        model.train(was_training)
    return activations.amin(dim=0), activations.amax(dim=0)


def layer_bounds(
    model: nn.Module,
    layers: Iterable[str],
    *,
    inputs: torch.Tensor | None = None,
    overrides: Mapping[str, Bounds] | None = None,
    input_bounds: Bounds = (0.0, 1.0),
) -> dict[str, Bounds]:
    """The box of each layer's outputs, for searching adversarial activations inside it.

    In order of precedence: ``overrides[name]``; the range the layer type implies
    (:func:`known_bounds`); else per-unit ``(min, max)`` over clean ``inputs``.

    Raises:
        ValueError: an unknown layer, or a layer with no known range and no ``inputs`` to estimate it.
    """
    overrides = dict(overrides or {})
    names = layer_names(model)
    for name in [*overrides]:
        if name not in names:
            raise _unknown_layer(name, model)
    boxes: dict[str, Bounds] = {}
    for name in layers:
        if name in overrides:
            boxes[name] = overrides[name]
            continue
        box = known_bounds(model, name, input_bounds)
        if box is None:
            if inputs is None:
                kind = type(model.get_submodule(name)).__name__
                raise ValueError(
                    f"layer `{name}` ({kind}) has no range known from its type; pass inputs=... to estimate "
                    f"it from clean activations, or overrides={{'{name}': (low, high)}}"
                )
            box = estimated_bounds(model, name, inputs)
        boxes[name] = box
    return boxes
