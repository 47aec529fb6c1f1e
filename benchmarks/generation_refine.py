"""What the generation search's final bisection buys: ``BoxLBFGS(**GENERATION_ATTACK)`` with its
``refine_steps`` varied, on the activations at resnet18's ``layer2`` (random weights trained one
epoch on real_model_cost.py's synthetic images), the rows it classifies right, one refresh's worth.

    python benchmarks/generation_refine.py [--steps 20 5] [--rows 256]

Each setting attacks the same rows towards the same random wrong classes (the same generator
seed). Reports seconds, success rate and mean distortion (sqrt(mean r²)) of each, and each one's
time as a ratio to the first. Writes ``benchmarks/results/generation_refine/results.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from advtrain.attacks import BoxLBFGS
from advtrain.callbacks.layerwise_adversarial_training import GENERATION_ATTACK
from advtrain.layers import cut_at
from advtrain.recipes.run_folder import write_json
from real_model_cost import Plain, data  # benchmarks/ is on the path when this runs as a script


def layer2_rows(rows: int) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The head above layer2, and the layer2 activations and labels of the rows it gets right."""
    module = Plain()
    pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False).fit(module, data())
    net = module.net.eval()
    images, labels = next(iter(DataLoader(data().dataset, batch_size=rows, shuffle=True,
                                          generator=torch.Generator().manual_seed(1))))
    cut = cut_at(net, "layer2", images[:2])
    with torch.no_grad():
        activations, head = cut.bottom(images), cut.head_for(images)
        right = head(activations).argmax(1) == labels
    return head, activations[right], labels[right]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 5], help="refine_steps of each setting")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/generation_refine"))
    args = parser.parse_args()
    head, activations, labels = layer2_rows(args.rows)
    measured = []
    for steps in args.steps:
        attack = BoxLBFGS(**{**GENERATION_ATTACK, "refine_steps": steps})
        started = time.perf_counter()
        with torch.no_grad():
            result = attack(head, activations, labels, bounds=(0.0, float("inf")), generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - started
        measured.append({"refine_steps": steps, "seconds": seconds, "success_rate": result.success_rate,
                         "mean_distortion": result.mean_distortion})
    for entry in measured:
        entry["time_ratio_to_first"] = entry["seconds"] / measured[0]["seconds"]
    result = {"model": "torchvision resnet18 (random weights, one epoch on synthetic 32x32 images), layer2",
              "rows": int(labels.numel()), "attack": {k: v for k, v in GENERATION_ATTACK.items() if k != "refine_steps"},
              "threads": torch.get_num_threads(), "settings": measured}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", result)
    print(f"{labels.numel()} rows\n| refine steps | seconds | time / first | success | mean distortion |\n|---|---|---|---|---|")
    for entry in measured:
        print(f"| {entry['refine_steps']} | {entry['seconds']:.2f} | {entry['time_ratio_to_first']:.2f} | "
              f"{entry['success_rate']:.3f} | {entry['mean_distortion']:.5f} |")


if __name__ == "__main__":
    main()
