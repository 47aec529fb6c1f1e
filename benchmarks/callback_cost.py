"""What LayerwiseAdversarialTraining costs: an epoch of FC100-100-10 with and without it, one run.

    python benchmarks/callback_cost.py [--epochs 2]

Both trainings use the same data, model and settings (the adversarial-training recipe's); the
callback runs with its defaults on pools at the input and both hidden layers. Reports the mean
wall time of the epochs after the first (which warms up), their ratio, and the share of the
callback's epochs spent generating adversarial examples.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytorch_lightning as pl

from advtrain import Classifier
from advtrain.callbacks import LayerwiseAdversarialTraining
from advtrain.data import MNISTDataModule
from advtrain.models import fc100_100_10
from advtrain.recipes.train import DEFAULTS, PENALTY_SCALES


class EpochTimer(pl.Callback):
    """Wall time of each training epoch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._started)


def timed_training(data: MNISTDataModule, epochs: int, pools: LayerwiseAdversarialTraining | None) -> list[float]:
    """Seconds of each epoch of FC100-100-10 training, with or without pools."""
    pl.seed_everything(0)
    paper_model = fc100_100_10()
    classifier = Classifier.from_paper_model(paper_model, penalty_scale=PENALTY_SCALES["fc100-100-10"], lr=DEFAULTS["lr"])
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[timer] + ([pools] if pools else []))
    trainer.fit(classifier, datamodule=data)
    return timer.seconds


def main() -> None:
    """Measure both, print and write the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/callback_cost"))
    args = parser.parse_args()
    data = MNISTDataModule(args.data_dir, batch_size=DEFAULTS["batch_size"], val_size=0)
    data.prepare_data()
    plain = timed_training(data, args.epochs, None)
    pools = LayerwiseAdversarialTraining(["input", "sigmoid1", "sigmoid2"], module="model")
    with_pools = timed_training(data, args.epochs, pools)
    plain_epoch = sum(plain[1:]) / len(plain[1:])
    pools_epoch = sum(with_pools[1:]) / len(with_pools[1:])
    generating_share = pools.seconds_generating / sum(with_pools)
    result = {
        "epoch_seconds_without": plain_epoch,
        "epoch_seconds_with": pools_epoch,
        "ratio": pools_epoch / plain_epoch,
        "share_generating": generating_share,
        "pool_sizes": {layer: len(pool) for layer, pool in pools.pools.items()},
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
