"""Layer k of a classifier, defined once: which module the classifier is, which layer, where the
model is cut, the layer's box, and how code runs on the model without changing what the user set.

:func:`find_classifier` resolves the classifier inside a LightningModule (itself, or the submodule
named by ``module``) with one error that lists what exists. :class:`ClassifierLayer` resolves one
layer of it on example inputs: an unknown name is refused with the layers that exist, a layer a skip
connection bypasses with the enclosing ones that work, and its box follows one policy (the user's,
else the range the layer's type implies, else unbounded; clean activations outside it widen it,
with a warning, except at the input, where they are an error). :func:`untouched` runs a block as in
eval mode and puts back every submodule's own mode, every parameter's ``requires_grad`` and
``.grad`` and every buffer, so a frozen batch norm stays frozen and a module that overrides
``train()`` is never asked to change. The callbacks, the evaluation, the analyses, the recipes and
the benchmarks all use these.

Reference: Szegedy et al. (2013), Section 4.2 (adversarial examples on each layer's outputs).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from advtrain.box import Bounds, describe_bounds
from advtrain.checks import check_finite
from advtrain.layers import (INPUT, Head, LayerCut, LayerCutError, check_layer, cut_at, enclosing_modules, layer_bounds,
                             layer_names)
from advtrain.model_state import untouched


def find_classifier(owner: nn.Module, module: str | None) -> nn.Module:
    """The classifier: ``owner`` itself where ``module`` is None, else its submodule named ``module``.

    Raises:
        ValueError: ``module`` names no submodule of ``owner`` (the message lists its submodules).
    """
    if module is None:
        return owner
    if not isinstance(module, str) or not module:
        raise ValueError(f"module must be the name of a submodule (e.g. 'net') or None, got {module!r}")
    try:
        return owner.get_submodule(module)
    except AttributeError as error:
        names = ", ".join(name for name, _ in owner.named_modules() if name and name.count(".") < 2) or "none"
        raise ValueError(f"module `{module}` is not a submodule of {type(owner).__name__}; its submodules are: "
                         f"{names}") from error


def trainable_above(cut: LayerCut, inputs: torch.Tensor) -> list[str]:
    """Names of the trainable parameters (``requires_grad``) that the logits depend on through the
    layer's output: the parameters an adversarial example at the layer can train."""
    model = cut.model
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        return []
    with untouched(model, freeze=False), torch.enable_grad():
        activations = cut.bottom(inputs).detach().requires_grad_(True)
        logits = cut.head_for(inputs)(activations)
        gradients = torch.autograd.grad(logits.sum(), [p for _, p in named], allow_unused=True)
    return [name for (name, _), gradient in zip(named, gradients) if gradient is not None]


