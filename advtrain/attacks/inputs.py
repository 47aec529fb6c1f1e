"""What every attack checks and sets up before it runs: inputs, bounds, logits, frozen parameters."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advtrain.box import Bounds, check_bounds
from advtrain.checks import check_finite, check_labels
from advtrain.layers import Head


def head_for_rows(head: Head, rows: torch.Tensor) -> Head:
    """The head for some rows (``rows``, indices that may repeat) of the batch it was made for.

    A head that takes tensors from the clean inputs besides the activations (the head of a layer
    with a skip connection around it, :func:`advtrain.layers.cut_at`) has ``select(rows)``; any
    other head treats every row alike and is returned as it is.
    """
    select = getattr(head, "select", None)
    return head if select is None else select(rows)


def check_attack_inputs(inputs: torch.Tensor, bounds: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
    """The box as flat ``(N, n)`` lower and upper tensors, after checking that ``inputs`` is a finite
    floating-point batch inside it.

    Raises:
        ValueError: not a floating-point ``(N, ...)`` tensor, non-finite values, malformed or NaN
            bounds, lower above upper, or inputs outside the box.
    """
    if not isinstance(inputs, torch.Tensor) or not inputs.dtype.is_floating_point or inputs.ndim < 2:
        raise ValueError(f"inputs must be a floating-point tensor (N, ...), got {getattr(inputs, 'dtype', type(inputs))} "
                         f"of shape {tuple(getattr(inputs, 'shape', ()))}")
    check_finite("inputs", inputs)
    bounds = check_bounds(bounds)
    try:
        lower, upper = (torch.as_tensor(b, dtype=inputs.dtype, device=inputs.device).expand_as(inputs).contiguous()
                        for b in bounds)
    except RuntimeError as error:
        raise ValueError(f"bounds must broadcast to the inputs' shape {tuple(inputs.shape)}: {error}") from error
    outside = (inputs < lower) | (inputs > upper)
    if outside.any():
        raise ValueError(
            f"inputs lie outside the box at {int(outside.sum())} values (inputs span "
            f"[{float(inputs.min()):.4g}, {float(inputs.max()):.4g}]); clamp them or widen bounds"
        )
    return lower.flatten(1), upper.flatten(1)


def check_logits(logits: torch.Tensor, count: int) -> int:
    """The number of classes, after checking that the head returned ``(count, C)`` logits, ``C >= 2``."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != count:
        raise ValueError(f"head must return logits (N, C) with N = {count}, got {tuple(getattr(logits, 'shape', ()))}")
    if logits.shape[1] < 2:
        raise ValueError(f"the model returns logits for {logits.shape[1]} class; an adversarial example needs a second "
                         "class to reach (a binary classifier must return two logits)")
    return logits.shape[1]


def model_dtype(head: Head) -> torch.dtype | None:
    """The floating dtype of the model's parameters (None for a callable without any)."""
    if isinstance(head, nn.Module):
        for parameter in head.parameters():
            if parameter.dtype.is_floating_point:
                return parameter.dtype
    return None


def as_labels(labels: object) -> torch.Tensor:
    """``labels`` as a tensor (a list or array of class indices is converted).

    Raises:
        ValueError: values that are not integer class indices.
    """
    if isinstance(labels, torch.Tensor):
        return labels
    try:
        tensor = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"labels must be a 1-D tensor (or list) of integer class indices, got {type(labels).__name__}") from error
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got {tensor.dtype} values")
    return tensor.long()


@dataclass
class CheckedBatch:
    """A batch an attack may work on: detached copies of inputs and labels, the flat box, the clean
    logits and the number of classes."""

    inputs: torch.Tensor
    labels: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    clean_logits: torch.Tensor
    num_classes: int


def checked_batch(head: Head, inputs: torch.Tensor, labels: torch.Tensor, bounds: Bounds) -> CheckedBatch:
    """Copy and check what an attack is given (:func:`check_attack_inputs`, :func:`check_logits`,
    labels in range, one per row) and run the head once on the clean inputs. Floating-point inputs
    of another precision than the model's (fp16 or fp64 into an fp32 model) are cast to the
    model's, so the result comes in the model's precision; labels given as a list become a tensor."""
    dtype = model_dtype(head)
    if isinstance(inputs, torch.Tensor) and inputs.dtype.is_floating_point and dtype is not None and inputs.dtype != dtype:
        inputs = inputs.to(dtype)
    inputs = inputs.detach().clone() if isinstance(inputs, torch.Tensor) else inputs
    labels = as_labels(labels)
    if isinstance(inputs, torch.Tensor):
        labels = labels.to(inputs.device)
    labels = labels.detach().clone()
    lower, upper = check_attack_inputs(inputs, bounds)
    with torch.no_grad():
        clean_logits = head(inputs)
    num_classes = check_logits(clean_logits, inputs.shape[0])
    check_labels("labels", labels, num_classes, count=inputs.shape[0])
    return CheckedBatch(inputs, labels, lower, upper, clean_logits, num_classes)
