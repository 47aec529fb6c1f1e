"""How much FAB's minimal perturbations hang on gradient coordinates too small to matter: our FAB-T
(9 guide classes, 100 steps, L2) as shipped, with the plane step leaving such coordinates unmoved
(torchattacks' rule: below 1e-8 absolute; or below a share of the row's largest), and torchattacks'
FAB-T, per example on one saved model.

    python benchmarks/fab_variants.py RUN_FOLDER WAY [--examples 100] [--output benchmarks/results/fab_variants]

Where the linearised boundary cannot be reached inside the box, the plane step moves every
coordinate with a non-zero gradient to its bound; on networks trained against L∞ examples most
background pixels have gradients below 1e-8, and moving them all costs a large L2 step. Each
variant's per-example minimal L2 (the smallest over the 9 guide classes, ``inf`` where none
succeeded), its robust error at L2 1, 1.5 and 2, how many examples it ends below the shipped FAB and
above, and the robust error of the shipped FAB and the variant together. torchattacks' FAB-T runs
one target class at a time by ``attack_single_run_targeted`` (no budget), so that its sizes are
minimal too. Also the share of input coordinates whose gradient at the clean input is below 1e-8.
Writes ``results.json`` to ``--output``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import advtrain.attacks.fab as fab_module
from advtrain.attacks import FAB
from advtrain.recipes.run_folder import write_json
from evaluation_benchmark import saved_way_on_test_images  # benchmarks/ is on the path as a script
from evaluation_gap import peer_attacks

BUDGETS = (1.0, 1.5, 2.0)
GUIDE_CLASSES = 9
PEER = "torchattacks' FAB-T"
STEPS = 100


def negligible_left(threshold: float, relative: bool) -> Callable:
    """A plane step that leaves unmoved each coordinate whose gradient is below ``threshold`` (times
    the row's largest where ``relative``), as if its gradient were zero."""
    shipped = fab_module.plane_step

    def plane_step(points, lower, upper, normal, level, norm):
        floor = threshold * normal.abs().amax(1, keepdim=True) if relative else threshold
        return shipped(points, lower, upper, normal * (normal.abs() >= floor), level, norm)

    return plane_step


@contextlib.contextmanager
def plane_step_replaced(step: Callable | None) -> Iterator[None]:
    """Within the block, :class:`~advtrain.attacks.FAB` takes its plane step from ``step`` (None:
    the shipped one)."""
    shipped = fab_module.plane_step
    fab_module.plane_step = step or shipped
    try:
        yield
    finally:
        fab_module.plane_step = shipped


def ours(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example, the smallest L2 of our FAB over the guide classes ranked 1 to 9 (``inf``: none)."""
    best = torch.full((len(labels),), torch.inf)
    for rank in range(1, GUIDE_CLASSES + 1):
        result = FAB(norm="l2", steps=STEPS, guide_rank=rank)(model, images, labels)
        best = torch.minimum(best, torch.where(result.success, result.l2, torch.full_like(best, torch.inf)))
    return best


def torchattacks_fab(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example, the smallest L2 of torchattacks' FAB-T over its 9 target classes, each run alone
    with no budget (``inf``: none)."""
    attack = peer_attacks(model, "l2", 1.0)["FAB-T"]  # AutoAttack's settings, as the gap benchmark runs it
    best = torch.full((len(labels),), torch.inf)
    for target_class in range(2, GUIDE_CLASSES + 2):  # torchattacks' order: 2 is the runner-up
        attack.target_class = target_class
        points = attack.attack_single_run_targeted(images, labels).detach()
        with torch.no_grad():
            wrong = model(points).argmax(1) != labels
        best = torch.minimum(best, torch.where(wrong, (points - images).flatten(1).norm(dim=1), torch.full_like(best, torch.inf)))
    return best


def negligible_share(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, threshold: float = 1e-8) -> float:
    """The share of input coordinates whose gradient of the runner-up margin (FAB-T's first
    linearisation, at the clean input) is below ``threshold`` in size, over the rows given."""
    inputs = images.clone().requires_grad_(True)
    logits = model(inputs)
    rows = torch.arange(len(labels))
    runner_up = logits.detach().clone()
    runner_up[rows, labels] = -torch.inf
    margin = logits[rows, runner_up.argmax(1)] - logits[rows, labels]
    (gradient,) = torch.autograd.grad(margin.sum(), inputs)
    return float((gradient.abs() < threshold).float().mean())


def summary(sizes: torch.Tensor, shipped: torch.Tensor, correct: torch.Tensor) -> dict:
    """A variant's robust errors, median minimal L2, and its per-example comparison with the shipped FAB."""
    together = torch.minimum(sizes, shipped)
    error = lambda found: {f"{budget:g}": float(((found <= budget) | ~correct).float().mean()) for budget in BUDGETS}  # noqa: E731
    return {"robust_error": error(sizes), "median_l2": float(sizes[correct].median()),
            "smaller_than_shipped": int((sizes[correct] < shipped[correct] - 1e-3).sum()),
            "larger_than_shipped": int((sizes[correct] > shipped[correct] + 1e-3).sum()),
            "robust_error_with_shipped": error(together)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_folder", type=Path)
    parser.add_argument("way")
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/fab_variants"))
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    name, model, images, labels, correct = saved_way_on_test_images(args.run_folder, args.way, args.examples, args.data_dir)
    variants: dict[str, Callable | None] = {  # our FAB with each plane step (None: the shipped one)
        "shipped": None,
        "below 1e-8 left (torchattacks' rule)": negligible_left(1e-8, relative=False),
        "below 1e-8 of the row's largest left": negligible_left(1e-8, relative=True),
        "below 1e-6 of the row's largest left": negligible_left(1e-6, relative=True)}
    sizes, seconds = {}, {}
    for variant in [*variants, PEER]:
        started = time.perf_counter()
        if variant == PEER:
            sizes[variant] = torchattacks_fab(model, images, labels)
        else:
            with plane_step_replaced(variants[variant]):
                sizes[variant] = ours(model, images, labels)
        seconds[variant] = time.perf_counter() - started
        print(f"{variant}: {seconds[variant]:.0f} s", flush=True)
    rows = {variant: {**summary(found, sizes["shipped"], correct), "seconds": seconds[variant],
                      "l2_per_example": [None if not torch.isfinite(v) else float(v) for v in found]}
            for variant, found in sizes.items()}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", {"model": name, "run_folder": str(args.run_folder), "examples": len(labels),
                                              "clean_error": float((~correct).float().mean()), "steps": STEPS,
                                              "gradient_share_below_1e-8": negligible_share(model, images[correct],
                                                                                             labels[correct]),
                                              "guide_classes": GUIDE_CLASSES, "threads": torch.get_num_threads(),
                                              "variants": rows})
    for variant, row in rows.items():
        errors = " / ".join(f"{100 * e:.0f}%" for e in row["robust_error"].values())
        print(f"| {variant} | {errors} | {row['median_l2']:.3f} | {row['smaller_than_shipped']} / {row['larger_than_shipped']} |")


if __name__ == "__main__":
    main()
