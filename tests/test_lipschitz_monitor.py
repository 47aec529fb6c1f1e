"""LipschitzMonitor during training, and the ``advtrain lipschitz`` recipe end to end."""

from __future__ import annotations

import copy
import json
import math
import pickle
import urllib.error
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from advtrain import Classifier
from advtrain.analysis import lipschitz_bounds
from advtrain.callbacks import LipschitzMonitor
from advtrain.cli import main
from advtrain.models import fc10, fc100_100_10
from tests.wandb_records import history


def fit(classifier: Classifier, data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path, monitor: LipschitzMonitor,
        epochs: int, checkpoint: Path | None = None) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[monitor], logger=pl.loggers.CSVLogger(tmp_path),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(classifier, DataLoader(TensorDataset(*data), batch_size=16), ckpt_path=checkpoint)
    return trainer


def test_monitor_logs_bounds_each_epoch_and_resumes(tiny_data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = Classifier.from_paper_model(fc100_100_10(), lr=0.5)
    monitor = LipschitzMonitor(module="model")
    trainer = fit(classifier, tiny_data, tmp_path, monitor, epochs=2)
    assert monitor.input_shape == (1, 28, 28)
    assert [entry["epoch"] for entry in monitor.history] == [0.0, 1.0]
    expected = lipschitz_bounds(classifier.model, (1, 28, 28))
    assert trainer.callback_metrics["lipschitz/network_bound"].item() == pytest.approx(expected.network_bound, rel=1e-5)
    assert trainer.callback_metrics["lipschitz/fc1"].item() == pytest.approx(expected.rows[1].bound, rel=1e-5)
    assert monitor.history[0]["lipschitz/network_bound"] != monitor.history[1]["lipschitz/network_bound"]  # training moved it

    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    resumed = LipschitzMonitor(module="model")
    fit(Classifier.from_paper_model(fc100_100_10(), lr=0.5), tiny_data, tmp_path, resumed, epochs=3, checkpoint=path)
    assert [entry["epoch"] for entry in resumed.history] == [0.0, 1.0, 2.0]
    assert resumed.history[:2] == monitor.history
    assert pickle.loads(pickle.dumps(resumed)).history == resumed.history


def test_monitor_every_n_epochs_and_bad_setting(tiny_data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    monitor = LipschitzMonitor((1, 28, 28), module="model", every_n_epochs=2)
    fit(Classifier.from_paper_model(fc10(1e-4)), tiny_data, tmp_path, monitor, epochs=3)
    assert [entry["epoch"] for entry in monitor.history] == [1.0]
    with pytest.raises(ValueError, match="every_n_epochs"):
        LipschitzMonitor(every_n_epochs=0)
    with pytest.raises(ValueError, match="give every_n_epochs or every_n_train_steps"):
        LipschitzMonitor(every_n_epochs=None)


def test_monitor_every_n_train_steps(tiny_data: tuple[torch.Tensor, torch.Tensor], tmp_path: Path) -> None:
    monitor = LipschitzMonitor(module="model", every_n_epochs=None, every_n_train_steps=3)
    fit(Classifier.from_paper_model(fc10(1e-4)), tiny_data, tmp_path, monitor, epochs=2)  # 4 steps an epoch
    assert [entry["step"] for entry in monitor.history] == [3.0, 6.0]


def test_lipschitz_recipe_alexnet_offline_uses_random_weights_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Without a network the real loading path fails; the recipe goes on with random weights."""
    import torchvision.models._api as weights_api

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    output = tmp_path / "run"
    assert main(["lipschitz", "--model", "alexnet", "--weights", "IMAGENET1K_V1", "--quick",
                 "--output", str(output), "--wandb", "offline"]) == 0
    printed = capsys.readouterr().out
    assert "could not load AlexNet weights IMAGENET1K_V1" in printed and "using random weights" in printed
    results = json.loads((output / "results.json").read_text())
    assert results["weights"].startswith("random weights (seed 0): IMAGENET1K_V1 could not be loaded")
    rows = results["tables"]["alexnet"]["rows"]
    assert [row["kind"] for row in rows if row["weight_shape"]] == ["Conv2d"] * 5 + ["Linear"] * 3
    assert all(row["bound"] != "inf" for row in rows)
    assert "| Conv. 1 | 3×11×11×64 |" in (output / "results.md").read_text()
    (run_file,) = output.glob("wandb/offline-run-*/run-*.wandb")
    assert history(run_file)["lipschitz/alexnet/_type"] == ["table-file"]


def test_lipschitz_recipe_compares_checkpoints(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = fc100_100_10().module
    second = copy.deepcopy(first)
    with torch.no_grad():
        second.fc1.weight.mul_(3.0)
    torch.save(first.state_dict(), tmp_path / "weight-decay.pt")
    torch.save(second.state_dict(), tmp_path / "pools.pt")
    output = tmp_path / "run"
    main(["lipschitz", "--model", "fc100-100-10", "--checkpoint", str(tmp_path / "weight-decay.pt"),
          str(tmp_path / "pools.pt"), "--output", str(output), "--wandb", "off"])
    tables = json.loads((output / "results.json").read_text())["tables"]
    fc1 = {label: table["rows"][1]["bound"] for label, table in tables.items()}
    assert fc1["pools"] == pytest.approx(3 * fc1["weight-decay"])
    assert "| fc1 | Linear | 784×100 |" in (output / "results.md").read_text()
    torch.save({"wrong": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="is not a state dict of fc100-100-10"):
        main(["lipschitz", "--model", "fc100-100-10", "--checkpoint", str(tmp_path / "other.pt"),
              "--output", str(tmp_path / "other-run"), "--wandb", "off"])
    assert not math.isnan(tables["pools"]["network_bound"])


@pytest.mark.parametrize(("content", "message"), [
    (b"junk that is no checkpoint", r"junk.pt is not a saved state dict \(torch.save of model.state_dict\(\).*never loaded "
                                   r"with weights_only=False"),
    (None, r"junk.pt holds a list, not a state dict of tensors"),
], ids=["junk", "not-a-state-dict"])
def test_a_checkpoint_that_is_no_state_dict_is_named_without_unsafe_advice(tmp_path: Path, content, message) -> None:
    path = tmp_path / "junk.pt"
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(SystemExit, match=r"advtrain lipschitz: --checkpoint .*" + message):
        main(["lipschitz", "--model", "fc100-100-10", "--checkpoint", str(path), "--wandb", "off",
              "--output", str(tmp_path / "run")])
