"""AdversarialEvaluation: the numbers, under inference mode, and what really reaches W&B offline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advtrain import Classifier
from advtrain.attacks import PGD, AttackResult
from advtrain.budget import perturbation_size
from advtrain.callbacks import AdversarialEvaluation
from advtrain.callbacks.adversarial_evaluation import adversarial_report, figure_grid
from advtrain.robustness import Ensemble
from wandb_records import history


def image_data(count: int = 64) -> TensorDataset:
    """Tiny 'images' (N, 1, 6, 6) in [0, 1]; the label is the brighter half."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, 1, 6, 6, generator=generator)
    labels = (images[:, 0, :3].mean((1, 2)) > images[:, 0, 3:].mean((1, 2))).long()
    return TensorDataset(images, labels)


def image_classifier() -> Classifier:
    torch.manual_seed(0)
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Sigmoid(), nn.Linear(16, 2)),
                      num_classes=2, lr=0.5, schedule="constant")


def test_report_counts_clean_mistakes_as_adversarial_at_every_budget() -> None:
    correct = torch.tensor([True, True, True, False])
    result = AttackResult(
        adversarial=torch.zeros(3, 4), perturbation=torch.zeros(3, 4), success=torch.tensor([True, True, False]),
        distortion=torch.tensor([0.05, 0.2, math.inf]), l2=torch.zeros(3), target=torch.zeros(3, dtype=torch.long),
        c=torch.zeros(3), iterations=torch.zeros(3, dtype=torch.long))
    report = adversarial_report(result, correct, budgets=(0.01, 0.1, 0.2, 1.0))
    assert report.clean_error == 0.25
    assert report.adversarial_error == {0.01: 0.25, 0.1: 0.5, 0.2: 0.75, 1.0: 0.75}  # "at most the budget": 0.2 counts
    assert report.mean_distortion == pytest.approx(0.125) and report.success_rate == pytest.approx(2 / 3)
    assert report.attacked == 3 and report.examples == 4


def test_figure_has_three_rows() -> None:
    grid = figure_grid(torch.zeros(4, 1, 6, 6), torch.ones(4, 1, 6, 6))
    assert grid.shape == (3, 3 * 6 + 4 * 2, 4 * 6 + 5 * 2)


def test_test_stage_runs_under_inference_mode(tmp_path: Path) -> None:
    callback = AdversarialEvaluation(examples=12, budgets=(0.1, 0.5))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, inference_mode=True, callbacks=[callback])
    metrics = trainer.test(image_classifier(), DataLoader(image_data(), batch_size=16), verbose=False)[0]
    report = callback.reports["test"]
    assert metrics["adv_test/clean_err"] == pytest.approx(report.clean_error)
    assert report.adversarial_error[0.1] <= report.adversarial_error[0.5] <= 1.0
    assert report.success_rate == 1.0 and report.mean_distortion > 0


