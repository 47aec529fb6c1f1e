"""Unit analysis: top-activating images for units and random directions; the ``advtrain units`` recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from advtrain.analysis import layer_activations, random_directions, top_activating
from tests.wandb_records import history


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3))


def test_top_activating_matches_brute_force_for_units_and_directions() -> None:
    model = tiny_net()
    images = torch.rand(40, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    hidden = torch.relu(model[1](images.flatten(1)))
    found = top_activating(model, "2", 3, images, k=5)
    assert found.indices.tolist() == hidden[:, 3].topk(5).indices.tolist()
    assert torch.equal(found.images, images[found.indices])
    v = random_directions(6, 1, seed=2)[0]
    found = top_activating(model, "2", v, images, k=5)
    assert found.indices.tolist() == (hidden @ v).topk(5).indices.tolist()
    assert found.scores.tolist() == pytest.approx(sorted((hidden @ v).tolist(), reverse=True)[:5], rel=1e-6)
    assert model.training  # mode restored


def test_input_layer_and_label_purity() -> None:
    images = torch.eye(5).reshape(5, 1, 5)
    found = top_activating(tiny_net(), "input", 2, images, k=1)
    assert found.indices.tolist() == [2]
    labels = torch.tensor([0, 1, 1, 1, 2])
    found = top_activating(tiny_net(), "input", torch.tensor([0.0, 1.0, 1.0, 0.5, 0.0]), images, k=3)
    assert found.label_purity(labels) == 1.0


def test_random_directions_are_unit_vectors_and_seeded() -> None:
    directions = random_directions(10, 4, seed=3)
    assert directions.norm(dim=1).tolist() == pytest.approx([1.0] * 4)
    assert torch.equal(directions, random_directions(10, 4, seed=3))


@pytest.mark.parametrize("call, message", [
    pytest.param(lambda m, x: top_activating(m, "fc9", 0, x), "unknown layer `fc9`; layers are: input, 0, 1, 2, 3", id="layer"),
    pytest.param(lambda m, x: top_activating(m, "2", 6, x), "unit 6 is out of range: layer '2' has 6 units", id="unit"),
    pytest.param(lambda m, x: top_activating(m, "2", torch.ones(5), x), "direction has 5 entries but layer '2' has 6",
                 id="direction-size"),
    pytest.param(lambda m, x: top_activating(m, "2", torch.full((6,), float("nan")), x), "direction", id="nan-direction"),
    pytest.param(lambda m, x: top_activating(m, "2", 0, x, k=11), "k=11 is more than the 10 images", id="k"),
    pytest.param(lambda m, x: layer_activations(m, "2", x * float("inf")), "images", id="inf-images"),
])
def test_bad_input_is_a_clear_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(tiny_net(), torch.rand(10, 1, 4, 4))


def test_units_recipe_quick_writes_figure_and_logs_it(mnist_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "ADVTRAIN_DATA_DIR": str(mnist_root), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    output = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "advtrain.cli", "units", "--quick", "--measured", "10",
                             "--output", str(output)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((output / "results.json").read_text())
    assert set(results["mean_label_purity"]) == {"unit", "random"}
    assert all(0.1 <= p <= 1.0 for p in results["mean_label_purity"].values())
    assert len(results["top_labels"]) == 8 and all(len(v) == 8 for v in results["top_labels"].values())
    from PIL import Image

    assert Image.open(output / "units.png").size[1] == 8 * (84 + 4)
    (run_file,) = output.glob("wandb/offline-run-*/run-*.wandb")
    series = history(run_file)
    assert series["units/figure/_type"] == ["image-file"]
    assert series["units/purity/_type"] == ["table-file"]
