"""``AdversarialEvaluation``: clean versus adversarial error at the end of validation and test."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, default_collate
from typing_extensions import override

from advtrain.attacks import Attack, AttackResult, BoxLBFGS, evaluation_search
from advtrain.evaluation_checks import CHECK_NAMES, FailedCheck, output_checks, result_checks, warn_failed
from advtrain.robustness import (Ensemble, RobustnessResult, check_threat_models, result_counts, result_from_counts,
                                 run_ensemble)
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
        examples: how many examples were evaluated.
        robust_error: norm to budget to the fraction misclassified as they are or broken by a
            perturbation within that budget found by any attack of the evaluation
            (:func:`advtrain.robustness.run_ensemble`); empty where no threat model was given.
        checks_failed: the names of the evaluation checks that failed
            (:mod:`advtrain.evaluation_checks`); empty when all passed.
        robustness: everything the ensemble found (which attack broke what, the whole-box error);
            ``None`` where no threat model was given.
    """

    clean_error: float
    adversarial_error: dict[float, float]
    mean_distortion: float
    success_rate: float
    attacked: int = 0
    examples: int = 0
    robust_error: dict[str, dict[float, float]] = field(default_factory=dict)
    checks_failed: list[str] = field(default_factory=list)
    robustness: RobustnessResult | None = None


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
        examples=count,
    )


def figure_grid(images: torch.Tensor, adversarial: torch.Tensor, magnify: float = 10.0) -> torch.Tensor:
    """The paper's Figure 5 layout: a row each of originals, perturbations ×``magnify`` (grey is
    zero) and adversarial images. Returns an image tensor ``(C, H, W)`` in [0, 1]."""
    from torchvision.utils import make_grid

    perturbation = (0.5 + magnify * (adversarial - images)).clamp(0, 1)
    tiles = torch.cat([images, perturbation, adversarial]).detach().cpu()
    return make_grid(tiles, nrow=images.shape[0], padding=2, pad_value=1.0)


def reduced_report(report: AdversarialReport, failed: dict[str, str],
                   reduce: Callable[[torch.Tensor], torch.Tensor]) -> tuple[AdversarialReport, dict[str, str]]:
    """The report of every process's examples from each one's own: every figure as a count of
    examples, summed by ``reduce`` (the strategy's sum over ranks) in one tensor. Checks failed on
    any rank are failed; a rank that did not see one names it with a line saying so."""
    examples = report.examples
    counts: dict[str, float] = {"attacked": report.attacked}
    found = 0 if math.isnan(report.success_rate) else round(report.success_rate * report.attacked)
    counts["found"], counts["distortion"] = found, 0.0 if math.isnan(report.mean_distortion) else report.mean_distortion * found
    robustness = report.robustness
    if robustness is not None:
        counts |= {f"ensemble {key}": value for key, value in result_counts(robustness).items()}
    counts["examples"], counts["clean"] = examples, round(report.clean_error * examples)
    counts |= {f"adv {budget!r}": round(error * examples) for budget, error in report.adversarial_error.items()}
    counts |= {f"check {name}": float(name in failed) for name in CHECK_NAMES}
    keys = sorted(counts)
    summed = dict(zip(keys, reduce(torch.tensor([counts[key] for key in keys], dtype=torch.float64)).tolist()))
    total = summed["examples"]
    merged = AdversarialReport(
        clean_error=summed["clean"] / total,
        adversarial_error={budget: summed[f"adv {budget!r}"] / total for budget in report.adversarial_error},
        mean_distortion=summed["distortion"] / summed["found"] if summed["found"] else math.nan,
        success_rate=summed["found"] / summed["attacked"] if summed["attacked"] else math.nan,
        attacked=round(summed["attacked"]), examples=round(total),
    )
    if robustness is not None:
        merged.robustness = result_from_counts({key.removeprefix("ensemble "): value for key, value in summed.items()
                                                if key.startswith("ensemble ")})
    failed = {name: failed.get(name, "failed on another process's share of the examples")
              for name in CHECK_NAMES if summed[f"check {name}"] > 0}
    return merged, failed


