"""Per-layer upper Lipschitz bounds of a network, the paper's Section 4.3 and Table 5.

Follow one model: :func:`lipschitz_bounds` runs a zero input through it (traced by ``torch.fx``
where it can be, else with hooks on its leaf modules) to learn each layer's input size, then
asks :data:`MODULE_BOUNDS` (modules) or :func:`function_bound` (operations written in
``forward``) for each step's bound. A step with no rule is a row with an infinite bound and a
note naming it, never a silent gap.

The bound of the whole network is composed along the graph: a step applied to one tensor
multiplies that tensor's bound by its own (so over a chain of layers the bound is the product,
``‖φ(x) − φ(x + r)‖ ≤ (∏ L_k) ‖r‖``); a sum or difference of branches is bounded by the sum of the
branches' bounds (``‖Δ(f + g)‖ ≤ ‖Δf‖ + ‖Δg‖``), a concatenation by the root of the sum of their
squares. So a residual network, ``x + F(x)`` block after block, gets a finite bound.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from advtrain.analysis.normalization import ContrastNormalization
from advtrain.analysis.operator_norms import (
    adaptive_windows_per_position,
    conv2d_norm,
    matrix_norm,
    nonnegative_linear_norm_bound,
    windows_per_position,
)
from advtrain.model_state import untouched

#: A module's bound from the module, its per-example input shape and output shape: (bound, note).
ModuleBound = Callable[[nn.Module, tuple[int, ...], tuple[int, ...]], tuple[float, str]]

MODULE_BOUNDS: dict[type[nn.Module], ModuleBound] = {}


def register_bound(*module_types: type[nn.Module]) -> Callable[[ModuleBound], ModuleBound]:
    """Register the bound of a module type (yours too), e.g. ``@register_bound(MyNorm)``."""

    def register(rule: ModuleBound) -> ModuleBound:
        for module_type in module_types:
            MODULE_BOUNDS[module_type] = rule
        return rule

    return register


@dataclass
class LayerBound:
    """One step of the network and its upper Lipschitz bound (``math.inf`` where unbounded)."""

    name: str
    kind: str
    weight_shape: tuple[int, ...] | None
    stride: tuple[int, ...] | None
    input_size: tuple[int, ...]
    bound: float
    note: str = ""
    from_input: float = math.nan  # the bound from the network's input to this step's output, along the graph

    @property
    def size(self) -> str:
        """The weight's size as the paper writes it: ``in×kh×kw×out`` for a conv, ``in×out`` for FC."""
        if self.weight_shape is None:
            return "–"
        if len(self.weight_shape) == 4:
            out_c, in_c, kh, kw = self.weight_shape
            return f"{in_c}×{kh}×{kw}×{out_c}"
        if len(self.weight_shape) == 2:
            return f"{self.weight_shape[1]}×{self.weight_shape[0]}"
        return "×".join(map(str, self.weight_shape))