def test_clean_and_adversarial_series_reach_the_offline_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger(project="advtrain-tests", save_dir=str(tmp_path), offline=True)
    data = image_data()
    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[AdversarialEvaluation(examples=64, budgets=(0.1, 0.5), figure_examples=4)])
    trainer.fit(image_classifier(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    wandb.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    series = history(run_file)
    assert len(series["adv_val/clean_err"]) == 2 and len(series["adv_val/adv_err@0.5"]) == 2
    assert all(0.0 <= value <= 1.0 for value in series["adv_val/adv_err@0.1"])
    assert series["adv_val/clean_err"] == pytest.approx(series["val/err"])  # the subset is the whole set
    assert series["adv_val/figure/_type"] == ["images/separated"] * 2  # the Figure-5 image, each epoch
    assert len(list(run_file.parent.glob("files/media/images/adv_val/figure_*.png"))) == 2


class CountingAttack:
    """Records the target policy and the rows of every call; returns a result with no success."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def __call__(self, head, inputs, labels, *, target, bounds):
        self.calls.append((target, len(labels)))
        count = len(labels)
        return AttackResult(adversarial=inputs, perturbation=torch.zeros_like(inputs),
                            success=torch.zeros(count, dtype=torch.bool), distortion=torch.full((count,), math.inf),
                            l2=torch.full((count,), math.inf), target=labels, c=torch.full((count,), math.nan),
                            iterations=torch.zeros(count, dtype=torch.long))


def test_defaults_to_one_untargeted_search_and_logs_nothing_as_zero_that_is_not(tmp_path: Path) -> None:
    attack = CountingAttack()
    callback = AdversarialEvaluation(examples=12, attack=attack, figure_examples=0)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[callback])
    trainer.test(image_classifier(), DataLoader(image_data(), batch_size=16), verbose=False)
    report = callback.reports["test"]
    assert attack.calls == [("untargeted", report.attacked)] and report.attacked > 0
    assert math.isnan(report.mean_distortion)  # nothing found
    assert "adv_test/mean_distortion" not in trainer.logged_metrics  # not logged as 0
    assert trainer.logged_metrics["adv_test/attacked"] == report.attacked
    with pytest.raises(ValueError, match="target must be one of"):
        AdversarialEvaluation(target="closest")


THREATS = {"linf": [0.02, 0.1, 1.0], "l2": [0.3, 1.0], "rms": [0.05]}


def trained_image_classifier() -> Classifier:
    classifier = image_classifier()
    images, labels = image_data().tensors
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.5)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(classifier(images), labels).backward()
        optimizer.step()
    return classifier


def test_threat_models_log_the_worst_case_robust_error_at_every_budget(tmp_path: Path) -> None:
    callback = AdversarialEvaluation(examples=32, budgets=THREATS, ensemble=Ensemble(steps=20, targets=1, queries=300))
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, inference_mode=True, callbacks=[callback])
    classifier = trained_image_classifier()
    metrics = trainer.test(classifier, DataLoader(image_data(), batch_size=16), verbose=False)[0]
    report = callback.reports["test"]
    for norm, epsilons in THREATS.items():
        errors = [report.robust_error[norm][epsilon] for epsilon in epsilons]
        for epsilon, error in zip(epsilons, errors):
            assert metrics[f"adv_test/robust_err@{norm}={epsilon:g}"] == pytest.approx(error)
        assert report.clean_error <= errors[0] and errors == sorted(errors)  # grows with the budget
    assert report.robust_error["linf"][1.0] == 1.0  # the whole box: every example broken
    assert report.clean_error < report.robust_error["linf"][0.1] < 1.0
    assert "adv_test/adv_err@0.05" not in metrics  # threat models replace the list of rms budgets


def test_the_robust_error_is_at_least_each_attack_alone() -> None:
    classifier = trained_image_classifier().model.eval()
    images, labels = image_data(32).tensors
    callback = AdversarialEvaluation(examples=32, budgets=THREATS, ensemble=Ensemble(steps=20, targets=1, queries=300))
    report, search = callback.evaluate(classifier, images, labels)
    correct = classifier(images).argmax(1) == labels
    for norm, epsilons in THREATS.items():
        for epsilon in epsilons:
            alone = PGD(epsilon=epsilon, norm=norm, steps=20)(classifier, images[correct], labels[correct],
                                                              generator=torch.Generator().manual_seed(1))
            pgd_error = 1 - float((correct.sum() - alone.success.sum()) / len(labels))
            found = search.success & (perturbation_size(search.perturbation, norm) <= epsilon)
            search_error = 1 - float((correct.sum() - found.sum()) / len(labels))
            assert report.robust_error[norm][epsilon] >= max(search_error, pgd_error) - 1 / 32  # PGD's seed differs


@pytest.mark.parametrize(("settings", "message"), [
    (dict(attack=PGD(epsilon=0.3)), r"attack must be a minimal search such as BoxLBFGS\(\); PGD\(.*\) perturbs every "
                                    r"example by a fixed budget.*budgets=\{'linf': \[0.1, 0.3\]\}"),
    (dict(budgets={"l1": [0.1]}), r"budgets key 'l1': a norm must be one of 'linf', 'l2', 'rms'"),
    (dict(budgets={"linf": []}), r"budgets\['linf'\] must be a non-empty list of budgets"),
    (dict(budgets={"linf": 0.1}), r"budgets\['linf'\] must be a non-empty list of budgets, got 0.1"),
    (dict(budgets={"l2": [0.5, 0.0]}), r"budgets\['l2'\] entry must be positive and finite, got 0.0"),
    (dict(budgets={}), r"budgets must name at least one norm"),
], ids=["fixed-budget-attack", "unknown-norm", "empty-list", "scalar", "zero", "no-norm"])
def test_bad_threat_models_and_fixed_budget_attacks_are_refused(settings, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdversarialEvaluation(**settings)


def test_robust_curve_and_check_count_reach_the_offline_wandb_run_every_n_epochs(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import wandb
    from pytorch_lightning.loggers import WandbLogger

    from advtrain.robustness import Ensemble

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = WandbLogger(project="advtrain-tests", save_dir=str(tmp_path), offline=True)
    data = image_data()
    callback = AdversarialEvaluation(examples=32, budgets={"linf": [0.05, 0.2], "l2": [0.5]}, figure_examples=0,
                                     every_n_epochs=2, ensemble=Ensemble(steps=10, targets=1, queries=50))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, logger=logger, enable_progress_bar=False, inference_mode=True,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(image_classifier(), DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    wandb.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    series = history(run_file)
    assert len(series["adv_val/clean_err"]) == 2  # epochs 2 and 4 of 4
    assert series["adv_val/checks_failed"] == [0.0, 0.0]
    assert series["adv_val/robust_curve/_type"] == ["table-file"] * 2
    tables = sorted(run_file.parent.glob("files/media/table/adv_val/robust_curve_*.table.json"))
    last = json.loads(tables[-1].read_text())
    assert last["columns"] == ["norm", "epsilon", "robust_error"]
    report = callback.reports["val"]
    assert last["data"] == [[norm, epsilon, pytest.approx(error)] for norm, errors in report.robust_error.items()
                            for epsilon, error in sorted(errors.items())]
    assert series["adv_val/robust_err@linf=0.2"][-1] == pytest.approx(report.robust_error["linf"][0.2])


def test_every_n_epochs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every_n_epochs must be a positive integer, got 0"):
        AdversarialEvaluation(every_n_epochs=0)
