"""The evaluation's robust error against torchattacks' AutoAttack and Foolbox's minimum-norm
attacks on the same examples, and its cost against AutoAttack's, measured in one run.

    python benchmarks/evaluation_benchmark.py [--examples 100] [--models-dir runs/evaluation-benchmark]
        [--models NAME ...] [--peers [AutoAttack "AutoAttack 100 steps" Foolbox]]
        [--run-folder runs/FOLDER ... [--ways WAY ...]] [--without-fab] [--without-ddn]

Four MNIST models, trained here first where ``--models-dir`` lacks them (plain PyTorch loops,
seeded): FC100-100-10 trained plainly and with L∞ PGD, the BN SmallResNet trained plainly, and the
ReLU convnet trained with L∞ PGD. ``--run-folder`` takes instead the models an ``advtrain
adversarial-training`` run saved (every way, or ``--ways``), named ``FOLDER: WAY``. On the first ``--examples`` test images (clean mistakes
included), at the standard MNIST budgets (L∞ 0.1, 0.2, 0.3; L2 1.0, 1.5, 2.0):

- ``advtrain``: :func:`advtrain.robustness.run_ensemble` with its defaults, after the untargeted
  :func:`~advtrain.attacks.box_lbfgs.evaluation_search`, exactly as ``AdversarialEvaluation`` runs
  them with threat models, once for all budgets;
- ``AutoAttack``: torchattacks' ``AutoAttack(version="standard")`` as shipped, once per budget.
  Its APGD, APGD-T and FAB take torchattacks' default of 10 steps where Croce & Hein's standard
  version takes 100;
- ``AutoAttack 100 steps``: the same four attacks from torchattacks at Croce & Hein's standard
  settings (100 steps, one restart, nine targets, 5,000 Square queries), once per budget;
- ``Foolbox``: per example the smallest of DDN, FMN and C&W (L2) and of FMN (L∞), counted at
  each budget it fits in.

Every break is verified by our own forward pass, the box and the budget. The minimal distortion
``sqrt(mean r²)`` of the untargeted search is compared per example with the best of Foolbox's
L2 attacks. Writes ``results.json`` and ``results.md`` to ``--output``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from advtrain.attacks import PGD, evaluation_search
from advtrain.data import MNISTDataModule
from advtrain.models import build_model
from advtrain.recipes.run_folder import write_json
from advtrain.robustness import BUDGET_TOLERANCE, Ensemble, run_ensemble

BUDGETS = {"linf": [0.1, 0.2, 0.3], "l2": [1.0, 1.5, 2.0]}
#: name: (architecture, PGD training budget in L∞ or None, epochs, training images)
MODELS = {
    "fc100-100-10 plain": ("fc100-100-10", None, 5, 55_000),
    "fc100-100-10 PGD L∞ 0.1": ("fc100-100-10", 0.1, 5, 55_000),
    "small-resnet plain": ("small-resnet", None, 1, 55_000),
    "convnet PGD L∞ 0.3": ("convnet", 0.3, 4, 20_000),
}


@dataclass
class ModelRow:
    """One model: robust error per method, norm and budget, seconds per method, distortion."""

    model: str
    clean_error: float
    robust_error: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # method, norm, epsilon
    seconds: dict[str, float] = field(default_factory=dict)
    shortfall: float = math.nan  # max over budgets of (best peer - advtrain), in points
    distortion_vs_foolbox: float = math.nan  # mean over examples of ours / Foolbox's best, both found
    distortion: dict[str, float] = field(default_factory=dict)
    checks_failed: list[str] = field(default_factory=list)
    #: per example, the search's and Foolbox's best L2 size (null: not found; 0: a clean mistake), so a
    #: later change of the search can be compared with Foolbox without running Foolbox again
    l2_per_example: dict[str, list[float | None]] = field(default_factory=dict)
    #: norm to budget to what each of the evaluation's attacks broke first there
    broken_by: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)


def train(name: str, architecture: str, pgd_epsilon: float | None, epochs: int, count: int, data: MNISTDataModule,
          models_dir: Path) -> nn.Module:
    """The model, trained here (Adam, batch 128, seeded) where ``models_dir`` lacks it."""
    model = build_model(architecture).module
    path = models_dir / (name.replace(" ", "_").replace("∞", "inf") + ".pt")
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    images, labels = data.train_set.tensors
    count = min(count, len(labels))
    images, labels = images[:count], labels[:count]
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, 128):
            rows = order[start:start + 128]
            inputs = images[rows]
            if pgd_epsilon is not None:  # Madry et al.: train on PGD examples, found in eval mode
                inputs = PGD(epsilon=pgd_epsilon, norm="linf", steps=7, step_size=pgd_epsilon / 4)(
                    model, inputs, labels[rows], generator=generator).attempt
            model.train()
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(inputs), labels[rows]).backward()
            optimizer.step()
        print(f"  {name}: epoch {epoch + 1}/{epochs}", flush=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def size(perturbation: torch.Tensor, norm: str) -> torch.Tensor:
    flat = perturbation.flatten(1)
    return flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)


def verified(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, points: torch.Tensor, norm: str,
             epsilon: float) -> torch.Tensor:
    """Rows whose point is in [0, 1], within ``epsilon`` and misclassified (our own check)."""
    with torch.no_grad():
        fooled = model(points).argmax(1) != labels
    inside = ((points >= 0) & (points <= 1)).flatten(1).all(1)
    return fooled & inside & (size(points - images, norm) <= epsilon * (1 + BUDGET_TOLERANCE))


def autoattack(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int | None = None) -> tuple[dict, float]:
    """AutoAttack's standard ensemble (APGD-CE, APGD-T, FAB-T, Square) from torchattacks, once per
    budget: robust errors and total seconds.

    ``steps=None`` is torchattacks' ``AutoAttack(version="standard")`` as shipped, whose APGD,
    APGD-T and FAB take torchattacks' default of 10 steps; ``steps=100`` builds the same ensemble
    at Croce & Hein's standard settings (100 steps each, as in their ``autoattack`` package: one
    restart, nine target classes, Square with 5,000 queries).
    """
    import torchattacks

    def ensemble(norm: str, epsilon: float):
        if steps is None:
            return torchattacks.AutoAttack(model, norm=norm, eps=epsilon, version="standard", n_classes=10, seed=0)
        return torchattacks.MultiAttack([
            torchattacks.APGD(model, norm=norm, eps=epsilon, steps=steps, n_restarts=1, loss="ce", seed=0),
            torchattacks.APGDT(model, norm=norm, eps=epsilon, steps=steps, n_restarts=1, n_classes=10, seed=0),
            torchattacks.FAB(model, norm=norm, eps=epsilon, steps=steps, n_restarts=1, multi_targeted=True, n_classes=10, seed=0),
            torchattacks.Square(model, norm=norm, eps=epsilon, n_queries=5000, n_restarts=1, seed=0),
        ])

    errors: dict[str, dict[str, float]] = {}
    started = time.perf_counter()
    for norm, epsilons in BUDGETS.items():
        errors[norm] = {}
        for epsilon in epsilons:
            points = ensemble("Linf" if norm == "linf" else "L2", epsilon)(images, labels)
            with torch.no_grad():
                clean_wrong = model(images).argmax(1) != labels
            broken = clean_wrong | verified(model, images, labels, points, norm, epsilon)
            errors[norm][f"{epsilon:g}"] = float(broken.float().mean())
    return errors, time.perf_counter() - started


def foolbox_members(norm: str) -> dict:
    """Foolbox's minimum-norm attacks for ``norm`` by name: DDN, FMN and C&W (L2), FMN (L∞)."""
    import foolbox

    if norm == "l2":
        return {"DDN": foolbox.attacks.DDNAttack(steps=1000), "FMN": foolbox.attacks.L2FMNAttack(steps=1000),
                "C&W": foolbox.attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=1000)}
    return {"FMN": foolbox.attacks.LInfFMNAttack(steps=1000)}


