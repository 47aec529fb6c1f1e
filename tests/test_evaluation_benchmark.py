"""The peer benchmark of the evaluation (benchmarks/evaluation_benchmark.py) evaluates the models a
recipe run saved, each as the recipe built it."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from script_modules import load_script

REPO = Path(__file__).resolve().parents[1]


def load_benchmark():
    return load_script("benchmarks/evaluation_benchmark.py", "evaluation_benchmark")


def test_a_run_folder_gives_the_ways_it_saved_with_their_weights(tmp_path: Path) -> None:
    from advtrain.recipes.adversarial_training import network

    benchmark = load_benchmark()
    folder = tmp_path / "ways-small-resnet-seed1"
    folder.mkdir()
    shutil.copy(REPO / "docs" / "results" / "ways-small-resnet-seed1" / "config.json", folder / "config.json")
    settings = argparse.Namespace(**json.loads((folder / "config.json").read_text()))
    saved = {}
    for seed, way in enumerate(["fast", "input-pools"]):
        torch.manual_seed(seed)
        saved[way] = network(settings, way).module.eval()
        torch.save(saved[way].state_dict(), folder / f"{way}.pt")
    found = benchmark.run_folder_models(folder, ["pgd", "fast"])  # pgd: saved by other folders only
    assert list(found) == ["ways-small-resnet-seed1: fast"]
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(found["ways-small-resnet-seed1: fast"](images), saved["fast"](images))
        assert not torch.equal(saved["input-pools"](images), saved["fast"](images))  # the weights tell the ways apart
    assert list(benchmark.run_folder_models(folder, None)) == ["ways-small-resnet-seed1: fast",
                                                              "ways-small-resnet-seed1: input-pools"]
    with pytest.raises(SystemExit, match=r"ways-small-resnet-seed1 saved none of the ways \['pgd'\]; saved: fast, input-pools"):
        benchmark.run_folder_models(folder, ["pgd"])


def test_the_evaluation_runs_with_and_without_fab_t_and_ddn_as_asked() -> None:
    from torch import nn

    from advtrain.robustness import Ensemble

    benchmark = load_benchmark()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    images = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        labels = model(images).argmax(1)
    quick = dict(steps=5, targets=2, queries=0, whole_box=False, ddn=20)
    errors, _, _, _, broken_by = benchmark.ours(model, images, labels, Ensemble(**quick))
    _, _, _, _, without = benchmark.ours(model, images, labels, Ensemble(**{**quick, "fab": False, "ddn": 0}))
    assert all("fab-t" in tally for budgets in broken_by.values() for tally in budgets.values())
    assert all("ddn" in tally for tally in broken_by["l2"].values()) and not any("ddn" in t for t in broken_by["linf"].values())
    assert not any("fab-t" in tally or "ddn" in tally for budgets in without.values() for tally in budgets.values())
    assert errors["l2"]["2"] == 1.0  # a random linear model breaks within L2 2 everywhere
