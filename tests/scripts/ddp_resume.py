"""Two CPU processes under strategy="ddp", interrupted and resumed: each rank gets back its own pools
and random streams, not rank 0's.

Run by tests/test_ddp.py as `python ddp_resume.py OUT_DIR first` (train 4 steps, checkpoint, write each
rank's state at the end) and then `python ddp_resume.py OUT_DIR resume` (resume from the checkpoint,
write each rank's state as restored). Lightning's launcher starts rank 1 by running this script again.
"""

import sys
from collections import OrderedDict
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advtrain import Classifier
from advtrain.attacks import FastGradient
from advtrain.callbacks import LayerwiseAdversarialTraining
from advtrain.pooling import EveryStep


class SaveState(pl.Callback):
    def __init__(self, pools: LayerwiseAdversarialTraining, path: str) -> None:
        self.pools, self.path = pools, path

    def _save(self, trainer) -> None:
        own = self.pools._own_state()
        torch.save(own, Path(self.path.format(rank=trainer.global_rank)))

    def on_train_start(self, trainer, pl_module):
        if "resumed" in self.path:
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        if "first" in self.path:
            self._save(trainer)


def main(out: Path, phase: str) -> None:
    torch.manual_seed(0)
    inputs = torch.rand(256, 8)
    labels = (inputs[:, :3] * torch.tensor([1.0, 1.1, 1.2])).argmax(1)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(8, 12), act1=nn.Sigmoid(), out=nn.Linear(12, 3)))
    classifier = Classifier(model, num_classes=3, lr=0.5, schedule="constant")
    pools = LayerwiseAdversarialTraining(["input", "act1"], module="model", refresh_every=1, refresh_size=32, capacity=64,
                                         attack=FastGradient(epsilon=0.1, target="random"), pooling=EveryStep())
    name = "first" if phase == "first" else "resumed"
    checkpoint = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=4, save_top_k=-1, save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4 if phase == "first" else 6,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[pools, SaveState(pools, str(out / f"{name}_rank{{rank}}.pt")), checkpoint],
                         default_root_dir=out)
    ckpt = str(out / "checkpoints" / "last.ckpt") if phase == "resume" else None
    trainer.fit(classifier, DataLoader(TensorDataset(inputs, labels), batch_size=16), ckpt_path=ckpt)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
    if torch.distributed.is_initialized():  # join gloo's threads before exit: left running, a rank can abort there
        torch.distributed.destroy_process_group()
