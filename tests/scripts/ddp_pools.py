"""Two CPU processes under strategy="ddp": each rank keeps and refreshes its own pools.

Run by tests/test_ddp.py as `python ddp_pools.py OUT_DIR`; Lightning's launcher starts rank 1 by
running this script again. Each rank writes its pools and the rows it saw to OUT_DIR/rank{r}.pt.
"""

import sys
from collections import OrderedDict
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advtrain import Classifier
from advtrain.callbacks import LayerwiseAdversarialTraining


class SavePools(pl.Callback):
    def __init__(self, pools: LayerwiseAdversarialTraining, out: Path) -> None:
        self.pools, self.out, self.seen = pools, out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch[0][:4].clone())

    def on_train_end(self, trainer, pl_module):
        state = {layer: pool.state_dict() for layer, pool in self.pools.pools.items()}
        torch.save({"pools": state, "seen": torch.cat(self.seen)}, self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path) -> None:
    torch.manual_seed(0)
    inputs = torch.rand(256, 8)
    labels = (inputs[:, :3] * torch.tensor([1.0, 1.1, 1.2])).argmax(1)
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(8, 12), act1=nn.Sigmoid(), out=nn.Linear(12, 3)))
    classifier = Classifier(model, num_classes=3, lr=0.5, schedule="constant")
    pools = LayerwiseAdversarialTraining(["input", "act1"], module="model", refresh_every=1, refresh_size=32, capacity=64)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[pools, SavePools(pools, out)], default_root_dir=out)
    trainer.fit(classifier, DataLoader(TensorDataset(inputs, labels), batch_size=16))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if torch.distributed.is_initialized():  # join gloo's threads before exit: left running, a rank can abort there
        torch.distributed.destroy_process_group()
