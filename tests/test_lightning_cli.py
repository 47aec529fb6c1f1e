"""The callbacks, with a nested attack and pooling policy, configured from a LightningCLI YAML file in
a user's own project, as ``python main.py fit --config config.yaml`` runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jsonargparse", reason="LightningCLI needs the jsonargparse extra: pip install -e '.[cli]'")

PROJECT = '''
import torch, pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class Tiny(pl.LightningModule):
    def __init__(self, hidden: int = 16, lr: float = 0.2):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        x = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        x[:32] *= 0.5
        y = (x.mean((1, 2, 3)) > 0.4).long()
        return DataLoader(TensorDataset(x, y), batch_size=16)


if __name__ == "__main__":
    cli = LightningCLI(Tiny, Data, save_config_kwargs={"overwrite": True})
    pools = next(c for c in cli.trainer.callbacks if hasattr(c, "pools"))
    print("ATTACK", repr(pools.attack))
    print("POOLING", repr(pools.pooling))
    print("POOLS", {layer: len(pool) for layer, pool in pools.pools.items()})
'''

CONFIG = '''
trainer:
  max_steps: 4
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: advtrain.callbacks.LayerwiseAdversarialTraining
      init_args:
        layers: [input, "2"]
        module: net
        mix_fraction: 0.25
        attack:
          class_path: advtrain.attacks.FastGradient
          init_args:
            epsilon: 0.2
        pooling:
          class_path: advtrain.pooling.EveryStep
        bounds:
          input: [0.0, 1.0]
    - class_path: advtrain.callbacks.LipschitzMonitor
      init_args:
        module: net
'''


def test_fit_with_a_yaml_config_builds_the_callbacks_and_trains(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text(PROJECT)
    (tmp_path / "config.yaml").write_text(CONFIG)
    result = subprocess.run([sys.executable, "main.py", "fit", "--config", "config.yaml",
                             "--trainer.default_root_dir", str(tmp_path / "run")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ATTACK FastGradient(target='untargeted', epsilon=0.2, norm='rms')" in result.stdout
    assert "POOLING EveryStep()" in result.stdout
    pools = eval(result.stdout.split("POOLS ", 1)[1].splitlines()[0])  # noqa: S307 - our own printed dict
    assert pools["input"] > 0 and pools["2"] > 0
    saved = (tmp_path / "run" / "config.yaml").read_text()  # LightningCLI writes the resolved config
    assert "advtrain.pooling.EveryStep" in saved and "epsilon: 0.2" in saved


def test_a_bad_value_in_the_yaml_is_refused_with_the_callbacks_message(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text(PROJECT)
    (tmp_path / "config.yaml").write_text(CONFIG.replace("mix_fraction: 0.25", "mix_fraction: 1.5"))
    result = subprocess.run([sys.executable, "main.py", "fit", "--config", "config.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "mix_fraction must be in (0, 1], got 1.5" in result.stderr
