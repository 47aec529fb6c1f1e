"""Addressing a model's layers: list them, cut a model in two at one, and know each one's box.

A *layer* is any named submodule (``model.named_modules()``), containers included: ``layer2`` of a
ResNet, one residual block ``layer2.0``, ``encoder.layers.0`` inside ``nn.TransformerEncoder``.
``"input"`` names the input itself. A layer can be cut at when its module runs exactly once in a
forward pass and returns one batch-first tensor; :func:`layer_names` lists exactly those.

Cutting at a layer (:func:`cut_at`) gives a :class:`LayerCut`: ``bottom(x)`` is the layer's output and
``head_for(x)`` maps that output (or a perturbed copy of it) to the logits, with
``head_for(x)(bottom(x)) == model(x)``. Three ways, one meaning:

- an ``nn.Sequential`` tree, or a model torch.fx traces whose graph passes entirely through the
  layer, is split into two modules: the head runs only the layers above;
- otherwise (a skip connection around the layer, or a forward torch.fx cannot trace) the head
  *replays* the whole model on the clean inputs with the layer's output replaced by forward hooks.
  Tensors computed below the layer and used above it (a skip connection around the cut) are
  therefore held at the clean inputs' values: only the layer's output is perturbed.

Everything shares the model's parameters (no copies), so a head always sees the current weights.

Reference: Szegedy et al. (2013), Section 4.2 (adversarial examples on each layer's outputs).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn

from advtrain.box import UNBOUNDED, UNIT_BOX, Bounds, check_bounds
from advtrain.model_state import untouched

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
#: The same ranges for activations written as functions in ``forward`` (torch.fx targets by name).
_KNOWN_FUNCTION_RANGES: dict[str, tuple[float, float]] = {
    "relu": (0.0, math.inf), "relu_": (0.0, math.inf), "sigmoid": (0.0, 1.0), "sigmoid_": (0.0, 1.0),
    "tanh": (-1.0, 1.0), "tanh_": (-1.0, 1.0), "relu6": (0.0, 6.0), "softmax": (0.0, 1.0),
    "hardsigmoid": (0.0, 1.0), "hardtanh": (-1.0, 1.0),
}
#: Modules that keep their input's range: a box above one of them is the box below it.
_RANGE_PRESERVING = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
                     nn.AdaptiveMaxPool3d, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_RANGE_PRESERVING_FUNCTIONS = {"max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool2d", "flatten", "view",
                               "reshape", "dropout", "contiguous", "permute", "transpose", "squeeze", "unsqueeze",
                               "clone"}

Head = Callable[[torch.Tensor], torch.Tensor]


class LayerCutError(ValueError):
    """A model cannot be cut at the requested layer."""


# --------------------------------------------------------------------------------------------
# Listing the layers


class _CallRecorder(fx.Tracer):
    """Traces through every module (containers and leaves alike) and counts each module's calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}
        self.finished: list[str] = []  # names in the order their calls return

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return not list(module.children()) and super().is_leaf_module(module, qualified_name)

    def call_module(self, module: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        name = self.path_of_module(module)
        self.calls[name] = self.calls.get(name, 0) + 1
        output = super().call_module(module, forward, args, kwargs)
        if isinstance(output, fx.Proxy) and name not in self.finished:
            self.finished.append(name)
        return output


def _sequential_layers(module: nn.Sequential, prefix: str = "") -> list[str]:
    """Names at which a tree of ``nn.Sequential`` can be cut, in execution order."""
    names = []
    for child_name, child in module.named_children():
        name = f"{prefix}{child_name}"
        if isinstance(child, nn.Sequential):
            names.extend(_sequential_layers(child, prefix=f"{name}."))
        names.append(name)
    return names


def probe_calls(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, tuple[int, bool]]:
    """Each submodule the forward pass on ``example_inputs`` runs, in the order its (first) call
    returned: ``(calls, returned a batch-first tensor every time)``. Runs in eval mode, no gradient."""
    count = example_inputs.shape[0]
    seen: dict[str, tuple[int, bool]] = {}

    def record(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            calls, cuttable = seen.get(name, (0, True))
            is_batch = isinstance(output, torch.Tensor) and output.ndim >= 1 and output.shape[0] == count
            seen[name] = (calls + 1, cuttable and is_batch)
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        with untouched(model), torch.no_grad():
            model(example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def layer_names(model: nn.Module, example_inputs: torch.Tensor | None = None) -> list[str]:
    """The layers of ``model`` one can cut at, each once, in the order their outputs are computed,
    starting with ``"input"``: every named submodule, containers included, that one forward pass
    runs exactly once and that returns one batch-first tensor.

    Found by running ``example_inputs`` through the model with hooks where given; without them,
    from the structure of an ``nn.Sequential`` tree, or else by tracing the model with torch.fx.

    Raises:
        LayerCutError: no ``example_inputs`` and a model torch.fx cannot trace.
    """
    if example_inputs is not None:
        calls = probe_calls(model, example_inputs)
        return [INPUT, *(name for name, (count, cuttable) in calls.items() if count == 1 and cuttable)]
    if isinstance(model, nn.Sequential):
        return [INPUT, *_sequential_layers(model)]
    recorder = _CallRecorder()
    try:
        recorder.trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError...
        raise LayerCutError(f"{type(model).__name__} cannot be traced by torch.fx ({type(error).__name__}: {error}); "
                            "pass example inputs to list its layers by running it") from error
    return [INPUT, *(name for name in recorder.finished if recorder.calls[name] == 1)]


def check_layer_name(model: nn.Module, name: str, example_inputs: torch.Tensor | None = None) -> None:
    """Refuse ``name`` unless it is ``"input"`` or a named submodule of ``model``.

    Raises:
        ValueError: ``unknown layer `name`; layers are: ...`` listing :func:`layer_names`.
    """
    if name == INPUT:
        return
    if not isinstance(name, str) or not name or name not in dict(model.named_modules()):
        try:
            names = ", ".join(layer_names(model, example_inputs))
        except LayerCutError:  # untraceable without inputs: list the submodules instead
            names = ", ".join([INPUT, *(n for n, _ in model.named_modules() if n)])
        raise ValueError(f"unknown layer `{name}`; layers are: {names}")


def check_layer(model: nn.Module, name: str, example_inputs: torch.Tensor | None = None) -> None:
    """Refuse ``name`` unless it is a layer one can cut at (see :func:`layer_names`).

    Raises:
        ValueError: an unknown name (the message lists the layers).
        LayerCutError: a module that runs more or less than once, or returns no batch-first tensor.
    """
    if name == INPUT:
        return
    check_layer_name(model, name, example_inputs)
    names = layer_names(model, example_inputs)
    if name in names:
        return
    calls = probe_calls(model, example_inputs).get(name, (0, True))[0] if example_inputs is not None else 0
    parents = [n for n in enclosing_modules(name) if n in names]
    instead = f"; cut at an enclosing module instead: {', '.join(parents)}" if parents else ""
    if calls == 0:
        raise LayerCutError(f"layer `{name}` does not run in the forward pass{instead}")
    if calls > 1:
        raise LayerCutError(f"layer `{name}` runs {calls} times in one forward pass, so a cut there is ambiguous "
                            f"(a module reused, like a ResNet block's ReLU){instead}")
    raise LayerCutError(f"layer `{name}` does not return one batch-first tensor{instead}")


def enclosing_modules(name: str) -> list[str]:
    """``layer1.0.conv1`` -> ``["layer1.0", "layer1"]``: the modules around a module, innermost first."""
    parts = name.split(".")
    return [".".join(parts[:end]) for end in range(len(parts) - 1, 0, -1)]


# --------------------------------------------------------------------------------------------
# Cutting


class LayerCut:
    """A model cut after one layer.

    Attributes:
        name: the layer.
        crossing: whether tensors computed below the layer are used above it (a skip connection
            around the cut); ``None`` where it is not known without running the model (see
            :meth:`crosses`).
    """

    def __init__(self, model: nn.Module, name: str, crossing: bool | None) -> None:
        self.model = model
        self.name = name
        self.crossing = crossing

    def bottom(self, inputs: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``inputs``."""
        raise NotImplementedError

    def head_for(self, inputs: torch.Tensor) -> Head:
        """A head for the layer's outputs of exactly these ``inputs`` (row for row): where tensors
        cross the cut they come from these inputs. A head made for a batch can be narrowed to some
        of its rows with ``head.select(rows)`` where it has ``select``."""
        raise NotImplementedError

    def crosses(self, inputs: torch.Tensor) -> bool:
        """Whether tensors from below the cut reach the logits around the layer, known from the graph
        or tested on ``inputs``: with the layer's output held fixed, do the logits still change with
        the inputs? (Needs two different rows; one row passes.)"""
        if self.crossing is not None:
            return self.crossing
        if inputs.shape[0] < 2:
            return False
        with torch.no_grad():
            activations = self.bottom(inputs)
            fixed = activations[:1].expand_as(activations).clone()
            other = inputs.roll(1, 0)
            first, second = _ReplayHead(self.model, self.name, inputs)(fixed), _ReplayHead(self.model, self.name, other)(fixed)
        scale = float(first.abs().max()) + 1.0
        self.crossing = not torch.allclose(first, second, rtol=1e-4, atol=1e-5 * scale)
        return self.crossing


class _InputCut(LayerCut):
    def bottom(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs

    def head_for(self, inputs: torch.Tensor) -> Head:
        return self.model


class _CopyingHead(nn.Module):
    """The layers above a cut; the activations are copied first, since a layer above may work in
    place (``nn.ReLU(inplace=True)``) and must not write into an attack's variable."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        return self.head(activations.clone())


class _SplitCut(LayerCut):
    def __init__(self, model: nn.Module, name: str, bottom: nn.Module, head: nn.Module) -> None:
        super().__init__(model, name, crossing=False)
        self.bottom_module, self.head_module = bottom, _CopyingHead(head)

    def bottom(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.bottom_module(inputs)

    def head_for(self, inputs: torch.Tensor) -> Head:
        return self.head_module


class _Captured(Exception):
    """Carries a layer's output out of a forward pass that need not go further."""

    def __init__(self, output: torch.Tensor) -> None:
        super().__init__()
        self.output = output


@contextmanager
def _hooked(module: nn.Module, hook: Callable) -> Iterator[None]:
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _ReplayHead(nn.Module):
    """The model run on fixed clean inputs with one layer's output replaced: a head for that layer
    whose tensors crossing the cut stay at the clean inputs' values."""

    def __init__(self, model: nn.Module, layer: str, inputs: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.layer = layer
        self.inputs = inputs

    def select(self, rows: torch.Tensor) -> "_ReplayHead":
        """The head for some rows of its batch (``rows`` may repeat)."""
        return _ReplayHead(self.model, self.layer, self.inputs[rows.to(self.inputs.device)])

    def forward(self, activations: torch.Tensor) -> torch.Tensor:
        if activations.shape[0] != self.inputs.shape[0]:
            raise ValueError(f"the head of layer `{self.layer}` was made for {self.inputs.shape[0]} rows, got "
                             f"{activations.shape[0]}; narrow it with head.select(rows)")
        calls = 0

        def replace(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            if calls > 1:
                raise LayerCutError(f"layer `{self.layer}` runs more than once in one forward pass; a cut there is ambiguous")
            if output.shape != activations.shape:
                raise ValueError(f"activations for layer `{self.layer}` must have its output's shape "
                                 f"{tuple(output.shape)}, got {tuple(activations.shape)}")
            return activations.to(output.dtype).clone()  # layers above may work in place

        with _hooked(self.model.get_submodule(self.layer), replace):
            return self.model(self.inputs)


class _ReplayCut(LayerCut):
    def bottom(self, inputs: torch.Tensor) -> torch.Tensor:
        def capture(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            raise _Captured(output)

        try:
            with _hooked(self.model.get_submodule(self.name), capture):
                self.model(inputs)
        except _Captured as captured:
            return captured.output
        raise LayerCutError(f"layer `{self.name}` did not run in the forward pass")

    def head_for(self, inputs: torch.Tensor) -> Head:
        return _ReplayHead(self.model, self.name, inputs)


def _is_sequential_path(model: nn.Module, name: str) -> bool:
    """Whether every module from ``model`` down to ``name``'s parent is an ``nn.Sequential``."""
    module = model
    for part in name.split(".")[:-1]:
        if not isinstance(module, nn.Sequential):
            return False
        module = getattr(module, part)
    return isinstance(module, nn.Sequential) and name.split(".")[-1] in module._modules


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


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer with one more module kept whole: the layer to cut at."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name == self.layer or super().is_leaf_module(module, qualified_name)


def _split_graph(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module] | str | None:
    """``(bottom, head)`` graph modules for a clean cut; the names of the tensors crossing the cut
    where there are some; ``None`` where torch.fx cannot trace the model or the layer is not one call."""
    try:
        traced = fx.GraphModule(model, _LeafTracer(name).trace(model))
    except Exception:  # noqa: BLE001 - any tracing failure means: replay instead
        return None
    nodes = list(traced.graph.nodes)
    cuts = [i for i, node in enumerate(nodes) if node.op == "call_module" and node.target == name]
    if len(cuts) != 1:
        return None
    cut = cuts[0]
    below, cut_node, above = nodes[:cut], nodes[cut], nodes[cut + 1 :]
    below_set = set(below)
    crossing = sorted({arg.name for node in above for arg in node.all_input_nodes
                       if arg in below_set and arg.op != "get_attr"})
    if crossing:
        return ", ".join(crossing)
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


def cut_at(model: nn.Module, name: str, example_inputs: torch.Tensor | None = None) -> LayerCut:
    """Cut ``model`` after layer ``name`` (see the module docstring for the three ways).

    Args:
        model: any classifier from inputs to logits.
        name: a layer from :func:`layer_names`, or ``"input"``.
        example_inputs: a batch to check the layer on (needed for models torch.fx cannot trace).

    Raises:
        ValueError: ``name`` is not a submodule (the message lists the layers).
        LayerCutError: the layer runs more or less than once per forward pass, or returns no tensor.

    Example::

        cut = cut_at(resnet, "layer2")
        hidden = cut.bottom(images)                  # (N, 128, H/8, W/8)
        logits = cut.head_for(images)(hidden)        # == resnet(images)
    """
    if name == INPUT:
        return _InputCut(model, name, crossing=False)
    check_layer_name(model, name, example_inputs)
    if _is_sequential_path(model, name):
        return _SplitCut(model, name, *_split_sequential(model, name.split(".")))
    if example_inputs is not None:
        check_layer(model, name, example_inputs)
    split = _split_graph(model, name)
    if isinstance(split, tuple):
        return _SplitCut(model, name, *split)
    if example_inputs is None and split is None:
        check_layer(model, name)  # the tracer could not tell; fails on a reused layer where tracing works
    return _ReplayCut(model, name, crossing=True if isinstance(split, str) else None)


def split_at(model: nn.Module, name: str) -> tuple[nn.Module, nn.Module]:
    """``(bottom, head)`` modules with ``head(bottom(x)) == model(x)``, for a clean cut.

    Raises:
        ValueError: ``name`` is not a layer of the model (the message lists the layers).
        LayerCutError: tensors from below the cut are used above it (named in the message), or the
            model is neither an ``nn.Sequential`` tree nor traceable by torch.fx: use :func:`cut_at`,
            whose head holds such tensors at the clean inputs' values.
    """
    if name == INPUT:
        return nn.Identity(), model
    check_layer_name(model, name)
    if _is_sequential_path(model, name):
        return _split_sequential(model, name.split("."))
    split = _split_graph(model, name)
    if isinstance(split, tuple):
        return split
    if isinstance(split, str):
        raise LayerCutError(f"the model cannot be cut cleanly at `{name}`: tensors computed below it are used above "
                            f"it ({split}), e.g. by a skip connection; use cut_at, or cut at a layer all paths pass through")
    raise LayerCutError(f"{type(model).__name__} is neither an nn.Sequential nor traceable by torch.fx with `{name}` "
                        "kept whole; use cut_at, whose head replays the model with hooks")


# --------------------------------------------------------------------------------------------
# Boxes


def _range_of_node(graph_module: fx.GraphModule, node: fx.Node) -> tuple[float, float] | None:
    """The output range of a traced node where its operation implies one."""
    if node.op == "call_module":
        module = graph_module.get_submodule(node.target)
        if isinstance(module, _RANGE_PRESERVING):
            return _range_of_node(graph_module, node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        return module_range(module)
    if node.op in ("call_function", "call_method"):
        function = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        if function in _KNOWN_FUNCTION_RANGES:
            return _KNOWN_FUNCTION_RANGES[function]
        if function in _RANGE_PRESERVING_FUNCTIONS and node.args and isinstance(node.args[0], fx.Node):
            return _range_of_node(graph_module, node.args[0])
    return None


def module_range(module: nn.Module) -> tuple[float, float] | None:
    """The range of ``module``'s outputs where its type, or its last operation, implies one:
    sigmoid [0, 1], tanh [-1, 1], ReLU [0, inf) (so also a residual block that ends with a ReLU),
    through max-pooling, flattening and dropout; else ``None``."""
    for kind, box in _KNOWN_RANGES.items():
        if isinstance(module, kind):
            return box
    if isinstance(module, nn.Sequential):
        for child in reversed(list(module.children())):
            if not isinstance(child, _RANGE_PRESERVING):
                return module_range(child)
        return None
    if not list(module.children()):
        return None
    try:
        traced = fx.symbolic_trace(module)
    except Exception:  # noqa: BLE001 - untraceable: its range is unknown
        return None
    output = next(node for node in traced.graph.nodes if node.op == "output")
    result = output.args[0]
    return _range_of_node(traced, result) if isinstance(result, fx.Node) else None


def known_bounds(model: nn.Module, name: str, input_bounds: Bounds = UNIT_BOX) -> Bounds | None:
    """The output box of layer ``name`` where it follows from the layer type alone, else ``None``.

    ``"input"`` has ``input_bounds``; sigmoid [0, 1], tanh [-1, 1], ReLU [0, inf), a module whose
    last operation is one of them likewise; max-pooling, flatten, dropout and identity keep the box
    of the layer before them in an ``nn.Sequential``.
    """
    if name == INPUT:
        return input_bounds
    check_layer_name(model, name)
    modules = dict(model.named_modules())
    module = modules[name]
    if isinstance(module, _RANGE_PRESERVING):
        parent_name, _, child_name = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        if isinstance(parent, nn.Sequential):
            siblings = list(parent._modules)
            index = siblings.index(child_name)
            if index == 0:
                return known_bounds(model, parent_name, input_bounds) if parent_name else input_bounds
            return known_bounds(model, f"{parent_name}.{siblings[index - 1]}" if parent_name else siblings[index - 1],
                                input_bounds)
        return _range_in_graph(model, name)
    return module_range(module)


def _range_in_graph(model: nn.Module, name: str) -> tuple[float, float] | None:
    """The range of a range-preserving layer from the operation that feeds it in the traced model."""
    try:
        traced = fx.GraphModule(model, _LeafTracer(name).trace(model))
    except Exception:  # noqa: BLE001 - untraceable: unknown
        return None
    calls = [node for node in traced.graph.nodes if node.op == "call_module" and node.target == name]
    return _range_of_node(traced, calls[0]) if len(calls) == 1 else None


def layer_bounds(
    model: nn.Module,
    layers: Iterable[str],
    *,
    overrides: Mapping[str, Bounds] | None = None,
    input_bounds: Bounds = UNIT_BOX,
) -> dict[str, Bounds]:
    """The box of each layer's outputs, for searching adversarial activations inside it, by the one
    policy every part of advtrain follows: ``overrides[name]`` (checked by
    :func:`advtrain.box.check_bounds`); else the range the layer type implies (:func:`known_bounds`,
    ``input_bounds`` for ``"input"``); else no bound, ``(-inf, inf)``. Clean activations outside a
    box widen it where it is used (:class:`advtrain.classifier_layer.ClassifierLayer`).

    Raises:
        ValueError: an unknown layer, or a malformed, inverted or empty override.
    """
    overrides = dict(overrides or {})
    for name in [*overrides, *layers]:
        check_layer_name(model, name)
    boxes: dict[str, Bounds] = {}
    for name in layers:
        if name in overrides:
            boxes[name] = check_bounds(overrides[name], name=f"bounds for layer `{name}`")
        else:
            boxes[name] = known_bounds(model, name, input_bounds) or UNBOUNDED
    return boxes


__all__ = ["INPUT", "UNBOUNDED", "Bounds", "Head", "LayerCut", "LayerCutError", "check_layer", "check_layer_name", "cut_at",
           "enclosing_modules", "known_bounds", "layer_bounds", "layer_names", "module_range", "probe_calls", "split_at"]