def foolbox_minimal(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[dict, float, torch.Tensor]:
    """Per example, the smallest verified perturbation of Foolbox's minimum-norm attacks
    (``foolbox_members``): robust errors at the budgets, seconds, and the L2 sizes."""
    import foolbox

    wrapped = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    with torch.no_grad():
        clean_wrong = model(images).argmax(1) != labels
    started = time.perf_counter()
    best = {}
    for norm in ("l2", "linf"):
        smallest = torch.full((len(labels),), math.inf)
        for attack in foolbox_members(norm).values():
            _, points, _ = attack(wrapped, images, labels, epsilons=None)
            found = verified(model, images, labels, points, norm, math.inf)
            smallest = torch.minimum(smallest, torch.where(found, size(points - images, norm), torch.full_like(smallest, math.inf)))
        best[norm] = torch.where(clean_wrong, torch.zeros_like(smallest), smallest)
    seconds = time.perf_counter() - started
    errors = {norm: {f"{e:g}": float((best[norm] <= e * (1 + BUDGET_TOLERANCE)).float().mean()) for e in BUDGETS[norm]}
              for norm in BUDGETS}
    return errors, seconds, best["l2"]


def ours(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
         ensemble: Ensemble | None = None) -> tuple[dict, float, torch.Tensor, list[str], dict]:
    """The evaluation as the callback runs it (``ensemble``: its default): robust errors, seconds,
    the search's L2 sizes (``inf`` where it failed, 0 for clean mistakes), the names of failed
    checks, and what each attack broke first at each budget."""
    from advtrain.evaluation_checks import output_checks, result_checks

    started = time.perf_counter()
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
    search = evaluation_search()(model, images[correct], labels[correct], target="untargeted")
    result = run_ensemble(model, images, labels, BUDGETS, (0.0, 1.0), ensemble=ensemble or Ensemble(), search=search)
    seconds = time.perf_counter() - started
    failed = [check.name for check in output_checks(model, images, labels) + result_checks(result)]
    l2 = torch.zeros(len(labels))
    l2[correct] = torch.where(search.success, search.l2, torch.full_like(search.l2, math.inf))
    errors = {norm: {f"{e:g}": value for e, value in values.items()} for norm, values in result.robust_error.items()}
    broken_by = {norm: {f"{e:g}": tally for e, tally in values.items()} for norm, values in result.broken_by.items()}
    return errors, seconds, l2, failed, broken_by


def run_folder_models(folder: Path, ways: list[str] | None) -> dict[str, nn.Module]:
    """The ways an ``advtrain adversarial-training`` run saved in ``folder`` (those of ``ways`` it
    saved, if given), built as the recipe builds them and named ``FOLDER: WAY``.

    Raises:
        SystemExit: ``folder`` saved none of ``ways``.
    """
    from advtrain.recipes.evaluate import models_of

    saved = sorted(path.stem for path in folder.glob("*.pt"))
    chosen = [way for way in ways if way in saved] if ways else None
    if ways and not chosen:
        raise SystemExit(f"evaluation_benchmark: {folder} saved none of the ways {ways}; saved: {', '.join(saved) or 'none'}")
    found = models_of(argparse.Namespace(source=folder, model=None, way=chosen))
    return {f"{folder.name}: {way}": module for way, module in found.items()}


def saved_way_on_test_images(folder: Path, way: str, examples: int, data_dir: str | None
                             ) -> tuple[str, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One way a run folder saved (:func:`run_folder_models`), its parameters frozen, with the first
    ``examples`` MNIST test images: its name, the model, the images, their labels and which of them
    it classifies correctly."""
    (name, model), = run_folder_models(folder, [way]).items()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    data = MNISTDataModule(data_dir)
    data.prepare_data()
    data.setup("test")
    images, labels = (t[:examples] for t in data.test_set.tensors)
    with torch.no_grad():
        correct = model(images).argmax(1) == labels
    return name, model, images, labels, correct


def models(args: argparse.Namespace, data: MNISTDataModule) -> Iterator[tuple[str, nn.Module]]:
    """Name and model, one at a time: the run folders' ways with ``--run-folder``, else
    :data:`MODELS`, trained here where ``--models-dir`` lacks them."""
    if args.run_folder:
        for folder in args.run_folder:
            yield from run_folder_models(folder, args.ways).items()
        return
    for name in args.models:
        architecture, pgd_epsilon, epochs, count = MODELS[name]
        print(f"{name}: training or loading", flush=True)
        yield name, train(name, architecture, pgd_epsilon, epochs, count, data, args.models_dir)


def markdown(rows: list[ModelRow]) -> str:
    """The results as Markdown tables: robust error per budget and method, then seconds."""
    methods = list(rows[0].robust_error) if rows else []
    lines = ["| model | budget | clean | " + " | ".join(methods) + " |", "|---|---|---|" + "---|" * len(methods)]
    for row in rows:
        for norm, epsilons in BUDGETS.items():
            for epsilon in epsilons:
                key = f"{epsilon:g}"
                lines.append(f"| {row.model} | {'L∞' if norm == 'linf' else 'L2'} {key} | {row.clean_error:.1%} | "
                             + " | ".join(f"{row.robust_error[m][norm][key]:.1%}" for m in methods) + " |")
    autoattacks = [m for m in methods if m.startswith("AutoAttack")]
    header = ["model", *(f"{m} s" for m in methods), *(f"ratio to {m}" for m in autoattacks), "shortfall (points)",
              "distortion vs Foolbox", "checks failed"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.model, *(f"{row.seconds[m]:.0f}" for m in methods),
                 *(f"{row.seconds['advtrain'] / row.seconds[m]:.2f}" for m in autoattacks), f"{row.shortfall:+.1f}",
                 f"{row.distortion_vs_foolbox:.4f}", ", ".join(row.checks_failed) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: the method names of the evaluation without FAB-T (``--without-fab``) and without DDN
#: (``--without-ddn``): not peers, so no shortfall
WITHOUT_FAB = "advtrain without FAB-T"
WITHOUT_DDN = "advtrain without DDN"

#: name: what the benchmark runs as that peer
PEERS = {
    "AutoAttack": "torchattacks' AutoAttack(version='standard') as shipped (10 steps)",
    "AutoAttack 100 steps": "the same ensemble at Croce & Hein's standard settings (100 steps)",
    "Foolbox": "per example the smallest of DDN, FMN, C&W (L2) and FMN (L∞)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--models-dir", type=Path, default=Path("runs/evaluation-benchmark"))
    parser.add_argument("--run-folder", type=Path, nargs="+", default=None,
                        help="adversarial-training run folders whose saved ways to evaluate instead of --models")
    parser.add_argument("--ways", nargs="+", default=None, help="with --run-folder: these ways only, where a folder saved them (default: every way saved)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/evaluation"))
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS),
                        help="; ".join(f"{name}: {what}" for name, what in PEERS.items()) + " (none: the evaluation alone)")
    parser.add_argument("--without-fab", action="store_true",
                        help=f"also run the evaluation without FAB-T on each model, as the method {WITHOUT_FAB!r}")
    parser.add_argument("--without-ddn", action="store_true",
                        help=f"also run the evaluation without DDN on each model, as the method {WITHOUT_DDN!r}")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = MNISTDataModule(args.data_dir)
    data.prepare_data()
    data.setup("fit")
    data.setup("test")
    images, labels = (t[: args.examples] for t in data.test_set.tensors)
    rows = []
    for name, model in models(args, data):
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        with torch.no_grad():
            clean_error = float((model(images).argmax(1) != labels).float().mean())
        row = ModelRow(name, clean_error)
        print(f"{name}: advtrain", flush=True)
        row.robust_error["advtrain"], row.seconds["advtrain"], our_l2, row.checks_failed, row.broken_by = ours(model, images, labels)
        for method, asked, ensemble in ((WITHOUT_FAB, args.without_fab, Ensemble(fab=False)),
                                        (WITHOUT_DDN, args.without_ddn, Ensemble(ddn=0))):
            if asked:
                print(f"{name}: {method}", flush=True)
                row.robust_error[method], row.seconds[method], *_ = ours(model, images, labels, ensemble)
        their_l2 = None
        for peer in args.peers:
            print(f"{name}: {peer}", flush=True)
            if peer == "Foolbox":
                row.robust_error[peer], row.seconds[peer], their_l2 = foolbox_minimal(model, images, labels)
            else:
                row.robust_error[peer], row.seconds[peer] = autoattack(model, images, labels,
                                                                       steps=100 if peer == "AutoAttack 100 steps" else None)
        if args.peers:
            row.shortfall = 100 * max(max(row.robust_error[peer][norm][key] for peer in args.peers)
                                      - row.robust_error["advtrain"][norm][key]
                                      for norm in BUDGETS for key in row.robust_error["advtrain"][norm])
        if their_l2 is not None:
            both = torch.isfinite(our_l2) & torch.isfinite(their_l2) & (their_l2 > 0)
            row.distortion_vs_foolbox = float((our_l2[both] / their_l2[both]).mean())
            row.distortion = {"advtrain": float(our_l2[both].mean() / 28), "Foolbox": float(their_l2[both].mean() / 28),
                              "examples": int(both.sum()), "advtrain_found": int(torch.isfinite(our_l2).sum())}
            row.l2_per_example = {"advtrain": our_l2.tolist(), "Foolbox": their_l2.tolist()}  # inf as null
        rows.append(row)
        print(markdown([row]), flush=True)
        args.output.mkdir(parents=True, exist_ok=True)  # after every model, so that a long run keeps what it finished
        write_json(args.output / "results.json", {"examples": args.examples, "budgets": BUDGETS,
                                                  "peers": {p: PEERS[p] for p in args.peers},
                                                  "threads": torch.get_num_threads(), "ensemble": asdict(Ensemble()),
                                                  "run_folders": [str(f) for f in args.run_folder or []], "rows": [asdict(r) for r in rows]})
        (args.output / "results.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
