"""``Classifier``: a LightningModule around any classifier ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn

from advtrain.checks import check_batch
from advtrain.layers import INPUT, check_layer_name
from advtrain.metrics import ErrorRate
from advtrain.models import PaperModel

Optimizer = Literal["sgd", "adam"]
Schedule = Literal["cosine", "constant", "triangular"]


def layer_penalty(module: nn.Module, strength: float) -> torch.Tensor:
    """``λ·Σw²/k``: the squared weights of a layer over its number of units ``k`` (biases free)."""
    weight = module.weight
    units = weight.shape[0]  # out_features of a Linear, out_channels of a convolution
    return strength * weight.pow(2).sum() / units


class Classifier(pl.LightningModule):
    """Trains a classifier with cross-entropy plus per-layer L2 penalties; logs error rates.

    Logs ``train/loss``, ``train/err``, ``val/err``, ``val/loss`` and ``test/err`` (fractions)
    through torchmetrics. Every batch is checked: shape, finite pixels, labels in range.

    Args:
        model: any module from inputs to logits ``(N, num_classes)``.
        num_classes: number of classes.
        penalties: layer name (as in ``model.named_modules()``) to λ; the penalty is ``λ·Σw²/k``.
        input_shape: shape of one input; batches of another shape are refused. ``None`` accepts any.
        frozen: layers whose parameters are not trained (e.g. a pretrained encoder).
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adam"``.
        lr: peak learning rate.
        momentum: SGD momentum.
        schedule: ``"cosine"`` decays the rate to 0 over the run; ``"constant"`` keeps it;
            ``"triangular"`` (fast adversarial training's) climbs linearly from 0 to it over the
            first 2/5 of the steps, then falls linearly to 0.

    Raises:
        ValueError: a penalty or frozen layer that the model lacks, or an unknown optimizer.

    Example::

        from advtrain import Classifier
        from advtrain.models import fc100_100_10
        classifier = Classifier.from_paper_model(fc100_100_10(), lr=0.1)

    Reference: Szegedy et al. (2013), Table 1.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int = 10,
        penalties: Mapping[str, float] | None = None,
        input_shape: Sequence[int] | None = None,
        frozen: Sequence[str] = (),
        optimizer: Optimizer = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        schedule: Schedule = "cosine",
    ) -> None:
        super().__init__()
        modules = dict(model.named_modules())
        penalties = dict(penalties or {})
        for name in [*penalties, *frozen]:
            if name == INPUT:
                raise ValueError(f"`{name}` is the input, not a layer with parameters; name a layer of the model")
            check_layer_name(model, name)
        for name in penalties:
            if not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
                raise ValueError(f"layer `{name}` ({type(modules[name]).__name__}) has no weight to penalise")
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if schedule not in ("cosine", "constant", "triangular"):
            raise ValueError(f"schedule must be 'cosine', 'constant' or 'triangular', got {schedule!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.model = model
        self.num_classes = num_classes
        self.penalties = penalties
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.frozen = tuple(frozen)
        for name in self.frozen:
            modules[name].requires_grad_(False)
        self.save_hyperparameters(ignore=["model"])
        self.train_error = ErrorRate()
        self.val_error = ErrorRate()
        self.test_error = ErrorRate()

    @classmethod
    def from_paper_model(cls, paper_model: PaperModel, *, penalty_scale: float = 1.0, **kwargs: Any) -> "Classifier":
        """A classifier for one of :mod:`advtrain.models`, with its penalties (each λ times
        ``penalty_scale``) and input shape."""
        kwargs.setdefault("penalties", {layer: penalty_scale * strength for layer, strength in paper_model.penalties.items()})
        kwargs.setdefault("input_shape", paper_model.input_shape)
        kwargs.setdefault("frozen", paper_model.frozen)
        return cls(paper_model.module, **kwargs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped model."""
        return self.model(inputs)

    def penalty(self) -> torch.Tensor:
        """The sum of the per-layer weight penalties."""
        modules = dict(self.model.named_modules())
        total = torch.zeros((), device=self.device)
        for name, strength in self.penalties.items():
            total = total + layer_penalty(modules[name], strength)
        return total

    def _logits_and_labels(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"Classifier expects batches of (inputs, labels), got {type(batch).__name__}")
        inputs, labels = batch
        check_batch(inputs, labels, num_classes=self.num_classes, input_shape=self.input_shape)
        logits = self(inputs)
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"the model must return logits (N, {self.num_classes}), got {tuple(logits.shape)}")
        return logits, labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy plus the penalties."""
        logits, labels = self._logits_and_labels(batch)
        loss = nn.functional.cross_entropy(logits, labels) + self.penalty()
        self.train_error(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/err", self.train_error, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation error and loss."""
        logits, labels = self._logits_and_labels(batch)
        self.val_error(logits, labels)
        self.log("val/loss", nn.functional.cross_entropy(logits, labels))
        self.log("val/err", self.val_error, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Test error."""
        logits, labels = self._logits_and_labels(batch)
        self.test_error(logits, labels)
        self.log("test/err", self.test_error)

    def configure_optimizers(self) -> Any:
        """The optimizer over the trainable parameters, with its schedule."""
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        if self.hparams.optimizer == "sgd":
            optimizer = torch.optim.SGD(parameters, lr=self.hparams.lr, momentum=self.hparams.momentum, nesterov=self.hparams.momentum > 0)
        else:
            optimizer = torch.optim.Adam(parameters, lr=self.hparams.lr)
        if self.hparams.schedule == "constant":
            return optimizer
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        if self.hparams.schedule == "triangular":
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: triangular(step + 1, steps))
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def triangular(step: int, steps: int, peak: float = 0.4) -> float:
    """The learning rate's factor at ``step`` of ``steps`` in fast adversarial training's cyclic
    schedule (Wong et al., 2020): linear from 0 to 1 at ``peak`` of the steps, then to 0 at the end."""
    top = peak * steps
    return step / top if step <= top else max(0.0, (steps - step) / (steps - top))
