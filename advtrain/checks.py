"""Checks of user input that fail with messages saying what was expected and what was given."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_finite(name: str, values: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``values`` holds NaN or infinity."""
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise ValueError(f"{name} holds {bad} non-finite values (NaN or inf); clean or drop those examples")


def check_labels(name: str, labels: torch.Tensor, num_classes: int, count: int | None = None) -> None:
    """Raise if ``labels`` is not a 1-D integer tensor of ``count`` classes in ``[0, num_classes)``."""
    if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer tensor of class indices, got {labels.dtype} of shape {tuple(labels.shape)}")
    if count is not None and labels.shape[0] != count:
        raise ValueError(f"{name} has {labels.shape[0]} entries but the inputs have {count}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got values from {int(labels.min())} to {int(labels.max())}"
        )


def check_shape(name: str, values: torch.Tensor, expected: Sequence[int]) -> None:
    """Raise if one example of the batch ``values`` does not have the shape ``expected``."""
    if tuple(values.shape[1:]) != tuple(expected):
        raise ValueError(
            f"{name} must have shape (N, {', '.join(map(str, expected))}), got {tuple(values.shape)}"
        )


def check_batch(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    input_shape: Sequence[int] | None = None,
) -> None:
    """All the checks a classification batch ``(inputs, labels)`` must pass."""
    if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise TypeError(f"a batch must be (inputs, labels) tensors, got ({type(inputs).__name__}, {type(labels).__name__})")
    if input_shape is not None:
        check_shape("inputs", inputs, input_shape)
    check_finite("inputs", inputs)
    check_labels("labels", labels, num_classes, count=inputs.shape[0])


def check_count(name: str, value: object, *, minimum: int = 1) -> None:
    """Raise ``ValueError`` unless ``value`` is an integer of at least ``minimum`` (1: positive)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}" if minimum else "a non-negative integer"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
