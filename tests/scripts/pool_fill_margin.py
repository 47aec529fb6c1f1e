"""The margin of ``test_resnet18_in_self_net_fills_every_pool_with_no_other_setting`` over many seeds.

    python tests/scripts/pool_fill_margin.py [--runs 20] [--output benchmarks/results/pool_fill_margin]

The test trains torchvision's resnet18 (random weights, then 10 full-batch steps of plain training)
in ``self.net`` for 6 steps of 16 with pools at ``input``, ``layer2`` and ``layer3`` and the
callback's defaults otherwise, and asserts that every pool holds examples. Here the same run is
repeated with the weights, the data, the shuffling and the callback all seeded by the run's index,
and each pool's size at the end is recorded: the smallest size per layer is the test's margin (the
test fails at 0). ``--pretrain-steps 0`` is the test as it was, on random weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for tests.real_models

from advtrain.callbacks import LayerwiseAdversarialTraining  # noqa: E402
from tests.real_models import PlainModule, images, loader, pretrained  # noqa: E402

LAYERS = ["input", "layer2", "layer3"]
PRETRAIN_STEPS = 10  # full-batch steps of plain training before the run, as the test takes them


def pool_sizes(seed: int, pretrain_steps: int = PRETRAIN_STEPS) -> dict[str, int]:
    """Each pool's size after the test's run, everything seeded by ``seed``."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None, num_classes=2)
    if pretrain_steps:
        net = pretrained(net, *images(96, seed=seed), steps=pretrain_steps)
    callback = LayerwiseAdversarialTraining(layers=LAYERS, module="net", seed=seed)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], max_steps=6)
    trainer.fit(PlainModule(net), loader(*images(96, seed=seed), shuffle=True))
    return {layer: len(pool) for layer, pool in callback.pools.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/pool_fill_margin"))
    args = parser.parse_args()
    runs = []
    for seed in range(args.runs):
        sizes = pool_sizes(seed, args.pretrain_steps)
        runs.append({"seed": seed, "pool_sizes": sizes})
        print(f"seed {seed}: {sizes}", flush=True)
    smallest = {layer: min(run["pool_sizes"][layer] for run in runs) for layer in LAYERS}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(json.dumps({"pretrain_steps": args.pretrain_steps, "runs": runs,
                                                          "smallest": smallest}, indent=2) + "\n")
    print(f"smallest pool per layer over {args.runs} runs: {smallest}")


if __name__ == "__main__":
    main()
