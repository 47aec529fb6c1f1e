"""``LipschitzMonitor``: the per-layer upper Lipschitz bounds and the network's, logged as training goes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from advtrain.analysis import LipschitzTable, lipschitz_bounds
from advtrain.batch import BatchKeys, check_batch_keys, read_inputs, shared_batch_keys
from advtrain.checks import check_count
from advtrain.classifier_layer import find_classifier


class LipschitzMonitor(Callback):
    """Logs ``lipschitz/<layer>`` for each layer with weights, ``lipschitz/network_bound`` (composed
    along the graph: residual networks get a finite bound), ``lipschitz/log10_network_bound`` and
    ``lipschitz/unbounded_layers``, on a schedule.

    Args:
        input_shape: one example's shape (default: read from the first training batch).
        module: the classifier as a named submodule of the LightningModule (default: its forward).
        every_n_epochs: compute the bounds at the end of every this many training epochs (``None``:
            not by epoch).
        every_n_train_steps: compute them after every this many training steps as well (default
            ``None``: not by step).
        batch_keys: ``(inputs, labels)`` keys of a dict batch (default: found by their usual names,
            or taken from another advtrain callback in the Trainer; see :mod:`advtrain.batch`).

    Raises:
        ValueError: a schedule that is not a positive count, or no schedule at all.

    Example::

        >>> monitor = LipschitzMonitor(module="net", every_n_epochs=5)
        >>> monitor.every_n_epochs
        5

    Reference: Szegedy et al. (2013), Section 4.3.
    """

    def __init__(self, input_shape: Sequence[int] | None = None, *, module: str | None = None,
                 every_n_epochs: int | None = 1, every_n_train_steps: int | None = None,
                 batch_keys: Sequence[str] | None = None) -> None:
        super().__init__()
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_train_steps", every_n_train_steps)):
            if value is not None:
                check_count(name, value)
        if every_n_epochs is None and every_n_train_steps is None:
            raise ValueError("give every_n_epochs or every_n_train_steps (or both); with neither nothing is computed")
        self.input_shape = None if input_shape is None else tuple(int(n) for n in input_shape)
        self.module = module
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.batch_keys = check_batch_keys(batch_keys)
        self._keys: BatchKeys | None = self.batch_keys
        self.history: list[dict[str, float]] = []
        self.last_table: LipschitzTable | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, every_n_epochs=self.every_n_epochs,
                                        every_n_train_steps=self.every_n_train_steps)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Take the batch keys another advtrain callback was given, where this one has none."""
        self._keys = shared_batch_keys(trainer, self.batch_keys)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Learn one example's shape from the first batch."""
        if self.input_shape is None:
            self.input_shape = tuple(read_inputs(batch, self._keys).shape[1:])

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Compute and log the bounds every ``every_n_train_steps`` steps."""
        if self.every_n_train_steps is not None and trainer.global_step % self.every_n_train_steps == 0:
            self.measure(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute and log the bounds every ``every_n_epochs`` epochs."""
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure(trainer, pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> LipschitzTable | None:
        """Compute the table now, keep it in ``history`` and log it (None before any batch was seen)."""
        if self.input_shape is None:
            return None
        classifier = find_classifier(pl_module, self.module)
        table = lipschitz_bounds(classifier, self.input_shape)
        self.last_table = table
        metrics = {f"lipschitz/{row.name}": row.bound for row in table.rows
                   if row.weight_shape is not None and math.isfinite(row.bound)}
        bound = table.network_bound
        metrics["lipschitz/network_bound"] = bound
        metrics["lipschitz/log10_network_bound"] = math.log10(bound) if bound > 0 else -math.inf
        metrics["lipschitz/unbounded_layers"] = float(len(table.unbounded))
        self.history.append({"epoch": float(trainer.current_epoch), "step": float(trainer.global_step), **metrics})
        for name, value in metrics.items():
            if math.isfinite(value):
                pl_module.log(name, value)
        return table

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape, "history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.input_shape = None if state_dict["input_shape"] is None else tuple(state_dict["input_shape"])
        self.history = list(state_dict["history"])
