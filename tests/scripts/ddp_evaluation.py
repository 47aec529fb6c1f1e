"""Two CPU processes under strategy="ddp" running AdversarialEvaluation at test: the examples are split
across the ranks and the report is of all of them.

Run by tests/test_ddp.py as `python ddp_evaluation.py OUT_DIR`; each rank writes the report it logged
and how many examples it attacked itself. Lightning's launcher starts rank 1 by running this script again.
"""

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advtrain import Classifier
from advtrain.callbacks import AdversarialEvaluation
from advtrain.robustness import Ensemble


class CountingEvaluation(AdversarialEvaluation):
    """Records the rows each rank evaluated itself."""

    def evaluate(self, classifier, inputs, labels, **settings):
        self.own_rows = labels.clone()
        return super().evaluate(classifier, inputs, labels, **settings)


def data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 6, 6, generator=generator)
    labels = (images[:, 0, :3].mean((1, 2)) > images[:, 0, 3:].mean((1, 2))).long()
    return TensorDataset(images, labels)


def model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 2))
    images, labels = data().tensors
    optimizer = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
    return Classifier(net, num_classes=2)


def main(out: Path) -> None:
    callback = CountingEvaluation(examples=40, budgets={"linf": [0.05, 0.2]}, figure_examples=0,
                                  ensemble=Ensemble(steps=10, targets=1, queries=30))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    metrics = trainer.test(model(), DataLoader(data(), batch_size=20), verbose=False)[0]
    report = callback.reports["test"]
    torch.save({"metrics": {k: float(v) for k, v in metrics.items()}, "own_rows": len(callback.own_rows),
                "examples": report.examples, "robust": report.robust_error, "clean": report.clean_error,
                "attacked": report.attacked}, out / f"eval_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    if torch.distributed.is_initialized():  # join gloo's threads before exit: left running, a rank can abort there
        torch.distributed.destroy_process_group()
