"""Reading inputs and labels out of a batch, the same way in every advtrain callback.

A batch is a tuple or list ``(inputs, labels, ...)`` or a dict. In a dict, the keys are found by
their usual names (``x``/``input``/``inputs``/``image``/``images``/``pixel_values``/``features`` and
``y``/``label``/``labels``/``target``/``targets``) or named once: give ``batch_keys=("img", "cls")``
to one advtrain callback and the others in the same Trainer read batches the same way
(:func:`shared_batch_keys`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

BatchKeys = tuple[str, str]

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "features")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def check_batch_keys(batch_keys: Sequence[str] | None) -> BatchKeys | None:
    """``batch_keys`` as a pair of strings, or None.

    Raises:
        ValueError: not two distinct strings.
    """
    if batch_keys is None:
        return None
    if isinstance(batch_keys, str) or len(batch_keys) != 2 or not all(isinstance(k, str) for k in batch_keys) \
            or batch_keys[0] == batch_keys[1]:
        raise ValueError(f"batch_keys must be two distinct keys (inputs, labels), e.g. ('image', 'label'); got {batch_keys!r}")
    return batch_keys[0], batch_keys[1]


def shared_batch_keys(trainer: Any, own: BatchKeys | None) -> BatchKeys | None:
    """``own`` where given, else the keys another callback of the trainer was given (the first
    that has ``batch_keys`` set), else None (detect them in each batch).

    Raises:
        ValueError: two callbacks were given different keys.
    """
    if own is not None:
        return own
    given = {tuple(keys) for callback in getattr(trainer, "callbacks", [])
             if (keys := getattr(callback, "batch_keys", None)) is not None}
    if len(given) > 1:
        raise ValueError(f"advtrain callbacks were given different batch_keys: {sorted(given)}; give one pair")
    return given.pop() if given else None


def _dict_keys(batch: Mapping, keys: BatchKeys | None, need_labels: bool) -> tuple[str, str | None]:
    present = ", ".join(map(str, batch)) or "none"
    if keys is not None:
        missing = [key for key in keys[: 2 if need_labels else 1] if key not in batch]
        if missing:
            raise ValueError(f"the dict batch has no key {', '.join(map(repr, missing))} (batch_keys={keys!r}); "
                             f"its keys are: {present}")
        return keys[0], keys[1] if need_labels else None
    inputs = [key for key in INPUT_KEYS if key in batch]
    labels = [key for key in LABEL_KEYS if key in batch]
    if len(inputs) != 1 or (need_labels and len(labels) != 1):
        raise ValueError(f"cannot tell the inputs and labels of a dict batch with keys: {present}; name them once with "
                         "batch_keys=(inputs_key, labels_key) on an advtrain callback (the others in the Trainer follow)")
    return inputs[0], labels[0] if need_labels else None


def read_batch(batch: Any, keys: BatchKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of a batch (see the module docstring).

    Raises:
        ValueError: a batch of another kind, keys that are missing or cannot be told apart, inputs
            that are not a tensor or labels that are not a ``(N,)`` tensor with one per input.
    """
    if isinstance(batch, Mapping):
        input_key, label_key = _dict_keys(batch, keys, need_labels=True)
        inputs, labels = batch[input_key], batch[label_key]
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        inputs, labels = batch[0], batch[1]
    else:
        raise ValueError(f"cannot read a batch of type {type(batch).__name__}: expected (inputs, labels, ...) or a dict")
    if not isinstance(inputs, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise ValueError(f"the batch's inputs and labels must be tensors, got {type(inputs).__name__} and "
                         f"{type(labels).__name__}")
    if labels.ndim != 1 or inputs.ndim < 1 or labels.shape[0] != inputs.shape[0]:
        raise ValueError(f"the batch's labels must be (N,) with one per input; got inputs {tuple(inputs.shape)} "
                         f"and labels {tuple(labels.shape)}")
    return inputs, labels


def read_inputs(batch: Any, keys: BatchKeys | None = None) -> torch.Tensor:
    """The inputs of a batch (labels not needed).

    Raises:
        ValueError: as :func:`read_batch`.
    """
    if isinstance(batch, Mapping):
        input_key, _ = _dict_keys(batch, keys, need_labels=False)
        inputs = batch[input_key]
    elif isinstance(batch, (tuple, list)) and batch:
        inputs = batch[0]
    elif isinstance(batch, torch.Tensor):
        inputs = batch
    else:
        raise ValueError(f"cannot read a batch of type {type(batch).__name__}: expected (inputs, ...) or a dict")
    if not isinstance(inputs, torch.Tensor):
        raise ValueError(f"the batch's inputs must be a tensor, got {type(inputs).__name__}")
    return inputs
