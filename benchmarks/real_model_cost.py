"""What the callbacks cost on a model we did not write: torchvision's resnet18 (random weights) on
32×32 synthetic images, one run, every setting against plain training in the same process.

    python benchmarks/real_model_cost.py [--epochs 3] [--repeats 5] [--settings NAME ...]
        [--accelerator cpu|gpu]

Settings: no callback; ``LayerwiseAdversarialTraining(["layer2"], module="net")`` with 128 rows
attacked every 96 steps (an epoch is 96 steps: one refresh per epoch) and with 256 rows every 192
steps (the same fresh examples per step, in half as many refreshes); its defaults with 7 L-BFGS
iterations per value of c in the generation search instead of 10; the same with
every step attacking the batch before it (``refresh_every=1, refresh_size=32``); and
``LipschitzMonitor(module="net")`` computing the bounds at every epoch's end (``--settings``: these
only; plain training always runs). Each setting's run is bracketed by plain runs, ``--repeats``
times over (the slow every-step setting once): plain, the first setting, plain, the second, ...,
and a last plain run, so that each run compares with the plain runs just before and after it and
a drift of the machine between runs cancels to first order. Each run's epochs after its first
(which warms up) are averaged, so that a refresh every other epoch counts once per two epochs (so
``--epochs`` is odd); a run's cost is its mean against the mean of its two plain neighbours', and
a setting's cost is the median over its repeats. Writes
``benchmarks/results/real_model_cost/results.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
from collections.abc import Callable
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


#: Each setting but plain training, by name: a function that builds its callback afresh.
SETTINGS: dict[str, Callable[[], pl.Callback]] = {
    "pools_layer2_128_rows_every_96_steps": lambda: LayerwiseAdversarialTraining(["layer2"], module="net", refresh_size=128,
                                                                                 refresh_every=96),
    "pools_layer2_256_rows_every_192_steps": lambda: LayerwiseAdversarialTraining(["layer2"], module="net", refresh_size=256,
                                                                                  refresh_every=192),
    "pools_layer2_defaults_7_iterations": lambda: LayerwiseAdversarialTraining(
        ["layer2"], module="net", attack=BoxLBFGS(**{**GENERATION_ATTACK, "iterations": 7})),
    "pools_layer2_refresh_every_step": lambda: LayerwiseAdversarialTraining(["layer2"], module="net", refresh_every=1,
                                                                            refresh_size=BATCH_SIZE),
    "lipschitz_monitor_every_epoch": lambda: LipschitzMonitor(module="net"),
}


#: Settings too slow to repeat: run once.
RUN_ONCE = ("pools_layer2_refresh_every_step",)


def bracketed(settings: dict[str, Callable[[], pl.Callback]], repeats: int,
              run: Callable[[pl.Callback | None], list[float]]) -> dict[str, dict]:
    """Run plain training (``run(None)``), then each setting followed by plain training again,
    ``repeats`` times over (a setting of :data:`RUN_ONCE` once); ``run`` gives a run's seconds per
    epoch. Each run's cost is the mean of its epochs after the first against the mean of the plain
    runs just before and after it (``plain_runs``: their indices); a setting's cost is the median.

    Returns:
        By setting name (``plain`` first): ``epoch_seconds`` per run, ``run_means_after_warmup``,
        ``median_run_mean``, ``ratios_to_plain`` per run, ``ratio_to_plain`` (their median), and for
        pools ``seconds_generating`` and ``pool_size`` per run.
    """
    measured: dict[str, dict] = {"plain": {"epoch_seconds": [run(None)]}}
    for repeat in range(repeats):
        for name, callback_of in settings.items():
            if repeat and name in RUN_ONCE:
                continue
            callback = callback_of()
            entry = measured.setdefault(name, {"epoch_seconds": [], "plain_runs": []})
            entry["epoch_seconds"].append(run(callback))
            plain_before = len(measured["plain"]["epoch_seconds"]) - 1
            entry["plain_runs"].append([plain_before, plain_before + 1])
            if isinstance(callback, LayerwiseAdversarialTraining):
                entry.setdefault("seconds_generating", []).append(callback.seconds_generating)
                entry.setdefault("pool_size", []).append(len(callback.pools["layer2"]))
            measured["plain"]["epoch_seconds"].append(run(None))
    plain = [statistics.mean(seconds[1:]) for seconds in measured["plain"]["epoch_seconds"]]
    for name, entry in measured.items():
        means = [statistics.mean(seconds[1:]) for seconds in entry["epoch_seconds"]]  # each run's epochs after warm-up
        entry["run_means_after_warmup"], entry["median_run_mean"] = means, statistics.median(means)
        references = plain if name == "plain" else \
            [statistics.mean(plain[index] for index in pair) for pair in entry["plain_runs"]]
        entry["ratios_to_plain"] = [mean / reference for mean, reference in zip(means, references)]
        entry["ratio_to_plain"] = statistics.median(entry["ratios_to_plain"])
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="the settings to run beside plain training (default: all)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/real_model_cost"))
    args = parser.parse_args()
    if args.epochs < 3 or args.epochs % 2 == 0:
        parser.error("--epochs must be odd and at least 3: the first epoch warms up and is left out, and a refresh "
                     "every 192 steps falls in every other epoch of the rest")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    chosen = {name: callback_of for name, callback_of in SETTINGS.items() if name in args.settings}
    measured = bracketed(chosen, args.repeats, lambda callback: epoch_seconds(callback, args.epochs, args.accelerator))
    device = torch.cuda.get_device_name(0) if args.accelerator == "gpu" else platform.processor() or platform.machine()
    result = {"model": "torchvision resnet18 (random weights), 32×32 synthetic images",
              "steps_per_epoch": STEPS_PER_EPOCH, "batch_size": BATCH_SIZE, "epochs": args.epochs, "repeats": args.repeats,
              "design": "each setting's run between two plain runs; its ratio against their mean",
              "accelerator": args.accelerator, "device": device, "threads": torch.get_num_threads(),
              "generation_attack": GENERATION_ATTACK, "settings": measured}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", result)  # strict JSON (NaN as null), written atomically
    print("| setting | seconds per epoch | ratio to plain |\n|---|---|---|")
    for name, entry in measured.items():
        print(f"| {name} | {entry['median_run_mean']:.2f} | {entry['ratio_to_plain']:.2f} |")


if __name__ == "__main__":
    main()
