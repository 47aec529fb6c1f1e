"""What LayerwiseAdversarialTraining costs: an epoch of FC100-100-10 with and without it, one run.

    python benchmarks/callback_cost.py [--epochs 2]
    python benchmarks/callback_cost.py --fresh-half [--epochs 2]

Both trainings use the same data, model and settings (the adversarial-training recipe's); the
callback runs with its defaults on pools at the input and both hidden layers. Reports the mean
wall time of the epochs after the first (which warms up), their ratio, and the share of the
callback's epochs spent generating adversarial examples.

``--fresh-half`` instead times the README's fresh half-batch settings (an input pool, half of each
batch of 128 attacked every step, untargeted) with each generator, the cheap L-BFGS search
(shrunk and stretched to 0.036) and a fast-gradient step of 0.036, against training without pools
in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytorch_lightning as pl

from advtrain import Classifier
from advtrain.attacks import BoxLBFGS, FastGradient
from advtrain.callbacks import LayerwiseAdversarialTraining
from advtrain.data import MNISTDataModule
from advtrain.models import fc100_100_10
from advtrain.pooling import EveryStep, WithinBudget
from advtrain.recipes.train import DEFAULTS, PENALTY_SCALES
from advtrain.recipes.run_folder import write_json


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


def mean_after_warmup(seconds: list[float]) -> float:
    """Mean epoch seconds, leaving out the first epoch (which warms up)."""
    return sum(seconds[1:]) / len(seconds[1:])


def measure_default(data: MNISTDataModule, epochs: int) -> dict:
    """Epoch seconds without pools and with the callback's defaults on three pools; the ratio."""
    plain_epoch = mean_after_warmup(timed_training(data, epochs, None))
    pools = LayerwiseAdversarialTraining(["input", "sigmoid1", "sigmoid2"], module="model")
    with_pools = timed_training(data, epochs, pools)
    pools_epoch = mean_after_warmup(with_pools)
    return {
        "epoch_seconds_without": plain_epoch,
        "epoch_seconds_with": pools_epoch,
        "ratio": pools_epoch / plain_epoch,
        "share_generating": pools.seconds_generating / sum(with_pools),
        "pool_sizes": {layer: len(pool) for layer, pool in pools.pools.items()},
    }


def fresh_half_pools(generator: str) -> LayerwiseAdversarialTraining:
    """The README's fresh half-batch setting with either generator."""
    fresh = dict(mix_fraction=0.5, refresh_every=1, refresh_size=64, capacity=128)
    if generator == "fast-gradient":
        return LayerwiseAdversarialTraining(["input"], module="model", attack=FastGradient(epsilon=0.036),
                                            pooling=EveryStep(), **fresh)
    search = BoxLBFGS(loss="margin", search_steps=1, iterations=5, refine_steps=10, target="untargeted")
    return LayerwiseAdversarialTraining(["input"], module="model", attack=search,
                                        pooling=WithinBudget(0.036, beyond="project", stretch=True), **fresh)


def measure_fresh_half(data: MNISTDataModule, epochs: int) -> dict:
    """Epoch seconds without pools and with each generator's fresh half-batch pools; the ratios."""
    plain_epoch = mean_after_warmup(timed_training(data, epochs, None))
    result: dict = {"batch_size": data.batch_size, "epoch_seconds_without": plain_epoch}
    for generator in ("box-lbfgs", "fast-gradient"):
        pools = fresh_half_pools(generator)
        seconds = timed_training(data, epochs, pools)
        epoch = mean_after_warmup(seconds)
        result[generator] = {"epoch_seconds_with": epoch, "ratio": epoch / plain_epoch,
                             "share_generating": pools.seconds_generating / sum(seconds)}
    result["box_lbfgs_over_fast_gradient"] = (result["box-lbfgs"]["epoch_seconds_with"]
                                              / result["fast-gradient"]["epoch_seconds_with"])
    return result


def main() -> None:
    """Measure, print and write the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--fresh-half", action="store_true", help="time the fresh half-batch settings instead")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", type=Path, default=None,
                        help="default: benchmarks/results/callback_cost (or callback_cost_fresh_half)")
    args = parser.parse_args()
    output = args.output or Path("benchmarks/results/callback_cost" + ("_fresh_half" if args.fresh_half else ""))
    data = MNISTDataModule(args.data_dir, batch_size=128 if args.fresh_half else DEFAULTS["batch_size"], val_size=0)
    data.prepare_data()
    result = (measure_fresh_half if args.fresh_half else measure_default)(data, args.epochs)
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "results.json", result)  # strict JSON (NaN as null), written atomically
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