class AdversarialEvaluation(Callback):
    """At the end of validation and test: clean error, adversarial error at distortion budgets,
    and the mean minimal distortion, on a fixed seeded subset of that stage's data.

    Args:
        examples: size of the subset (the same examples every time).
        budgets: distortions (sqrt(mean r²), pixels in [0, 1]) at which to report the error, or threat
            models ``{"linf": [...], "l2": [...], "rms": [...]}`` (any of the norms of
            :mod:`advtrain.budget`), whose robust error is the worst case per example over the
            minimal search and the ensemble of :mod:`advtrain.robustness` (APGD with cross-entropy
            and targeted DLR, FAB-T, DDN in L2, Square) at each budget. A plain list is the search's figure alone.
        attack: the minimal search (default: with threat models
            :func:`~advtrain.attacks.box_lbfgs.evaluation_search`, the search followed by a walk
            along the decision boundary; with a plain list the paper's ``BoxLBFGS()``); a
            fixed-budget attack (PGD, a fast gradient step) is refused: its errors say nothing of
            other budgets.
        target: the attack's target policy: ``"untargeted"`` (default: one search per example
            towards whichever wrong class is nearest to hand), ``"nearest"`` (a search for every
            wrong class, the closest kept: as many times the cost, and the exact minimum over
            classes), or a targeted policy (``"random"``, ``"runner_up"``, ``"least_likely"``).
        module: the classifier as a named submodule of the LightningModule (default: its forward).
        bounds: the input box.
        figure_examples: columns of the Figure-5 image logged where the logger takes images; 0 for none.
        batch_keys: ``(inputs, labels)`` keys of dict dataset items (default: found by their usual
            names, or taken from another advtrain callback in the Trainer; see :mod:`advtrain.batch`).
        ensemble: the effort of the threat models' attacks (default: AutoAttack's standard,
            :class:`~advtrain.robustness.Ensemble`).
        every_n_epochs: evaluate at the end of every n-th validation epoch (test: always).
        seed: seeds the subset and every attack's random draws.

    Every evaluation runs the checks of :mod:`advtrain.evaluation_checks` (those on the ensemble's
    findings with threat models only): each failed check is an
    :class:`~advtrain.evaluation_checks.EvaluationCheckWarning` naming it, and
    ``adv_<stage>/checks_failed`` counts them (0 when all pass).

    Logs ``adv_<stage>/clean_err``, ``adv_<stage>/adv_err@<budget>`` (budgets as a list) or
    ``adv_<stage>/robust_err@<norm>=<epsilon>`` (threat models, e.g. ``adv_val/robust_err@linf=0.1``), and
    ``adv_<stage>/attacked``
    (how many correctly classified examples were attacked), ``adv_<stage>/checks_failed``;
    ``adv_<stage>/mean_distortion`` only where the search succeeded on some example; with threat
    models, the table ``adv_<stage>/robust_curve`` (norm, epsilon, robust error) where the logger
    takes tables (W&B).

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
        ensemble: Ensemble | None = None,
        every_n_epochs: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_count("examples", examples)
        check_count("every_n_epochs", every_n_epochs)
        self.threat_models = check_threat_models(budgets) if isinstance(budgets, Mapping) else {}
        if not self.threat_models and (not budgets or any(not b > 0 for b in budgets)):
            raise ValueError(f"budgets must be positive distortions, got {list(budgets)!r}")
        if attack is not None and getattr(attack, "fixed_budget", False):
            raise ValueError(f"attack must be a minimal search such as BoxLBFGS(); {attack!r} perturbs every example by "
                             "a fixed budget, so the errors at other budgets would be wrong. Give the budgets instead: "
                             "budgets={'linf': [0.1, 0.3]} (APGD and Square at each budget are part of the evaluation)")
        if target not in POLICIES:
            raise ValueError(f"target must be one of {POLICIES}, got {target!r}")
        self.examples = examples
        self.budgets = () if self.threat_models else tuple(float(b) for b in budgets)
        self.attack = attack if attack is not None else (evaluation_search() if self.threat_models else BoxLBFGS())
        self.target = target
        self.module = module
        self.bounds = bounds
        self.figure_examples = figure_examples
        self.batch_keys = check_batch_keys(batch_keys)
        self._keys: BatchKeys | None = self.batch_keys
        self.ensemble = ensemble if ensemble is not None else Ensemble()
        self.every_n_epochs = every_n_epochs
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

    def evaluate(self, classifier: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, *,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, warn: bool = True,
                 ) -> tuple[AdversarialReport, AttackResult]:
        """Clean predictions, the search on the correct ones, then the ensemble at each threat
        model's budgets, and the checks (model as in eval mode, everything put back); failed checks
        are warned about and named in the report. ``reduce`` sums a tensor over processes (DDP:
        each rank evaluated its share of the examples, and the report is of them all)."""
        with untouched(classifier), torch.inference_mode(False):
            with torch.no_grad():
                logits = classifier(inputs)
            correct = logits.argmax(1) == labels
            result = self.attack(classifier, inputs[correct], labels[correct], target=self.target, bounds=self.bounds)
            report = adversarial_report(result, correct.cpu(), self.budgets)
            failed = {check.name: check.message for check in output_checks(classifier, inputs, labels)}
            if self.threat_models:
                report.robustness = run_ensemble(classifier, inputs, labels, self.threat_models, self.bounds,
                                                 ensemble=self.ensemble, search=result, seed=self.seed, clean_logits=logits)
        if reduce is not None:
            report, failed = reduced_report(report, failed, reduce)
        if report.robustness is not None:
            report.robust_error = report.robustness.robust_error
            failed |= {check.name: check.message for check in result_checks(report.robustness)}
        report.checks_failed = list(failed)
        if warn:
            warn_failed([FailedCheck(name, message) for name, message in failed.items()], "AdversarialEvaluation")
        return report, result

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, loaders: Any) -> None:
        if trainer.sanity_checking or loaders is None:
            return
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        classifier = find_classifier(pl_module, self.module)
        inputs, labels = self.subset(loader)
        with torch.inference_mode(False):
            inputs, labels = inputs.clone().to(pl_module.device), labels.clone().to(pl_module.device)
        rank, world = trainer.global_rank, trainer.world_size
        reduce = None
        if world > 1:  # each rank its share of the subset; the counts summed over the ranks
            inputs, labels = inputs[rank::world], labels[rank::world]
            # on the module's device: NCCL reduces only CUDA tensors
            reduce = lambda counts: trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()  # noqa: E731
        report, result = self.evaluate(classifier, inputs, labels, reduce=reduce, warn=trainer.is_global_zero)
        self.reports[stage] = report
        pl_module.log(f"adv_{stage}/clean_err", report.clean_error)
        pl_module.log(f"adv_{stage}/attacked", float(report.attacked))
        pl_module.log(f"adv_{stage}/checks_failed", float(len(report.checks_failed)))
        if not math.isnan(report.mean_distortion):  # nothing found: no mean to log (0 would claim one)
            pl_module.log(f"adv_{stage}/mean_distortion", report.mean_distortion)
        for budget, error in report.adversarial_error.items():
            pl_module.log(f"adv_{stage}/adv_err@{budget:g}", error)
        for norm, errors in report.robust_error.items():
            for epsilon, error in errors.items():
                pl_module.log(f"adv_{stage}/robust_err@{norm}={epsilon:g}", error)
        self._log_curve(trainer, stage, report)
        self._log_figure(trainer, stage, result)

    def _log_curve(self, trainer: pl.Trainer, stage: str, report: AdversarialReport) -> None:
        """The robust error against the budget, one row per norm and budget, as a table where the
        logger takes tables (W&B: ``adv_<stage>/robust_curve``, to plot as a line per norm)."""
        logger = trainer.logger
        if not report.robust_error or logger is None or not hasattr(logger, "log_table"):
            return
        rows = [[norm, epsilon, error] for norm, errors in report.robust_error.items() for epsilon, error in sorted(errors.items())]
        logger.log_table(key=f"adv_{stage}/robust_curve", columns=["norm", "epsilon", "robust_error"], data=rows,
                         step=trainer.global_step)

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
        """Evaluate on the validation subset, every ``every_n_epochs`` epochs."""
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._run(trainer, pl_module, "val", trainer.val_dataloaders)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate on the test subset."""
        self._run(trainer, pl_module, "test", trainer.test_dataloaders)
