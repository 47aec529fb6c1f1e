"""Running code on a model without changing what the user set: :func:`untouched`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def untouched(model: object, *, freeze: bool = True) -> Iterator[None]:
    """Within the block the model runs as in eval mode (and, with ``freeze``, no parameter requires
    gradient); afterwards every module's own ``training`` flag, every parameter's ``requires_grad``
    and ``.grad`` and every buffer are as they were.

    Each module's flag is put back one by one, never through ``model.train(...)``, which would set
    every submodule alike (unfreezing a frozen batch norm) and call overridden ``train()`` methods.
    A callable that is not a module is run as it is.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(module, module.training) for module in model.modules()]
    parameters = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    for module, _ in modes:
        module.training = False
    if freeze:
        for parameter, _, _ in parameters:
            parameter.requires_grad_(False)
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for parameter, flag, grad in parameters:
            parameter.requires_grad_(flag)
            parameter.grad = grad
        with torch.no_grad():
            for buffer, saved in buffers:
                if not torch.equal(buffer, saved):
                    buffer.copy_(saved)


__all__ = ["untouched"]
