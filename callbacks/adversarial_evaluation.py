"""``AdversarialEvaluation``: clean versus adversarial error at the end of validation and test."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, default_collate
from typing_extensions import override

from advtrain.attacks import PGD, Attack, AttackResult, BoxLBFGS
from advtrain.budget import check_epsilon, check_norm, perturbation_size
from advtrain.attacks.targets import POLICIES, TargetPolicy
from advtrain.batch import BatchKeys, check_batch_keys, read_batch, shared_batch_keys
from advtrain.checks import check_count
from advtrain.classifier_layer import find_classifier
from advtrain.model_state import untouched


@dataclass
class AdversarialReport:
    """What one evaluation measured on its fixed subset.

    Attributes:
        clean_error: fraction misclassified as they are.
        adversarial_error: budget to the fraction misclassified as they are or with a perturbation of
            distortion (sqrt(mean r²)) at most that budget.
        mean_distortion: mean minimal distortion over the correctly classified examples the search
            succeeded on (``nan`` where it succeeded on none).
        success_rate: fraction of the correctly classified examples the search succeeded on
            (``nan`` where none was correctly classified).
        attacked: how many examples were attacked (the correctly classified ones).
        robust_error: norm to budget to the fraction misclassified as they are or broken by a
            perturbation within that budget found by any attack of the evaluation
            (:func:`robust_errors`); empty where no threat model was given.
    """

    clean_error: float
    adversarial_error: dict[float, float]
    mean_distortion: float
    success_rate: float
    attacked: int = 0
    robust_error: dict[str, dict[float, float]] = field(default_factory=dict)


def adversarial_report(result: AttackResult, correct: torch.Tensor, budgets: Sequence[float]) -> AdversarialReport:
    """Errors at each budget from an untargeted search run on the correctly classified examples."""
    count = correct.numel()
    distortion = torch.full((count,), math.inf)
    distortion[~correct] = 0.0
    distortion[correct] = torch.where(result.success, result.distortion, torch.full_like(result.distortion, math.inf)).cpu()
    errors = {float(b): float((distortion <= b).float().mean()) for b in budgets}
    found = result.success.cpu()
    return AdversarialReport(
        clean_error=float((~correct).float().mean()),
        adversarial_error=errors,
        mean_distortion=float(result.distortion[result.success].mean()) if bool(found.any()) else math.nan,
        success_rate=float(found.float().mean()) if found.numel() else math.nan,
        attacked=int(found.numel()),
    )


def robust_errors(classifier: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor,
                  search: AttackResult, threat_models: Mapping[str, Sequence[float]], bounds: tuple[float, float], *,
                  steps: int = 20, seed: int = 0) -> dict[str, dict[float, float]]:
    """The robust error at every budget of every threat model, worst case per example.

    An example counts as broken at ``(norm, epsilon)`` where it is misclassified as it is, or where
    any attack found a perturbation inside the box and within ``epsilon`` in ``norm``, verified by a
    fresh forward pass. The attacks are the minimal search already run (``search``, on the correctly
    classified rows), then PGD at that budget (``steps`` steps, random start) on the rows nothing
    has broken yet. Budgets are taken in increasing order, and a row broken at one budget stays
    broken at every larger one.
    """
    count = correct.numel()
    rows = correct.nonzero()[:, 0]  # the search's rows, in order
    generator = torch.Generator().manual_seed(seed)
    errors: dict[str, dict[float, float]] = {}
    for norm, epsilons in threat_models.items():
        sizes = torch.full((count,), math.inf, device=inputs.device)
        found = perturbation_size(search.perturbation, norm).where(search.success, torch.full_like(search.distortion, math.inf))
        sizes[rows] = found.to(sizes.device, sizes.dtype)
        broken = ~correct.to(inputs.device)
        errors[norm] = {}
        for epsilon in sorted(epsilons):
            broken = broken | (sizes <= epsilon)
            rest = (~broken).nonzero()[:, 0]
            if rest.numel():
                result = PGD(epsilon=epsilon, norm=norm, steps=steps)(classifier, inputs[rest], labels[rest], bounds=bounds,
                                                                      generator=generator)
                within = perturbation_size(result.perturbation, norm) <= epsilon * (1 + 1e-6)
                broken[rest[result.success & within]] = True
            errors[norm][float(epsilon)] = float(broken.float().mean())
    return errors


def check_threat_models(budgets: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    """``{norm: (epsilon, ...)}`` after checking every norm and budget.

    Raises:
        ValueError: an unknown norm (listing the norms), an empty list, a budget that is not positive
            and finite.
    """
    checked = {}
    for norm, epsilons in budgets.items():
        check_norm(norm, name=f"budgets key {norm!r}: a norm")
        if isinstance(epsilons, (int, float)) or not len(epsilons):
            raise ValueError(f"budgets[{norm!r}] must be a non-empty list of budgets, got {epsilons!r}")
        checked[norm] = tuple(check_epsilon(epsilon, name=f"budgets[{norm!r}] entry") for epsilon in epsilons)
    if not checked:
        raise ValueError("budgets must name at least one norm: {'linf': [...], 'l2': [...], 'rms': [...]}")
    return checked


def figure_grid(images: torch.Tensor, adversarial: torch.Tensor, magnify: float = 10.0) -> torch.Tensor:
    """The paper's Figure 5 layout: a row each of originals, perturbations ×``magnify`` (grey is
    zero) and adversarial images. Returns an image tensor ``(C, H, W)`` in [0, 1]."""
    from torchvision.utils import make_grid

    perturbation = (0.5 + magnify * (adversarial - images)).clamp(0, 1)
    tiles = torch.cat([images, perturbation, adversarial]).detach().cpu()
    return make_grid(tiles, nrow=images.shape[0], padding=2, pad_value=1.0)


class AdversarialEvaluation(Callback):
    """At the end of validation and test: clean error, adversarial error at distortion budgets,
    and the mean minimal distortion, on a fixed seeded subset of that stage's data.

    Args:
        examples: size of the subset (the same examples every time).
        budgets: distortions (sqrt(mean r²), pixels in [0, 1]) at which to report the error, or threat
            models ``{"linf": [...], "l2": [...], "rms": [...]}`` (any of the norms of
            :mod:`advtrain.budget`), whose robust error is the worst case per example over the
            minimal search and PGD at each budget (:func:`robust_errors`).
        attack: the minimal search (default: ``BoxLBFGS()``); a fixed-budget attack (PGD, a fast
            gradient step) is refused: its errors say nothing of other budgets.
        target: the attack's target policy: ``"untargeted"`` (default: one search per example
            towards whichever wrong class is nearest to hand), ``"nearest"`` (a search for every
            wrong class, the closest kept: as many times the cost, and the exact minimum over
            classes), or a targeted policy (``"random"``, ``"runner_up"``, ``"least_likely"``).
        module: the classifier as a named submodule of the LightningModule (default: its forward).
        bounds: the input box.
        figure_examples: columns of the Figure-5 image logged where the logger takes images; 0 for none.
        batch_keys: ``(inputs, labels)`` keys of dict dataset items (default: found by their usual
            names, or taken from another advtrain callback in the Trainer; see :mod:`advtrain.batch`).
        seed: seeds the subset.

    Logs ``adv_<stage>/clean_err``, ``adv_<stage>/adv_err@<budget>`` (budgets as a list) or
    ``adv_<stage>/robust_err@<norm>=<epsilon>`` (threat models, e.g. ``adv_val/robust_err@linf=0.1``), and
    ``adv_<stage>/attacked``
    (how many correctly classified examples were attacked); ``adv_<stage>/mean_distortion`` only
    where the search succeeded on some example.

    Example::

        trainer = pl.Trainer(callbacks=[AdversarialEvaluation(examples=200)], logger=WandbLogger(offline=True))

    Reference: Szegedy et al. (2013), Section 4.1 and Figure 5.
    """

    def __init__(
        self,
        *,
        examples: int = 100,
        budgets: Sequence[float] | Mapping[str, Sequence[float]] = (0.05, 0.1),
        attack: Attack | None = None,
        target: TargetPolicy = "untargeted",
        module: str | None = None,
        bounds: tuple[float, float] = (0.0, 1.0),
        figure_examples: int = 8,
        batch_keys: tuple[str, str] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_count("examples", examples)
        self.threat_models = check_threat_models(budgets) if isinstance(budgets, Mapping) else {}
        if not self.threat_models and (not budgets or any(not b > 0 for b in budgets)):
            raise ValueError(f"budgets must be positive distortions, got {list(budgets)!r}")
        if attack is not None and getattr(attack, "fixed_budget", False):
            raise ValueError(f"attack must be a minimal search such as BoxLBFGS(); {attack!r} perturbs every example by "
                             "a fixed budget, so the errors at other budgets would be wrong. Give the budgets instead: "
                             "budgets={'linf': [0.1, 0.3]} (PGD at each budget is part of the evaluation)")
        if target not in POLICIES:
            raise ValueError(f"target must be one of {POLICIES}, got {target!r}")
        self.examples = examples
        self.budgets = () if self.threat_models else tuple(float(b) for b in budgets)
        self.attack = attack if attack is not None else BoxLBFGS()
        self.target = target
        self.module = module
        self.bounds = bounds
        self.figure_examples = figure_examples
        self.batch_keys = check_batch_keys(batch_keys)
        self._keys: BatchKeys | None = self.batch_keys
        self.seed = seed
        self.reports: dict[str, AdversarialReport] = {}

    def subset(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed seeded subset of a loader's dataset."""
        dataset = loader.dataset
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[: self.examples]
        return read_batch(default_collate([dataset[int(i)] for i in order]), self._keys)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Take the batch keys another advtrain callback was given, where this one has none."""
        self._keys = shared_batch_keys(trainer, self.batch_keys)

    def evaluate(self, classifier: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[AdversarialReport, AttackResult]:
        """Clean predictions, the search on the correct ones, then PGD at each threat model's budgets
        on the rows nothing has broken (model as in eval mode, everything put back)."""
        with untouched(classifier):
            with torch.inference_mode(False), torch.no_grad():
                correct = classifier(inputs).argmax(1) == labels
            result = self.attack(classifier, inputs[correct], labels[correct], target=self.target, bounds=self.bounds)
            report = adversarial_report(result, correct.cpu(), self.budgets)
            if self.threat_models:
                with torch.inference_mode(False):
                    report.robust_error = robust_errors(classifier, inputs, labels, correct, result, self.threat_models,
                                                        self.bounds, seed=self.seed)
        return report, result

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, loaders: Any) -> None:
        if trainer.sanity_checking or loaders is None:
            return
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        classifier = find_classifier(pl_module, self.module)
        inputs, labels = self.subset(loader)
        with torch.inference_mode(False):
            inputs, labels = inputs.clone().to(pl_module.device), labels.clone().to(pl_module.device)
        report, result = self.evaluate(classifier, inputs, labels)
        self.reports[stage] = report
        pl_module.log(f"adv_{stage}/clean_err", report.clean_error)
        pl_module.log(f"adv_{stage}/attacked", float(report.attacked))
        if not math.isnan(report.mean_distortion):  # nothing found: no mean to log (0 would claim one)
            pl_module.log(f"adv_{stage}/mean_distortion", report.mean_distortion)
        for budget, error in report.adversarial_error.items():
            pl_module.log(f"adv_{stage}/adv_err@{budget:g}", error)
        for norm, errors in report.robust_error.items():
            for epsilon, error in errors.items():
                pl_module.log(f"adv_{stage}/robust_err@{norm}={epsilon:g}", error)
        self._log_figure(trainer, stage, result)

    def _log_figure(self, trainer: pl.Trainer, stage: str, result: AttackResult) -> None:
        logger = trainer.logger
        shown = min(self.figure_examples, len(result))
        if shown == 0 or logger is None or not hasattr(logger, "log_image"):
            return
        originals = result.adversarial[:shown] - result.perturbation[:shown]
        grid = figure_grid(originals, result.adversarial[:shown])
        caption = "rows: original, perturbation ×10, adversarial; targets " + ", ".join(str(int(t)) for t in result.target[:shown])
        logger.log_image(key=f"adv_{stage}/figure", images=[grid], caption=[caption], step=trainer.global_step)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate on the validation subset."""
        self._run(trainer, pl_module, "val", trainer.val_dataloaders)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate on the test subset."""
        self._run(trainer, pl_module, "test", trainer.test_dataloaders)
