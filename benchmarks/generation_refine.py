"""What the generation search's iterations and final bisection buy: ``BoxLBFGS(**GENERATION_ATTACK)``
with its ``iterations`` and ``refine_steps`` varied, on the activations at resnet18's ``layer2``
(random weights trained one epoch on real_model_cost.py's synthetic images), the rows it classifies
right, one refresh's worth.

    python benchmarks/generation_refine.py [--settings 10:20 10:5 7:5] [--repeats 2] [--rows 256]

A setting is ``ITERATIONS:REFINE_STEPS``. Each attacks the same rows towards the same random wrong
classes (the same generator seed), ``--repeats`` times in turn, so that a drift of the machine
touches every setting alike. Reports each one's median seconds, success rate and mean distortion
(sqrt(mean r²)), and its time as a ratio to the first setting's. Writes
``benchmarks/results/generation_refine/results.json``.
"""

from __future__ import annotations

import argparse
import statistics
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


def setting(text: str) -> tuple[int, int]:
    """``ITERATIONS:REFINE_STEPS`` as two counts."""
    iterations, separator, refine_steps = text.partition(":")
    if not separator or not iterations.isdigit() or not refine_steps.isdigit():
        raise argparse.ArgumentTypeError(f"a setting is ITERATIONS:REFINE_STEPS, e.g. 10:5; got {text!r}")
    return int(iterations), int(refine_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", type=setting, nargs="+", default=[(10, 20), (10, 5), (7, 5)],
                        help="ITERATIONS:REFINE_STEPS of each setting")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/generation_refine"))
    args = parser.parse_args()
    head, activations, labels = layer2_rows(args.rows)
    seconds: dict[tuple[int, int], list[float]] = {settings: [] for settings in args.settings}
    outcome = {}
    for _ in range(args.repeats):
        for iterations, refine_steps in args.settings:
            attack = BoxLBFGS(**{**GENERATION_ATTACK, "iterations": iterations, "refine_steps": refine_steps})
            started = time.perf_counter()
            with torch.no_grad():
                result = attack(head, activations, labels, bounds=(0.0, float("inf")),
                                generator=torch.Generator().manual_seed(0))
            seconds[iterations, refine_steps].append(time.perf_counter() - started)
            outcome[iterations, refine_steps] = (result.success_rate, result.mean_distortion)
    measured = [{"iterations": iterations, "refine_steps": refine_steps, "seconds": runs,
                 "median_seconds": statistics.median(runs), "success_rate": outcome[iterations, refine_steps][0],
                 "mean_distortion": outcome[iterations, refine_steps][1]}
                for (iterations, refine_steps), runs in seconds.items()]
    for entry in measured:
        entry["time_ratio_to_first"] = entry["median_seconds"] / measured[0]["median_seconds"]
    result = {"model": "torchvision resnet18 (random weights, one epoch on synthetic 32x32 images), layer2",
              "rows": int(labels.numel()), "repeats": args.repeats,
              "attack": {k: v for k, v in GENERATION_ATTACK.items() if k not in ("iterations", "refine_steps")},
              "threads": torch.get_num_threads(), "settings": measured}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", result)
    print(f"{labels.numel()} rows\n| iterations | refine steps | median seconds | time / first | success | "
          "mean distortion |\n|---|---|---|---|---|---|")
    for entry in measured:
        print(f"| {entry['iterations']} | {entry['refine_steps']} | {entry['median_seconds']:.2f} | "
              f"{entry['time_ratio_to_first']:.2f} | {entry['success_rate']:.3f} | {entry['mean_distortion']:.5f} |")


if __name__ == "__main__":
    main()
