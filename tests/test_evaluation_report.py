"""The robustness report outside training: ``evaluate_robustness``, its files, and ``advtrain evaluate``."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from advtrain.attacks import PGD
from advtrain.evaluation import evaluate_robustness, write_report
from advtrain.evaluation_checks import EvaluationCheckWarning
from advtrain.models import build_model
from advtrain.robustness import Ensemble, RobustnessResult, combine
from test_robustness_ensemble import QUICK, Quantised, trained_mlp

BUDGETS = {"linf": [0.05, 0.1, 0.2], "l2": [0.5, 1.0]}


def test_combined_chunks_count_every_example_once() -> None:
    def part(examples: int, error: float, box: float) -> RobustnessResult:
        broken = torch.arange(examples) < round(error * examples)
        return RobustnessResult(examples=examples, clean_error=0.0, robust_error={"linf": {0.1: error}},
                                first_attack_error={"linf": {0.1: error}}, whole_box_error=box,
                                broken_by={"linf": {0.1: {"apgd-ce": int(broken.sum())}}}, broken={"linf": {0.1: broken}})

    total = combine([part(30, 0.5, 1.0), part(10, 0.1, 0.9)])
    assert total.examples == 40 and total.robust_error["linf"][0.1] == pytest.approx(16 / 40)
    assert total.broken_by["linf"][0.1] == {"apgd-ce": 16} and total.broken["linf"][0.1].sum() == 16
    assert total.whole_box_error == pytest.approx((30 + 9) / 40)
    with pytest.raises(ValueError, match="at least one result"):
        combine([])


def test_counts_round_trip_every_field_and_add_up_across_parts() -> None:
    """What ranks and chunks add up: every field survives counts and back, and sums are weighted."""
    from advtrain.robustness import result_counts, result_from_counts

    def part(examples: int, clean: int, box: float) -> RobustnessResult:
        return RobustnessResult(
            examples=examples, clean_error=clean / examples, whole_box_error=box,
            robust_error={"l2": {1.5: 7 / examples, 0.5: 4 / examples}, "linf": {0.1: 6 / examples}},
            first_attack_error={"l2": {1.5: 5 / examples, 0.5: 3 / examples}, "linf": {0.1: 2 / examples}},
            broken_by={"l2": {1.5: {"search": 2, "smaller budget": 1}, 0.5: {"apgd-ce": 1}},
                       "linf": {0.1: {"square": 3}}})

    one = part(20, 3, 0.95)
    back = result_from_counts(result_counts(one))
    assert back.examples == 20 and back.clean_error == pytest.approx(3 / 20)
    assert back.whole_box_error == pytest.approx(0.95)
    assert back.robust_error == {"l2": {0.5: pytest.approx(4 / 20), 1.5: pytest.approx(7 / 20)},
                                 "linf": {0.1: pytest.approx(6 / 20)}}
    assert list(back.robust_error["l2"]) == [0.5, 1.5]  # budgets in increasing order, as run
    assert back.first_attack_error == {"l2": {0.5: pytest.approx(3 / 20), 1.5: pytest.approx(5 / 20)},
                                       "linf": {0.1: pytest.approx(2 / 20)}}
    assert back.broken_by == one.broken_by
    total = combine([one, part(10, 1, math.nan)])
    assert total.examples == 30 and total.clean_error == pytest.approx(4 / 30)
    assert math.isnan(total.whole_box_error)  # one part without the whole-box check: no figure
    assert total.robust_error["l2"][1.5] == pytest.approx(14 / 30)
    assert total.first_attack_error["linf"][0.1] == pytest.approx(4 / 30)
    assert total.broken_by["l2"][1.5] == {"search": 4, "smaller budget": 2}
    assert math.isnan(result_counts(part(10, 1, math.nan))["whole box"])
    with pytest.raises(ValueError, match="^combine needs at least one result with examples$"):
        combine([RobustnessResult(examples=0, clean_error=0.0)])


def test_report_in_chunks_is_the_worst_case_per_example_and_written_as_json_and_png(tmp_path: Path) -> None:
    model, inputs, labels = trained_mlp()
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=32)
    report = evaluate_robustness(model, loader, BUDGETS, examples=80, chunk_size=30, ensemble=QUICK)
    assert report.examples == 80 and report.checks_failed == []
    correct = model(inputs[:80]).argmax(1) == labels[:80]
    assert report.clean_error == pytest.approx(float((~correct).float().mean()))
    for norm, epsilons in BUDGETS.items():
        errors = [report.robust_error[norm][f"{e:g}"] for e in epsilons]
        assert errors == sorted(errors) and errors[0] >= report.clean_error
        for epsilon, error in zip(epsilons, errors):
            alone = PGD(epsilon=epsilon, norm=norm, steps=20)(model, inputs[:80], labels[:80],
                                                              generator=torch.Generator().manual_seed(5))
            pgd_error = float(((model(alone.attempt).argmax(1) != labels[:80]) | ~correct).float().mean())
            assert error >= pgd_error - 2 / 80  # the ensemble at least matches plain PGD (seeds differ)
            assert sum(report.broken_by[norm][f"{epsilon:g}"].values()) == round((error - report.clean_error) * 80)
    assert 0 < report.mean_distortion < 0.2 and report.search_success == 1.0
    json_path, png_path = write_report({"mlp": report}, tmp_path / "out")
    saved = json.loads(json_path.read_text())["mlp"]
    assert saved["robust_error"] == report.robust_error and saved["ensemble"]["steps"] == QUICK.steps
    assert Image.open(png_path).size == (360 * 2 + 60, 360)


def test_a_masked_model_is_reported_with_its_failed_checks() -> None:
    model, inputs, labels = trained_mlp()
    loader = DataLoader(TensorDataset(inputs * (inputs > 0.1), labels), batch_size=50)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluate_robustness(Quantised(model), loader, BUDGETS, examples=60, ensemble=QUICK)
    assert {"gradients", "whole box"} <= set(report.checks_failed)
    assert len(report.check_messages) == len(report.checks_failed)
    warned = [str(w.message) for w in caught if issubclass(w.category, EvaluationCheckWarning)]
    assert len(warned) == len(report.checks_failed) and "'gradients'" in " ".join(warned)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(budgets={"l1": [0.1]}), r"budgets key 'l1'"),
    (dict(examples=0), r"examples must be a positive integer"),
    (dict(chunk_size=0), r"chunk_size must be a positive integer"),
    (dict(bounds=(1.0, 0.0)), r"lower > upper"),
], ids=["norm", "examples", "chunk", "box"])
def test_bad_settings_are_named(settings: dict, message: str) -> None:
    model, inputs, labels = trained_mlp(count=8)
    arguments = dict(budgets=BUDGETS) | settings
    with pytest.raises(ValueError, match=message):
        evaluate_robustness(model, DataLoader(TensorDataset(inputs, labels)), arguments.pop("budgets"), **arguments)


def test_advtrain_evaluate_reports_a_train_run_folder(mnist_root: Path, tmp_path: Path, capsys) -> None:
    from advtrain.cli import main

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"recipe": "train", "model": "fc10-1e-4"}))
    torch.manual_seed(0)
    torch.save(build_model("fc10-1e-4").module.state_dict(), folder / "model.pt")
    flags = ["--examples", "12", "--steps", "3", "--targets", "1", "--queries", "10", "--ddn", "20", "--data-dir", str(mnist_root),
             "--budgets", "linf=0.05,0.1", "l2=1"]
    assert main(["evaluate", str(folder), *flags]) == 0
    saved = json.loads((folder / "robustness" / "robustness.json").read_text())["fc10-1e-4"]
    assert saved["examples"] == 12 and set(saved["robust_error"]) == {"linf", "l2"}
    assert saved["robust_error"]["linf"]["0.05"] <= saved["robust_error"]["linf"]["0.1"]
    assert (folder / "robustness" / "robustness.png").is_file()
    assert all("fab-t" in tally for tally in saved["broken_by"]["l2"].values())  # FAB-T runs by default
    assert all("ddn" in tally for tally in saved["broken_by"]["l2"].values())  # DDN in L2 only
    assert not any("ddn" in tally for tally in saved["broken_by"]["linf"].values())
    assert main(["evaluate", str(folder), *flags, "--no-fab", "--ddn", "0", "--output", str(tmp_path / "no-fab")]) == 0
    without = json.loads((tmp_path / "no-fab" / "robustness.json").read_text())["fc10-1e-4"]
    assert not any("fab-t" in tally or "ddn" in tally for tally in without["broken_by"]["l2"].values())
    assert "| fc10-1e-4 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already holds a report"):
        main(["evaluate", str(folder), *flags])
    with pytest.raises(SystemExit, match="is a file; say which architecture"):
        main(["evaluate", str(folder / "model.pt"), *flags])
    with pytest.raises(SystemExit, match="is not a state dict of convnet"):
        main(["evaluate", str(folder / "model.pt"), "--model", "convnet", "--output", str(tmp_path / "x"), *flags])
    with pytest.raises(SystemExit, match=r"--budgets 'linf': write NORM=EPS,EPS"):
        main(["evaluate", str(folder), "--budgets", "linf"])
    assert math.isfinite(saved["seconds"])


def test_advtrain_evaluate_as_trained_repeats_the_runs_own_evaluation_figure_for_figure(mnist_root: Path, tmp_path: Path) -> None:
    """``--as-trained`` on an adversarial-training run folder, with the ensemble the run used (the
    quick run's validation ensemble), gives the run's own robust errors and distortion exactly: the
    same seeded test images, search and seed. Another ensemble writes what it ran."""
    from advtrain.cli import main
    from advtrain.recipes.adversarial_training import VALIDATION_ENSEMBLE

    run = tmp_path / "run"
    assert main(["adversarial-training", "--quick", "--wandb", "off", "--ways", "fast", "--hidden", "32", "16",
                 "--data-dir", str(mnist_root), "--output", str(run)]) == 0
    (trained,) = json.loads((run / "results.json").read_text())
    same = ["--steps", str(VALIDATION_ENSEMBLE.steps), "--targets", str(VALIDATION_ENSEMBLE.targets),
            "--queries", str(VALIDATION_ENSEMBLE.queries), "--ddn", str(VALIDATION_ENSEMBLE.ddn)]
    assert main(["evaluate", str(run), "--as-trained", *same, "--data-dir", str(mnist_root), "--output", str(tmp_path / "a")]) == 0
    again = json.loads((tmp_path / "a" / "robustness.json").read_text())["fast"]
    assert again["examples"] == 20 and again["seed"] == 0
    assert again["robust_error"] == trained["robust_error"] and again["mean_distortion"] == trained["mean_distortion"]
    # the run's own results say which ensemble their figures came from and what broke each example
    assert trained["ensemble"] == again["ensemble"] == asdict(VALIDATION_ENSEMBLE)
    assert trained["broken_by"] == again["broken_by"] and trained["evaluation_seconds"] > 0
    assert 0 < sum(again["robust_error"]["l2"].values()) < 3  # figures that could differ: neither all nor none broken
    assert main(["evaluate", str(run), "--as-trained", *same[:6], "--ddn", "0", "--no-fab", "--data-dir", str(mnist_root),
                 "--output", str(tmp_path / "b")]) == 0
    weaker = json.loads((tmp_path / "b" / "robustness.json").read_text())["fast"]
    assert weaker["ensemble"]["ddn"] == 0 and not weaker["ensemble"]["fab"] and again["ensemble"]["ddn"] == 100
    assert all(weaker["robust_error"]["l2"][e] <= again["robust_error"]["l2"][e] for e in again["robust_error"]["l2"])
    for flags in (["--examples", "20"], ["--seed", "0"]):
        with pytest.raises(SystemExit, match="--as-trained evaluates the run's own test images"):
            main(["evaluate", str(run), "--as-trained", *flags, "--output", str(tmp_path / "c")])
    # --budgets narrows the run's threat models (one norm re-evaluated after a change to its attacks)
    assert main(["evaluate", str(run), "--as-trained", *same, "--budgets", "l2=1.0,2.0", "--data-dir", str(mnist_root),
                 "--output", str(tmp_path / "l2")]) == 0
    narrowed = json.loads((tmp_path / "l2" / "robustness.json").read_text())["fast"]
    assert narrowed["robust_error"] == {"l2": {e: again["robust_error"]["l2"][e] for e in ("1", "2")}}
    assert list(narrowed["broken_by"]) == ["l2"] and narrowed["ensemble"]["square_l2"] == "two-window"
    with pytest.raises(SystemExit, match=r"the run evaluated no linf budget 0.25 \(its threat models: linf=0.1,0.2,0.3 l2=1,1.5,2\)"):
        main(["evaluate", str(run), "--as-trained", "--budgets", "linf=0.25", "--output", str(tmp_path / "c")])
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "config.json").write_text(json.dumps({"recipe": "train", "model": "fc10-1e-4"}))
    torch.save(build_model("fc10-1e-4").module.state_dict(), tmp_path / "train" / "model.pt")
    with pytest.raises(SystemExit, match="is no adversarial-training run folder"):
        main(["evaluate", str(tmp_path / "train"), "--as-trained"])


def test_advtrain_evaluate_refuses_a_folder_that_is_no_run(tmp_path: Path) -> None:
    from advtrain.cli import main

    with pytest.raises(SystemExit, match="neither a file nor a recipe's run folder"):
        main(["evaluate", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps({"recipe": "table1"}))
    with pytest.raises(SystemExit, match="saves no model to evaluate"):
        main(["evaluate", str(tmp_path)])
    assert Ensemble().steps == 100  # the default is AutoAttack's standard effort
