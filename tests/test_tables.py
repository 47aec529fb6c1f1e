"""The table recipes' --quick settings end to end, and the perturbations they compare."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advtrain.recipes.paper_models import distortion, gaussian_noise, magnified, mean_change, mean_distortion_to_zero_accuracy
from advtrain.attacks import AttackResult
from tests.wandb_records import history


def advtrain_cli(args: list[str], mnist_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(mnist_root), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run([sys.executable, "-m", "advtrain.cli", *args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_magnified_perturbations_have_the_asked_distortion() -> None:
    images = torch.full((3, 1, 4, 4), 0.5)
    adversarial = images + 0.01 * torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    assert distortion(images, magnified(images, adversarial, 0.1)).tolist() == pytest.approx([0.1] * 3, rel=1e-5)
    direction = torch.nn.functional.cosine_similarity((magnified(images, adversarial, 0.1) - images).flatten(1),
                                                      (adversarial - images).flatten(1))
    assert direction.tolist() == pytest.approx([1.0] * 3)


def test_mean_change_skips_unchanged_images() -> None:
    images = torch.zeros(4, 1, 2, 2)
    changed = images.clone()
    changed[:2] += 0.2
    assert mean_change(images, changed) == pytest.approx(0.2)
    assert mean_change(images, images) == 0.0


def test_gaussian_noise_is_seeded_clipped_and_of_the_asked_size() -> None:
    images = torch.full((50, 1, 28, 28), 0.5)
    noisy = gaussian_noise(images, 0.1, seed=1)
    assert torch.equal(noisy, gaussian_noise(images, 0.1, seed=1))
    assert float(distortion(images, noisy).mean()) == pytest.approx(0.1, rel=0.02)
    assert float(noisy.mean()) == pytest.approx(0.5, abs=0.01)  # zero-mean
    black = torch.zeros(50, 1, 28, 28)
    clipped = gaussian_noise(black, 0.3, seed=1, clip=True)
    assert 0.0 <= float(clipped.min()) and float(clipped.max()) <= 1.0
    assert float(distortion(black, clipped).mean()) == pytest.approx(0.3 / 2 ** 0.5, rel=0.05)  # half survives


def test_distortion_to_zero_accuracy_counts_wrong_images_as_zero_and_failures_as_infinite() -> None:
    def result(distortions: list[float], success: list[bool]) -> AttackResult:
        n = len(distortions)
        return AttackResult(torch.zeros(n, 1), torch.zeros(n, 1), torch.tensor(success), torch.tensor(distortions),
                            torch.tensor(distortions), torch.zeros(n, dtype=torch.long), torch.ones(n), torch.ones(n))

    correct = torch.tensor([True, False, True, True])
    assert mean_distortion_to_zero_accuracy(result([0.1, 0.2, 0.3], [True] * 3), correct) == pytest.approx(0.15)
    assert mean_distortion_to_zero_accuracy(result([0.1, 0.2, 0.3], [True, False, True]), correct) == float("inf")


def test_table_recipes_quick_end_to_end(mnist_root: Path, tmp_path: Path) -> None:
    models = ["fc10-1e-4", "fc100-100-10"]
    table1 = advtrain_cli(["table1", "--quick", "--target", "nearest", "--models", *models, "--output", str(tmp_path / "t1"),
                           "--models-dir", str(tmp_path / "models")], mnist_root, tmp_path)
    rows = json.loads((tmp_path / "t1" / "results.json").read_text())["rows"]
    assert [row["model"] for row in rows] == ["FC10(0.0001)", "FC100-100-10"]
    assert all(0 <= row["train_error"] <= 1 and row["success_rate"] == 1.0 for row in rows)
    assert all(0 < row["mean_distortion"] < 0.5 for row in rows)
    assert "| FC100-100-10 |" in table1.stdout and "(1.64%)" in table1.stdout
    assert (tmp_path / "t1" / "figure5_fc100-100-10.png").stat().st_size > 0
    (run_file,) = (tmp_path / "t1").glob("wandb/offline-run-*/run-*.wandb")
    series = history(run_file)
    assert series["table1/result/_type"] == ["table-file"] and series["table1/figure5/_type"] == ["image-file"]
    assert len(series["table1/fc100-100-10/test_err"]) == 1

    table2 = advtrain_cli(["table2", "--quick", "--target", "nearest", "--models", *models, "--table1", str(tmp_path / "t1"),
                           "--output", str(tmp_path / "t2"), "--models-dir", str(tmp_path / "models")], mnist_root, tmp_path)
    assert "fc100-100-10: loaded" in table2.stdout and "adversarial examples from" in table2.stdout
    results = json.loads((tmp_path / "t2" / "results.json").read_text())
    assert list(results["errors"]) == [*models, "noise 0.1", "noise 0.3"]
    for model in models:  # a model's own minimal adversarial examples fool it every time
        assert results["errors"][model][model] == 1.0
    assert results["mean_distortion"]["noise 0.3"] > results["mean_distortion"]["noise 0.1"]
    (run_file,) = (tmp_path / "t2").glob("wandb/offline-run-*/run-*.wandb")
    assert history(run_file)["table2/result/_type"] == ["table-file"]

    advtrain_cli(["table3", "--quick", "--target", "nearest", "--output", str(tmp_path / "t3"), "--models-dir", str(tmp_path / "models3")],
                 mnist_root, tmp_path)
    results = json.loads((tmp_path / "t3" / "results.json").read_text())
    assert list(results["table3"]) == ["FC100", "FC123", "FC100′"]
    assert [results["table3"][m]["trained_on"] for m in results["table3"]] == ["P1", "P1", "P2"]
    searched = [label for label, rate in results["search_success"].items() if rate == 1.0]
    assert searched  # a one-epoch model that answers one class for every image has no adversarial example in the box
    for label in searched:  # a model's own minimal adversarial examples fool it every time
        assert results["table4"][f"distorted for {label}"][label] == 1.0
    changed = [label for label in ("FC100", "FC123", "FC100′") if results["mean_distortion"][f"distorted for {label}"] > 0]
    assert changed  # a one-epoch model gets some of the ten images right; those it gets wrong are left as they are
    for label in changed:
        assert results["mean_distortion"][f"distorted for {label}, magnified to 0.1"] == pytest.approx(0.1, abs=0.01)
    assert sorted(p.name for p in (tmp_path / "models3").iterdir()) == ["fc100-100-10-P1", "fc100-100-10-P2", "fc123-456-10-P1"]


def test_a_kept_model_is_reused_only_with_the_settings_that_trained_it(tmp_path: Path, monkeypatch) -> None:
    """A quick model in a shared models folder must not stand in for a run with other settings."""
    import argparse

    from advtrain import Classifier
    from advtrain.models import build_model
    from advtrain.recipes import paper_models

    trained: list[tuple[int, bool]] = []

    def train_model(settings, data):
        trained.append((settings.epochs, settings.quick))
        return Classifier(build_model(settings.model).module), None

    monkeypatch.setattr(paper_models, "train_model", train_model)

    def args(**changes):
        settings = dict(seed=0, quick=True, epochs=1, lr=0.1, batch_size=64, accelerator="cpu", models_dir=tmp_path)
        return argparse.Namespace(**{**settings, **changes})

    paper_models.trained_model("fc10-1e-4", args(), data=None)
    paper_models.trained_model("fc10-1e-4", args(), data=None)  # the same settings: reused
    paper_models.trained_model("fc10-1e-4", args(quick=False, epochs=2), data=None)  # others: trained anew
    paper_models.trained_model("fc10-1e-4", args(seed=1), data=None)
    paper_models.trained_model("fc10-1e-4", args(accelerator="gpu"), data=None)  # where it runs is no setting
    assert trained == [(1, True), (2, False), (1, True)]
    assert len(list(tmp_path.glob("fc10-1e-4/*/model.pt"))) == 3


def test_table1_s_adversarial_sets_are_reused_only_for_a_model_trained_alike(tmp_path: Path, monkeypatch) -> None:
    import argparse

    from advtrain.recipes import table2
    from advtrain.recipes.paper_models import training_settings

    images, labels = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    settings = dict(seed=0, quick=True, epochs=1, lr=0.1, batch_size=64, target="random", table1=tmp_path)
    (tmp_path / "adversarial").mkdir()
    stored = torch.rand(4, 1, 28, 28)
    torch.save({"images": images, "labels": labels, "adversarial": stored, "model": "fc10-1e-4", "target": "random",
                "training": training_settings("fc10-1e-4", argparse.Namespace(**settings))},
               tmp_path / "adversarial" / "fc10-1e-4.pt")
    made = torch.zeros(4, 1, 28, 28)
    monkeypatch.setattr(table2, "minimal_adversarial", lambda *args: (made, None))
    same = table2.examples_for("fc10-1e-4", None, images, labels, argparse.Namespace(**settings))
    full = table2.examples_for("fc10-1e-4", None, images, labels, argparse.Namespace(**{**settings, "quick": False,
                                                                                       "epochs": 2}))
    assert same is stored or torch.equal(same, stored)
    assert torch.equal(full, made)  # a full run's model: its own examples, not the quick model's


def test_the_attack_benchmark_refuses_a_kept_model_trained_otherwise(tmp_path: Path, monkeypatch) -> None:
    import argparse
    import json
    import sys

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import attack_benchmark

    from advtrain.models import build_model
    from advtrain.recipes import train as train_recipe
    from advtrain.recipes.run_folder import config_of

    folder = tmp_path / "fc100-100-10"
    folder.mkdir()
    parser = argparse.ArgumentParser()
    train_recipe.add_arguments(parser)
    args = parser.parse_args(["--model", "fc100-100-10", "--output", str(folder),
                              *attack_benchmark.TRAINING.get("fc100-100-10", [])])
    torch.save(build_model("fc100-100-10").module.state_dict(), folder / "model.pt")
    (folder / "config.json").write_text(json.dumps({**config_of(args), "data_dir": "elsewhere"}))
    assert attack_benchmark.trained_model("fc100-100-10", tmp_path, None) is not None  # trained alike: used
    (folder / "config.json").write_text(json.dumps({**config_of(args), "quick": True, "epochs": 1}))
    with pytest.raises(SystemExit, match=r"holds a model trained with other settings than this benchmark's \(epochs: 1 "
                                         r"there, .* here, quick: True there, False here\)"):
        attack_benchmark.trained_model("fc100-100-10", tmp_path, None)
    del sys.modules["attack_benchmark"]
