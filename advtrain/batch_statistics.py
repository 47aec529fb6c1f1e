"""Batch normalisation that keeps pool rows from training the layers below their layer.

In train mode a batch-norm layer normalises every row with statistics of the whole batch. Above a
cut where pool rows replace a layer's output, the clean rows' statistics depend on the layers below
the cut, so the pool rows' loss would reach those layers through the statistics (the pool rows
would no longer "train only the layers above"). :class:`SeparateBatchStatistics` prevents that:
while it is armed for ``m`` rows, every batch-norm layer in train mode that runs

- normalises the first ``N - m`` (clean) rows as usual, with their own statistics, which alone
  update the running statistics;
- normalises the last ``m`` (pool) rows with the clean rows' statistics, detached (the running
  statistics where every row is a pool row), then applies the layer's affine weights.

So the pool rows' loss reaches no parameter below the cut, the clean rows' loss does not depend
on the pool rows, and pool rows are normalised as clean data is.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norm_layers(model: nn.Module) -> list[str]:
    """Names of the batch-norm layers of ``model`` (BatchNorm1d/2d/3d, SyncBatchNorm and kin)."""
    return [name for name, module in model.named_modules() if isinstance(module, _BatchNorm)]


class SeparateBatchStatistics:
    """Hooks on every batch-norm layer of a model; inactive until :meth:`arm`, off again at :meth:`disarm`.

    Example::

        separate = SeparateBatchStatistics(model)
        separate.arm(8)        # the last 8 rows of what follows are pool rows
        ...                    # the forward pass above the cut
        separate.disarm()
        separate.remove()
    """

    def __init__(self, model: nn.Module) -> None:
        self.pool_rows = 0
        self._stash: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor] | None]] = {}
        self._handles = []
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                self._handles.append(module.register_forward_pre_hook(self._before))
                self._handles.append(module.register_forward_hook(self._after))

    def arm(self, pool_rows: int) -> None:
        """From now on, the last ``pool_rows`` rows reaching a batch-norm layer are pool rows."""
        self.pool_rows = pool_rows

    def disarm(self) -> None:
        """Back to ordinary batch normalisation."""
        self.pool_rows = 0
        self._stash.clear()

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _before(self, module: _BatchNorm, args: tuple) -> tuple | None:
        rows = self.pool_rows
        if not rows or not module.training or not args or not isinstance(args[0], torch.Tensor):
            return None
        inputs = args[0]
        if inputs.shape[0] <= rows:  # every row a pool row: let it run, then undo its statistics
            buffers = {name: buffer.clone() for name, buffer in module.named_buffers(recurse=False)}
            self._stash[id(module)] = (inputs, buffers)
            return None
        self._stash[id(module)] = (inputs, None)
        return (inputs[:-rows], *args[1:])

    def _after(self, module: _BatchNorm, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        stashed = self._stash.pop(id(module), None)
        if stashed is None:
            return None
        inputs, buffers = stashed
        rows = self.pool_rows
        if buffers is not None:  # restore the running statistics; normalise with them
            for name, buffer in module.named_buffers(recurse=False):
                buffer.copy_(buffers[name])
            return _normalise(module, inputs, *_running_or_own(module, inputs))
        clean, pool = inputs[:-rows], inputs[-rows:]
        return torch.cat([output, _normalise(module, pool, *_batch_statistics(clean, module.eps)).to(output.dtype)])


@torch.no_grad()
def _batch_statistics(rows: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``rows`` (dim 1), in float32, detached: from the
    mean and ``1 / sqrt(var + eps)`` that batch norm's own kernel computes, so that pool rows get
    the statistics the layer normalises the clean rows with, rounding included."""
    _, mean, inverse_std = torch.native_batch_norm(rows.float(), None, None, None, None, True, 0.0, eps)
    return mean, inverse_std.pow(-2) - eps


def _running_or_own(module: _BatchNorm, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if module.running_mean is not None and module.running_var is not None:
        return module.running_mean.detach().float(), module.running_var.detach().float()
    return _batch_statistics(inputs, module.eps)


def _normalise(module: _BatchNorm, rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``(rows - mean) / sqrt(var + eps)``, then the layer's affine weights, per channel (dim 1):
    one fused batch-norm call in eval form, with ``mean`` and ``var`` as its statistics."""
    weight = None if module.weight is None else module.weight.float()
    bias = None if module.bias is None else module.bias.float()
    out = nn.functional.batch_norm(rows.float(), mean, var, weight, bias, training=False, eps=module.eps)
    return out.to(rows.dtype)


__all__ = ["SeparateBatchStatistics", "batch_norm_layers"]