@dataclass
class LipschitzTable:
    """Per-layer bounds in forward order and their product."""

    rows: list[LayerBound]
    traced_with: str
    notes: list[str] = field(default_factory=list)

    @property
    def product(self) -> float:
        """The product of every row's bound: a Lipschitz bound of the network where it is a chain."""
        return math.prod(row.bound for row in self.rows)

    @property
    def network_bound(self) -> float:
        """The Lipschitz bound of the whole network, composed along its graph (module docstring):
        the product of the rows for a chain, sums where branches meet."""
        if not self.rows:
            return 1.0
        last = self.rows[-1].from_input
        return self.product if math.isnan(last) else last

    @property
    def unbounded(self) -> list[LayerBound]:
        """Rows no rule could bound."""
        return [row for row in self.rows if math.isinf(row.bound)]

    def markdown(self, weights_only: bool = False) -> str:
        """The table in Markdown, like the paper's Table 5 (``weights_only``: conv and FC rows only)."""
        lines = ["| layer | kind | size | stride | input size | upper bound | from the input | note |",
                 "|---|---|---|---|---|---|---|---|"]
        for row in self.rows:
            if weights_only and row.weight_shape is None:
                continue
            stride = "–" if row.stride is None else "×".join(map(str, row.stride))
            lines.append(f"| {row.name} | {row.kind} | {row.size} | {stride} | {'×'.join(map(str, row.input_size))} "
                         f"| {row.bound:.4g} | {row.from_input:.4g} | {row.note} |")
        lines.append(f"| network | | | | | | {self.network_bound:.4g} | along the graph |")
        return "\n".join(lines + [f"\n{note}" for note in self.notes]) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (infinite bounds as the string ``"inf"``)."""
        def clean(value: float) -> float | str:
            return "inf" if math.isinf(value) else value

        rows = [{**asdict(row), "bound": clean(row.bound), "from_input": clean(row.from_input), "size": row.size}
                for row in self.rows]
        return {"rows": rows, "product": clean(self.product), "network_bound": clean(self.network_bound),
                "traced_with": self.traced_with, "notes": self.notes}


# --------------------------------------------------------------------------------------------
# Module rules


def _constant(value: float, note: str = "") -> ModuleBound:
    return lambda module, input_shape, output_shape: (value, note)


for _types, _value in (
    ((nn.ReLU, nn.ReLU6, nn.Tanh, nn.Hardtanh, nn.Softplus, nn.Identity, nn.Flatten, nn.Unflatten,
      nn.Softsign, nn.Hardsigmoid, nn.Softmax, nn.Tanhshrink), 1.0),
    ((nn.Sigmoid,), 0.25),
    ((nn.GELU,), 1.13),  # max of Φ(x) + xφ(x), at x = √2: 1.1289
    ((nn.SiLU,), 1.1),  # max of σ(x)(1 + x(1 − σ(x))): 1.0998
    ((nn.Hardswish,), 1.5),
):
    register_bound(*_types)(_constant(_value))
register_bound(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)(_constant(1.0, "identity in eval mode"))


@register_bound(nn.LeakyReLU)
def _leaky_relu(module: nn.LeakyReLU, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    return max(1.0, abs(module.negative_slope)), ""


@register_bound(nn.ELU, nn.CELU)
def _elu(module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    return max(1.0, float(module.alpha)), ""


@register_bound(nn.PReLU)
def _prelu(module: nn.PReLU, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    return max(1.0, float(module.weight.detach().abs().max())), ""


@register_bound(nn.Linear)
def _linear(module: nn.Linear, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    return matrix_norm(module.weight), "largest singular value"


@register_bound(nn.Conv2d)
def _conv2d(module: nn.Conv2d, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    return conv2d_norm(module.weight, tuple(input_shape[-2:]), module.stride, module.padding,
                       module.dilation, module.groups, module.padding_mode)


@register_bound(nn.Conv1d)
def _conv1d(module: nn.Conv1d, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    padding = module.padding if isinstance(module.padding, str) else (0, module.padding[0])
    return conv2d_norm(module.weight.unsqueeze(2), (1, input_shape[-1]), (1, module.stride[0]), padding,
                       (1, module.dilation[0]), module.groups, module.padding_mode)


def _pair(value: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,) * dims


@register_bound(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
def _max_pool(module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    dims = len(output_shape) - 1
    kernel, stride = _pair(module.kernel_size, dims), _pair(module.stride or module.kernel_size, dims)
    padding, dilation = _pair(module.padding, dims), _pair(module.dilation, dims)
    shared = math.prod(windows_per_position(n, m, k, s, p, d) for n, m, k, s, p, d in
                       zip(input_shape[-dims:], output_shape[-dims:], kernel, stride, padding, dilation))
    note = "contractive (windows do not overlap)" if shared == 1 else f"overlapping windows: sqrt({shared})"
    return math.sqrt(shared), note


@register_bound(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
def _adaptive_max_pool(module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    dims = len(output_shape) - 1
    shared = math.prod(adaptive_windows_per_position(n, m) for n, m in zip(input_shape[-dims:], output_shape[-dims:]))
    return math.sqrt(shared), "contractive (windows do not overlap)" if shared == 1 else f"overlapping windows: sqrt({shared})"


@register_bound(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
def _avg_pool(module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    single_channel = (1, *input_shape[1:])  # channels are pooled independently
    return nonnegative_linear_norm_bound(module, single_channel), "Schur bound of the averaging"


@register_bound(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batch_norm(module: nn.modules.batchnorm._BatchNorm, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    if module.running_var is None:
        return math.inf, "batch norm without running statistics depends on the batch"
    scale = torch.ones_like(module.running_var) if module.weight is None else module.weight.detach()
    scale = scale / torch.sqrt(module.running_var + module.eps)
    return float(scale.abs().max()), "eval mode: max |γ|/sqrt(var + eps)"


@register_bound(ContrastNormalization)
def _contrast_normalization(module: ContrastNormalization, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    # The Jacobian is (eps + s)^-γ (I − 2γ x xᵀ / (eps + s)), s = ‖x‖²: eigenvalues (eps + s)^-γ and
    # (eps + s)^-γ (1 − 2γ s/(eps + s)), both at most eps^-γ in size for γ in [0, 1].
    return module.eps ** -module.gamma, "eps^-γ (paper, Section 4.3)"


@register_bound(nn.LocalResponseNorm)
def _local_response_norm(module: nn.LocalResponseNorm, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> tuple[float, str]:
    # b_c = a_c D_c^-β with D_c = k + (α/n) Σ_{window c} a². The Jacobian is diag(D^-β) − 2β(α/n) T with
    # T_cj = a_c a_j D_c^(-β-1) on the window; using a_c², a_j² ≤ (D_c − k) n/α, T's row sums are at most
    # √n k^-β n/α and its column sums n k^-β n/α, so by Schur's test ‖J‖ ≤ k^-β (1 + 2β n^(3/4)).
    n, beta, k = module.size, module.beta, module.k
    return k ** -beta * (1 + 2 * beta * n ** 0.75), "k^-β (1 + 2β n^(3/4)), Schur's test"


# --------------------------------------------------------------------------------------------
# Operations written in forward (torch.fx call_function / call_method targets)

_SHAPE_ONLY = {"flatten", "reshape", "view", "squeeze", "unsqueeze", "contiguous", "permute", "transpose", "t",
               "float", "double", "to", "clone", "detach", "getitem", "unflatten", "dropout"}
_ACTIVATIONS = {"relu": 1.0, "relu_": 1.0, "relu6": 1.0, "tanh": 1.0, "hardtanh": 1.0, "sigmoid": 0.25,
                "softplus": 1.0, "gelu": 1.13, "silu": 1.1}


def function_bound(name: str) -> tuple[float, str] | None:
    """The bound of an operation written in ``forward``, by its name, or None where unknown."""
    if name in _SHAPE_ONLY:
        return 1.0, "moves or drops entries" if name == "getitem" else ""
    if name in _ACTIVATIONS:
        return _ACTIVATIONS[name], ""
    return None


# --------------------------------------------------------------------------------------------
# Walking the network


def _rule(module: nn.Module) -> ModuleBound | None:
    return next((MODULE_BOUNDS[t] for t in type(module).__mro__ if t in MODULE_BOUNDS), None)


def module_bound(name: str, module: nn.Module, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> LayerBound:
    """The row of one module: its rule from :data:`MODULE_BOUNDS`, or unbounded, named."""
    rule = _rule(module)
    weight = getattr(module, "weight", None)
    weight_shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) and weight.dim() >= 2 else None
    stride = getattr(module, "stride", None)
    stride = tuple(stride) if isinstance(stride, Sequence) else ((stride,) if isinstance(stride, int) else None)
    if rule is None:
        bound, note = math.inf, f"no bound known for {type(module).__name__}: register one with register_bound"
    else:
        bound, note = rule(module, input_shape, output_shape)
    return LayerBound(name, type(module).__name__, weight_shape, stride, tuple(input_shape), float(bound), note)


def _shape(value: Any) -> tuple[int, ...] | None:
    meta = value.meta.get("tensor_meta") if hasattr(value, "meta") else None
    return tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else None


#: Operations that add or subtract their data inputs: the bound of the result is the sum of theirs.
_SUMS = {"add", "add_", "sub", "sub_", "iadd", "isub", operator.add.__name__, operator.sub.__name__}
#: Operations that concatenate their data inputs: the root of the sum of their squared bounds.
_CONCATENATIONS = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}


def _combined(function_name: str, branches: list[float]) -> tuple[float, float, str] | None:
    """``(row bound, bound from the input, note)`` of an operation on several data tensors, or None."""
    if function_name in _SUMS:
        return 1.0, sum(branches), f"sum of {len(branches)} branches: their bounds add"
    if function_name in _CONCATENATIONS:
        return 1.0, math.sqrt(sum(b * b for b in branches)), f"concatenates {len(branches)} branches"
    return None


def _rows_by_fx(model: nn.Module, example: torch.Tensor) -> list[LayerBound]:
    from torch.fx import GraphModule, Tracer
    from torch.fx.passes.shape_prop import ShapeProp

    class BoundTracer(Tracer):
        # a module with a bound rule is one step, even where fx could trace into it
        def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
            return _rule(module) is not None or super().is_leaf_module(module, qualified_name)

    graph_module = GraphModule(model, BoundTracer().trace(model))
    ShapeProp(graph_module).propagate(example)
    from_input: dict[Any, float] = {}  # data-path nodes: the bound from the network's input to them
    rows = []
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            if not from_input:  # the first input is the data; others (masks, flags) are not perturbed
                from_input[node] = 1.0
            continue
        data_inputs = [arg for arg in node.all_input_nodes if arg in from_input]
        if not data_inputs or node.op == "output" or _shape(node) is None:
            continue
        input_shape = _shape(data_inputs[0]) or ()
        function_name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        if len(data_inputs) > 1:
            combined = _combined(function_name, [from_input[arg] for arg in data_inputs])
            bound, reach, note = combined or (math.inf, math.inf, f"combines {len(data_inputs)} tensors by "
                                              f"{function_name}: no rule bounds it")
            row = LayerBound(node.name, function_name, None, None, input_shape, bound, note)
        else:
            if node.op == "call_module":
                row = module_bound(str(node.target), graph_module.get_submodule(node.target), input_shape, _shape(node))
            else:
                known = function_bound(function_name)
                bound, note = known if known else (math.inf, f"no bound known for the operation {function_name}")
                row = LayerBound(node.name, function_name, None, None, input_shape, bound, note)
            reach = row.bound * from_input[data_inputs[0]]
        row.from_input = reach
        from_input[node] = reach
        rows.append(row)
    return rows


def _rows_by_hooks(model: nn.Module, example: torch.Tensor) -> list[LayerBound]:
    seen: list[tuple[str, nn.Module, tuple[int, ...], tuple[int, ...]]] = []

    def record(name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                seen.append((name, module, tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))
        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules()
               if not list(module.children())]
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    rows = [module_bound(name, module, input_shape, output_shape) for name, module, input_shape, output_shape in seen]
    reach = 1.0
    for row in rows:  # module hooks see no graph: the modules are taken as a chain
        reach *= row.bound
        row.from_input = reach
    return rows


def lipschitz_bounds(model: nn.Module, input_shape: Sequence[int]) -> LipschitzTable:
    """Per-layer upper Lipschitz bounds of ``model`` at a per-example ``input_shape``, in forward order.

    Args:
        model: the network; evaluated as in eval mode (dropout off, batch norm on running statistics).
        input_shape: one example's shape, e.g. ``(3, 224, 224)`` or ``(784,)``; conv bounds depend on it.

    Returns:
        a :class:`LipschitzTable`; its ``network_bound`` bounds the network's Lipschitz constant,
        composed along the graph (sums where branches meet); infinite where a step has no rule.

    Raises:
        ValueError: an input shape the model cannot take.

    Reference: Szegedy et al. (2013), Section 4.3, Table 5.
    """
    input_shape = tuple(int(n) for n in input_shape)
    if not input_shape or any(n <= 0 for n in input_shape):
        raise ValueError(f"input_shape must be one example's positive sizes, e.g. (1, 28, 28); got {input_shape}")
    parameter = next(model.parameters(), None)
    example = torch.zeros((1, *input_shape), device=parameter.device if parameter is not None else "cpu",
                          dtype=parameter.dtype if parameter is not None else torch.float32)
    notes = []
    with untouched(model), torch.no_grad():
        try:
            rows, traced_with = _rows_by_fx(model, example), "torch.fx"
        except Exception as error:  # fx cannot trace data-dependent control flow; hooks still see modules
            notes.append(f"torch.fx could not trace the model ({type(error).__name__}), so only modules were "
                         "inspected: operations written as functions in forward are not in this table.")
            try:
                rows, traced_with = _rows_by_hooks(model, example), "module hooks"
            except RuntimeError as shape_error:
                raise ValueError(f"the model does not take inputs of shape {input_shape}: {shape_error}") from shape_error
    if any(math.isinf(row.bound) for row in rows):
        notes.append("Unbounded rows: " + ", ".join(f"{row.name} ({row.kind})" for row in rows if math.isinf(row.bound)))
    return LipschitzTable(rows, traced_with, notes)


__all__ = ["LayerBound", "LipschitzTable", "MODULE_BOUNDS", "function_bound", "lipschitz_bounds", "module_bound",
           "register_bound"]
