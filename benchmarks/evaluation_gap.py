"""Where a peer's attack beats the evaluation: one saved model, one budget, AutoAttack's four
attacks (torchattacks, Croce & Hein's standard settings) one at a time beside the evaluation.

    python benchmarks/evaluation_gap.py RUN_FOLDER WAY [--norm l2] [--epsilon 1.0] [--examples 100]
        [--output benchmarks/results/evaluation_gap]

On the first ``--examples`` MNIST test images: the evaluation's robust error (the untargeted
``evaluation_search()`` and the ensemble, as ``benchmarks/evaluation_benchmark.py`` runs them) and
what each attack broke first; each AutoAttack member's robust error alone; and every example a
member broke that the evaluation did not, with the member's perturbation size beside the search's
minimal one. Every break is verified by our own forward pass, the box and the budget. Writes
``results.json`` to ``--output``.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from advtrain.attacks import evaluation_search
from advtrain.data import MNISTDataModule
from advtrain.recipes.run_folder import write_json
from advtrain.robustness import Ensemble, run_ensemble
from evaluation_benchmark import run_folder_models, size, verified  # benchmarks/ is on the path as a script


@dataclass
class Missed:
    """An example a peer attack broke within the budget and the evaluation did not."""

    example: int
    attack: str
    attack_size: float
    search_size: float | None  # the search's minimal perturbation, None where it found none


@dataclass
class Gap:
    """The evaluation beside each peer attack alone at one budget."""

    model: str
    norm: str
    epsilon: float
    examples: int
    evaluation_error: float
    evaluation_broken_by: dict[str, int]
    attack_error: dict[str, float] = field(default_factory=dict)
    missed: list[Missed] = field(default_factory=list)


def peer_attacks(model: torch.nn.Module, norm: str, epsilon: float) -> dict:
    """AutoAttack's members at Croce & Hein's standard settings, by name."""
    import torchattacks

    name = "Linf" if norm == "linf" else "L2"
    return {"APGD-CE": torchattacks.APGD(model, norm=name, eps=epsilon, steps=100, n_restarts=1, loss="ce", seed=0),
            "APGD-T": torchattacks.APGDT(model, norm=name, eps=epsilon, steps=100, n_restarts=1, n_classes=10, seed=0),
            "FAB-T": torchattacks.FAB(model, norm=name, eps=epsilon, steps=100, n_restarts=1, multi_targeted=True,
                                      n_classes=10, seed=0),
            "Square": torchattacks.Square(model, norm=name, eps=epsilon, n_queries=5000, n_restarts=1, seed=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("way")
    parser.add_argument("--norm", choices=["linf", "l2"], default="l2")
    parser.add_argument("--epsilon", type=float, default=1.0)
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/evaluation_gap"))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    (name, model), = run_folder_models(args.run_folder, [args.way]).items()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    data = MNISTDataModule(args.data_dir)
    data.prepare_data()
    data.setup("test")
    images, labels = (t[: args.examples] for t in data.test_set.tensors)
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
    search = evaluation_search()(model, images[correct], labels[correct], target="untargeted")
    searched = torch.full((len(labels),), math.nan)
    searched[correct] = torch.where(search.success, size(search.perturbation, args.norm),
                                    torch.full_like(search.l2, math.nan))
    ensemble = Ensemble()
    result = run_ensemble(model, images, labels, {args.norm: [args.epsilon]}, (0.0, 1.0), ensemble=ensemble,
                          search=search)
    broken = result.broken[args.norm][args.epsilon].cpu()
    gap = Gap(name, args.norm, args.epsilon, len(labels), result.robust_error[args.norm][args.epsilon],
              result.broken_by[args.norm][args.epsilon])
    for attack, peer in peer_attacks(model, args.norm, args.epsilon).items():
        points = peer(images, labels).detach()
        found = verified(model, images, labels, points, args.norm, args.epsilon)
        gap.attack_error[attack] = float((found | ~correct).float().mean())
        sizes = size(points - images, args.norm)
        gap.missed += [Missed(row, attack, float(sizes[row]), None if math.isnan(searched[row]) else float(searched[row]))
                       for row in (found & ~broken).nonzero()[:, 0].tolist()]
        print(f"{attack}: {gap.attack_error[attack]:.1%} alone", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", {"run_folder": str(args.run_folder), "threads": torch.get_num_threads(),
                                              "ensemble": asdict(ensemble),
                                              **asdict(gap)})
    print(f"{name}, {args.norm} {args.epsilon:g}: the evaluation {gap.evaluation_error:.1%} ({gap.evaluation_broken_by})")
    for miss in gap.missed:
        print(f"  example {miss.example}: {miss.attack} {miss.attack_size:.3f}, the search "
              f"{'none' if miss.search_size is None else f'{miss.search_size:.3f}'}")


if __name__ == "__main__":
    main()
