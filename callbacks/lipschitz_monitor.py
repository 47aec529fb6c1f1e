"""``LipschitzMonitor``: the per-layer upper Lipschitz bounds and their product, logged as training goes."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from typing_extensions import override

from advtrain.analysis import LipschitzTable, lipschitz_bounds
from advtrain.checks import check_count


class LipschitzMonitor(Callback):
    """Logs ``lipschitz/<layer>`` for each layer with weights, ``lipschitz/product`` and
    ``lipschitz/log10_product`` at the end of every ``every_n_epochs``-th training epoch.

    Args:
        input_shape: one example's shape (default: read from the first training batch).
        module: the classifier as a named submodule of the LightningModule (default: its forward).
        every_n_epochs: how often to compute the bounds.
        input_key: where a dict batch keeps its inputs.

    Example::

        trainer = pl.Trainer(callbacks=[LipschitzMonitor(module="model")])

    Reference: Szegedy et al. (2013), Section 4.3.
    """

    def __init__(self, input_shape: Sequence[int] | None = None, *, module: str | None = None,
                 every_n_epochs: int = 1, input_key: str = "x") -> None:
        super().__init__()
        check_count("every_n_epochs", every_n_epochs)
        self.input_shape = None if input_shape is None else tuple(int(n) for n in input_shape)
        self.module = module
        self.every_n_epochs = every_n_epochs
        self.input_key = input_key
        self.history: list[dict[str, float]] = []
        self.last_table: LipschitzTable | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(module=self.module, every_n_epochs=self.every_n_epochs)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        """Learn one example's shape from the first batch."""
        if self.input_shape is None:
            inputs = batch[self.input_key] if isinstance(batch, Mapping) else batch[0]
            self.input_shape = tuple(inputs.shape[1:])

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Compute and log the bounds every ``every_n_epochs`` epochs."""
        if (trainer.current_epoch + 1) % self.every_n_epochs or self.input_shape is None:
            return
        classifier = pl_module if self.module is None else pl_module.get_submodule(self.module)
        table = lipschitz_bounds(classifier, self.input_shape)
        self.last_table = table
        metrics = {f"lipschitz/{row.name}": row.bound for row in table.rows
                   if row.weight_shape is not None and math.isfinite(row.bound)}
        metrics["lipschitz/product"] = table.product
        metrics["lipschitz/log10_product"] = math.log10(table.product) if table.product > 0 else -math.inf
        metrics["lipschitz/unbounded_layers"] = float(len(table.unbounded))
        self.history.append({"epoch": float(trainer.current_epoch), **metrics})
        for name, value in metrics.items():
            if math.isfinite(value):
                pl_module.log(name, value)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"input_shape": self.input_shape, "history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.input_shape = None if state_dict["input_shape"] is None else tuple(state_dict["input_shape"])
        self.history = list(state_dict["history"])
