"""Where a peer's attack beats the evaluation: one saved model, one budget, a peer's attacks one
at a time beside the evaluation: AutoAttack's four (torchattacks, Croce & Hein's standard settings)
or Foolbox's minimum-norm attacks (``--peer foolbox``, as ``evaluation_benchmark.py`` runs them).

    python benchmarks/evaluation_gap.py RUN_FOLDER WAY [--norm l2] [--epsilon 1.0] [--examples 100]
        [--peer autoattack|foolbox|none] [--without-ddn] [--output benchmarks/results/evaluation_gap]

On the first ``--examples`` MNIST test images: the evaluation's robust error (the untargeted
``evaluation_search()`` and the ensemble, as ``benchmarks/evaluation_benchmark.py`` runs them) and
what each attack broke first; each AutoAttack member's robust error alone; and every example a
member broke that the evaluation did not, with the member's perturbation size beside the search's
minimal one. Every break is verified by our own forward pass, the box and the budget. With
``--without-ddn``, the ensemble also runs without DDN after the same search, both timed. Writes
``results.json`` to ``--output``.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from advtrain.attacks import evaluation_search
from advtrain.recipes.run_folder import write_json
from advtrain.robustness import Ensemble, run_ensemble
from evaluation_benchmark import foolbox_members, saved_way_on_test_images, size, verified  # benchmarks/ is on the path as a script


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
    evaluation_seconds: float = math.nan  # the ensemble's, after the search
    attack_error: dict[str, float] = field(default_factory=dict)
    missed: list[Missed] = field(default_factory=list)
    without_ddn: dict | None = None  # ``--without-ddn``: the ensemble's error, tally and seconds without DDN


def foolbox_attacks(model: torch.nn.Module, norm: str) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """Foolbox's minimum-norm attacks for ``norm`` (``evaluation_benchmark.foolbox_members``) by
    name, each a function of (images, labels) to its points."""
    import foolbox

    wrapped = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    return {name: (lambda images, labels, attack=attack: attack(wrapped, images, labels, epsilons=None)[1])
            for name, attack in foolbox_members(norm).items()}


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
    parser.add_argument("--peer", choices=["autoattack", "foolbox", "none"], default="autoattack",
                        help="none: the evaluation alone")
    parser.add_argument("--without-ddn", action="store_true", help="also run the ensemble without DDN, timing both")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/evaluation_gap"))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    name, model, images, labels, correct = saved_way_on_test_images(args.run_folder, args.way, args.examples, args.data_dir)
    search = evaluation_search()(model, images[correct], labels[correct], target="untargeted")
    searched = torch.full((len(labels),), math.nan)
    searched[correct] = torch.where(search.success, size(search.perturbation, args.norm),
                                    torch.full_like(search.l2, math.nan))
    ensemble = Ensemble()
    started = time.perf_counter()
    result = run_ensemble(model, images, labels, {args.norm: [args.epsilon]}, (0.0, 1.0), ensemble=ensemble,
                          search=search)
    broken = result.broken[args.norm][args.epsilon].cpu()
    gap = Gap(name, args.norm, args.epsilon, len(labels), result.robust_error[args.norm][args.epsilon],
              result.broken_by[args.norm][args.epsilon], evaluation_seconds=time.perf_counter() - started)
    if args.without_ddn:  # the same ensemble without DDN, after the same search: DDN's effect and its seconds
        started = time.perf_counter()
        without = run_ensemble(model, images, labels, {args.norm: [args.epsilon]}, (0.0, 1.0),
                               ensemble=replace(ensemble, ddn=0), search=search)
        gap.without_ddn = {"error": without.robust_error[args.norm][args.epsilon],
                           "broken_by": without.broken_by[args.norm][args.epsilon],
                           "seconds": time.perf_counter() - started}
    peers = ({} if args.peer == "none" else foolbox_attacks(model, args.norm) if args.peer == "foolbox"
             else peer_attacks(model, args.norm, args.epsilon))
    for attack, peer in peers.items():
        points = peer(images, labels).detach()
        found = verified(model, images, labels, points, args.norm, args.epsilon)
        gap.attack_error[attack] = float((found | ~correct).float().mean())
        sizes = size(points - images, args.norm)
        gap.missed += [Missed(row, attack, float(sizes[row]), None if math.isnan(searched[row]) else float(searched[row]))
                       for row in (found & ~broken).nonzero()[:, 0].tolist()]
        print(f"{attack}: {gap.attack_error[attack]:.1%} alone", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", {"run_folder": str(args.run_folder), "threads": torch.get_num_threads(),
                                              "peer": args.peer,
                                              "ensemble": asdict(ensemble),
                                              **asdict(gap)})
    print(f"{name}, {args.norm} {args.epsilon:g}: the evaluation {gap.evaluation_error:.1%} ({gap.evaluation_broken_by}, "
          f"{gap.evaluation_seconds:.0f} s)")
    if gap.without_ddn:
        print(f"  without DDN {gap.without_ddn['error']:.1%} ({gap.without_ddn['seconds']:.0f} s)")
    for miss in gap.missed:
        print(f"  example {miss.example}: {miss.attack} {miss.attack_size:.3f}, the search "
              f"{'none' if miss.search_size is None else f'{miss.search_size:.3f}'}")


if __name__ == "__main__":
    main()
