"""What the callbacks cost on a model we did not write: torchvision's resnet18 (random weights) on
32×32 synthetic images, one run, every setting against plain training in the same process.

    python benchmarks/real_model_cost.py [--epochs 3] [--repeats 5] [--accelerator cpu|gpu]

Settings: no callback; ``LayerwiseAdversarialTraining(["layer2"], module="net")`` with its defaults
(an epoch is 96 steps, the default ``refresh_every``, so each epoch holds one refresh); the same
with 7 L-BFGS iterations per value of c in the generation search instead of 10; the same
with every step attacking the batch before it (``refresh_every=1, refresh_size=32``); and
``LipschitzMonitor(module="net")`` computing the bounds at every epoch's end. The settings run in
turn, ``--repeats`` times over (the slow every-step setting once), so that a drift of the machine
touches all of them alike. Reports the median wall time of the epochs after each run's first (which
warms up) and its ratio to plain training's median. Writes
``benchmarks/results/real_model_cost/results.json``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from advtrain.attacks import BoxLBFGS
from advtrain.callbacks import LayerwiseAdversarialTraining, LipschitzMonitor
from advtrain.callbacks.layerwise_adversarial_training import GENERATION_ATTACK
from advtrain.recipes.run_folder import write_json
from callback_cost import EpochTimer  # benchmarks/ is on the path when this runs as a script

STEPS_PER_EPOCH = 96
BATCH_SIZE = 32


class Plain(pl.LightningModule):
    """A user's module: resnet18 in ``self.net``, cross-entropy, SGD."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torchvision.models.resnet18(weights=None, num_classes=2)

    def training_step(self, batch, batch_idx):
        inputs, labels = batch
        return nn.functional.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.02, momentum=0.9)


def data() -> DataLoader:
    """Random RGB images labelled by whether red outshines green (learnt in a few steps)."""
    count = STEPS_PER_EPOCH * BATCH_SIZE
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(count, 3, 32, 32, generator=generator)
    labels = (images[:, 0].mean((1, 2)) > images[:, 1].mean((1, 2))).long()
    return DataLoader(TensorDataset(images, labels), batch_size=BATCH_SIZE, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def epoch_seconds(callback: pl.Callback | None, epochs: int, accelerator: str) -> list[float]:
    """Seconds of each epoch of resnet18 training with ``callback`` (or none)."""
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=epochs, accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[timer] + ([callback] if callback is not None else []))
    trainer.fit(Plain(), data())
    return timer.seconds


def settings() -> dict[str, pl.Callback | None]:
    return {
        "plain": None,
        "pools_layer2_defaults": LayerwiseAdversarialTraining(["layer2"], module="net"),
        "pools_layer2_7_iterations": LayerwiseAdversarialTraining(
            ["layer2"], module="net", attack=BoxLBFGS(**{**GENERATION_ATTACK, "iterations": 7})),
        "pools_layer2_refresh_every_step": LayerwiseAdversarialTraining(["layer2"], module="net", refresh_every=1,
                                                                        refresh_size=BATCH_SIZE),
        "lipschitz_monitor_every_epoch": LipschitzMonitor(module="net"),
    }


#: Settings too slow to repeat: run once.
RUN_ONCE = ("pools_layer2_refresh_every_step",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/real_model_cost"))
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch warms up and is left out")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    measured: dict[str, dict] = {}
    for repeat in range(args.repeats):
        for name, callback in settings().items():
            if repeat and name in RUN_ONCE:
                continue
            seconds = epoch_seconds(callback, args.epochs, args.accelerator)
            entry = measured.setdefault(name, {"epoch_seconds": []})
            entry["epoch_seconds"].append(seconds)
            if isinstance(callback, LayerwiseAdversarialTraining):
                entry.setdefault("seconds_generating", []).append(callback.seconds_generating)
                entry.setdefault("pool_size", []).append(len(callback.pools["layer2"]))
    for entry in measured.values():
        timed = [s for run in entry["epoch_seconds"] for s in run[1:]]
        entry["median_after_warmup"], entry["mean_after_warmup"] = statistics.median(timed), statistics.mean(timed)
    plain = measured["plain"]["median_after_warmup"]
    for entry in measured.values():
        entry["ratio_to_plain"] = entry["median_after_warmup"] / plain
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else platform.processor() or platform.machine()
    result = {"model": "torchvision resnet18 (random weights), 32×32 synthetic images",
              "steps_per_epoch": STEPS_PER_EPOCH, "batch_size": BATCH_SIZE, "epochs": args.epochs, "repeats": args.repeats,
              "accelerator": args.accelerator, "device": device, "threads": torch.get_num_threads(),
              "generation_attack": GENERATION_ATTACK, "settings": measured}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", result)  # strict JSON (NaN as null), written atomically
    print("| setting | seconds per epoch | ratio to plain |\n|---|---|---|")
    for name, entry in measured.items():
        print(f"| {name} | {entry['median_after_warmup']:.2f} | {entry['ratio_to_plain']:.2f} |")


if __name__ == "__main__":
    main()