class ClassifierLayer:
    """One layer of a classifier, resolved, cut and boxed once on example inputs.

    Args:
        classifier: the model from inputs to logits.
        name: ``"input"`` or a layer of :func:`advtrain.layers.layer_names`.
        example_inputs: a batch the classifier takes (two or more different rows, to test for
            tensors that bypass the layer).
        bounds: the layer's box; default ``(0, 1)`` for ``"input"``, the range the layer's type or last
            operation implies (:func:`advtrain.layers.known_bounds`), else unbounded.

    Raises:
        ValueError: an unknown layer (listing the layers), a malformed, inverted or empty box, non-finite
            or non-floating inputs for an input layer, example inputs outside the input box.
        LayerCutError: a layer that runs more or less than once, or that a skip connection bypasses
            (naming the enclosing layers that can be used).

    Example::

        >>> import torch, torchvision
        >>> resnet = torchvision.models.resnet18(num_classes=10)
        >>> layer = ClassifierLayer(resnet, "layer2", torch.rand(2, 3, 32, 32))
        >>> layer.box
        (0.0, inf)
    """

    def __init__(self, classifier: nn.Module, name: str, example_inputs: torch.Tensor, *, bounds: Bounds | None = None) -> None:
        if not isinstance(name, str):
            raise ValueError(f"a layer name must be a string, got {name!r}")
        self.classifier = classifier
        self.name = name
        with untouched(classifier), torch.no_grad():
            if name == INPUT:
                if not example_inputs.dtype.is_floating_point:
                    raise ValueError(f"an input pool needs floating-point inputs, got {example_inputs.dtype} (token ids?); "
                                     "put the pool on a layer after the embedding instead")
                check_finite("the batch's inputs", example_inputs)
                self.cut = cut_at(classifier, name)
            else:
                check_layer(classifier, name, example_inputs)
                self.cut = cut_at(classifier, name, example_inputs)
                self._refuse_bypass(example_inputs)
            activations = self.cut.bottom(example_inputs)
        # after the layer check on the example inputs, whose error lists the layers that run
        self.box = layer_bounds(classifier, [name], overrides=None if bounds is None else {name: bounds})[name]
        self._widened = False
        self._check_box(activations)

    def _refuse_bypass(self, inputs: torch.Tensor) -> None:
        if not self.cut.crosses(inputs):
            return
        names = layer_names(self.classifier, inputs)
        clean = [name for name in enclosing_modules(self.name)
                 if name in names and not cut_at(self.classifier, name, inputs).crosses(inputs)]
        instead = f"; layers enclosing it that can be used: {', '.join(clean)}" if clean else ""
        raise LayerCutError(f"tensors computed below layer `{self.name}` reach the logits around it (a skip connection): "
                            f"the pool rows' gradient would train the layers below through them{instead}")

    def _check_box(self, activations: torch.Tensor) -> None:
        lower, upper = (torch.as_tensor(bound, dtype=activations.dtype, device=activations.device) for bound in self.box)
        try:
            outside = (activations < lower) | (activations > upper)
        except RuntimeError as error:
            raise ValueError(f"bounds for layer `{self.name}` must broadcast to its output of shape "
                             f"{tuple(activations.shape[1:])}: {error}") from error
        if self.name == INPUT and bool(outside.any()):
            raise ValueError(f"the inputs span [{float(activations.min()):.4g}, {float(activations.max()):.4g}], outside "
                             f"the input box {describe_bounds(self.box)}; pass bounds={{'input': (low, high)}} with the "
                             "range your inputs can take (e.g. normalised images)")
        if bool(outside.any()):
            self._warn_widened(int(outside.sum()))

    def _warn_widened(self, count: int) -> None:
        if not self._widened:
            self._widened = True
            warnings.warn(f"layer `{self.name}`: {count} clean activations lie outside its box {describe_bounds(self.box)}; "
                          f"the box is widened to hold the activations attacked. Pass bounds={{'{self.name}': (low, high)}} "
                          "to set it", stacklevel=3)

    def bottom(self, inputs: torch.Tensor) -> torch.Tensor:
        """The layer's output for ``inputs`` (run it inside :func:`untouched` for eval mode)."""
        return self.cut.bottom(inputs)

    def head_for(self, inputs: torch.Tensor) -> Head:
        """The head from the layer's output to the logits for these ``inputs`` (:meth:`LayerCut.head_for`)."""
        return self.cut.head_for(inputs)

    def box_holding(self, activations: torch.Tensor) -> Bounds:
        """The layer's box, widened where needed to hold the clean ``activations`` about to be attacked."""
        lower, upper = (torch.as_tensor(bound, dtype=activations.dtype, device=activations.device) for bound in self.box)
        outside = (activations < lower) | (activations > upper)
        if not bool(outside.any()):
            return tuple(b.to(activations.device, activations.dtype) if isinstance(b, torch.Tensor) else b for b in self.box)
        self._warn_widened(int(outside.sum()))
        return torch.minimum(lower, activations), torch.maximum(upper, activations)

    def trainable_above(self, inputs: torch.Tensor) -> list[str]:
        """The trainable parameters an adversarial example at this layer trains (:func:`trainable_above`)."""
        return trainable_above(self.cut, inputs)

    def __repr__(self) -> str:
        return f"ClassifierLayer({self.name!r}, box={describe_bounds(self.box)})"


__all__ = ["ClassifierLayer", "find_classifier", "trainable_above"]
