"""BoxLBFGS against the exact optimum and Foolbox's minimum-norm attacks, measured in one run.

    python benchmarks/attack_benchmark.py [--examples 100] [--models-dir runs/models]

For each model: the first ``--examples`` MNIST test images the model classifies correctly, one
seeded random wrong target each, the same for every method. Reports success (verified by a fresh
forward pass), mean distortion sqrt(mean r²), mean L2 and L∞ norms over successes, and wall time,
with distortion as a ratio to Foolbox's C&W and time as a ratio to Foolbox's DDN (the shortest of three
runs for DDN and our searches; C&W, the exact optimum and scipy once). ``BoxLBFGS()``
is the default search; ``BoxLBFGS(loss="ce")`` the paper's cross-entropy; ``evaluation_search()``
the evaluation's (``loss="both"`` then 100 steps along the decision boundary), here targeted. For softmax regression,
the exact minimum (a convex QP solved by scipy's SLSQP) is the reference. Then the search on
hidden layers. Models missing from ``--models-dir`` are trained first with the ``advtrain train``
recipe.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from advtrain.attacks import BoxLBFGS, choose_targets
from advtrain.data import MNISTDataModule
from advtrain.layers import cut_at, layer_bounds
from advtrain.models import build_model
from advtrain.recipes import train as train_recipe
from advtrain.recipes.run_folder import config_of, write_json

MODELS = {"fc10-1e-4": [], "fc100-100-10": ["sigmoid1"], "fc200-200-10": [], "convnet": ["pool1", "relu3"],
          "small-resnet": ["stage2"]}
TRAINING = {"convnet": ["--epochs", "5", "--lr", "0.05"], "small-resnet": ["--epochs", "3", "--lr", "0.1", "--batch-size", "128"]}


@dataclass
class Row:
    """One method on one model (or layer)."""

    model: str
    layer: str
    method: str
    examples: int
    success: float
    distortion: float
    seconds: float
    distortion_vs_reference: float = math.nan
    time_vs_ddn: float = math.nan
    l2: float = math.nan
    linf: float = math.nan


def trained_model(name: str, models_dir: Path, data_dir: str | None) -> torch.nn.Module:
    """The model trained by the recipe, training it first where ``model.pt`` is missing. A model
    already there is used only where its run's ``config.json`` holds the settings this benchmark
    trains with (a quick or otherwise different model is refused, naming what differs)."""
    folder = models_dir / name
    parser = argparse.ArgumentParser()
    train_recipe.add_arguments(parser)
    extra = ["--data-dir", data_dir] if data_dir else []
    args = parser.parse_args(["--model", name, "--output", str(folder), *TRAINING.get(name, []), *extra])
    if not (folder / "model.pt").exists():
        train_recipe.run(args)
    else:
        wanted, saved = config_of(args), json.loads((folder / "config.json").read_text())
        ignored = {"output", "data_dir", "resume", "wandb", "accelerator"}  # where and how it ran, not what it learnt
        differ = sorted(key for key in set(wanted) | set(saved) if key not in ignored and wanted.get(key) != saved.get(key))
        if differ:
            raise SystemExit(f"{folder} holds a model trained with other settings than this benchmark's ("
                             + ", ".join(f"{key}: {saved.get(key)!r} there, {wanted.get(key)!r} here" for key in differ)
                             + "); pass another --models-dir, or delete the folder to train it")
    module = build_model(name).module
    module.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    return module.eval().requires_grad_(False)


def correctly_classified(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, count: int):
    """The first ``count`` test images that ``model`` gets right."""
    with torch.no_grad():
        right = model(images[: 20 * count]).argmax(1) == labels[: 20 * count]
    return images[: 20 * count][right][:count], labels[: 20 * count][right][:count]


def rms(perturbation: torch.Tensor) -> torch.Tensor:
    """sqrt(mean r²) per example."""
    return perturbation.flatten(1).pow(2).mean(1).sqrt()


Measured = tuple[float, float, float, float, float]  # success, distortion, seconds, L2, L∞ (means over successes)


def norms(perturbation: torch.Tensor, success: torch.Tensor) -> tuple[float, float, float]:
    """Mean sqrt(mean r²), L2 and L∞ over the successful rows."""
    flat = perturbation.flatten(1)[success]
    return float(flat.pow(2).mean(1).sqrt().mean()), float(flat.norm(dim=1).mean()), float(flat.abs().amax(1).mean())


#: Timed runs of each fast method (DDN and the BoxLBFGS variants); the shortest is reported, as
#: timeit does, so that one slow run of a busy machine does not decide a ratio. C&W and the exact
#: optimum run once.
REPEATS = 3


def timed(call, repeats: int = REPEATS):
    """``(result, seconds)``: the last result and the shortest of ``repeats`` wall times."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - started)
    return result, min(times)


def run_ours(model, images, labels, targets, repeats: int = REPEATS, **settings) -> Measured:
    """Success rate, means over successes, seconds."""
    result, seconds = timed(lambda: BoxLBFGS(**settings)(model, images, labels, target=targets), repeats)
    distortion, l2, linf = norms(result.adversarial - images, result.success)
    return result.success_rate, distortion, seconds, l2, linf


def run_foolbox(attack, model, images, targets, repeats: int = REPEATS) -> Measured:
    """A Foolbox minimum-norm attack, targeted, with success checked by our own forward pass."""
    import foolbox

    wrapped = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
    criterion = foolbox.criteria.TargetedMisclassification(targets)
    (_, adversarial, _), seconds = timed(lambda: attack(wrapped, images, criterion, epsilons=None), repeats)
    with torch.no_grad():
        success = (model(adversarial).argmax(1) == targets) & (adversarial >= 0).flatten(1).all(1) & (adversarial <= 1).flatten(1).all(1)
    distortion, l2, linf = norms(adversarial - images, success)
    return float(success.float().mean()), distortion, seconds, l2, linf


def exact_softmax_regression(model, images, targets, margin: float = 1e-6) -> tuple[float, float, float]:
    """min ‖r‖² s.t. the target logit beats every other by ``margin`` and x + r ∈ [0, 1] (SLSQP)."""
    linear = model.logits
    weight, bias = linear.weight.double().numpy(), linear.bias.double().numpy()
    started = time.perf_counter()
    distortions, successes = [], []
    for image, target in zip(images.flatten(1).double().numpy(), targets.numpy()):
        others = [j for j in range(weight.shape[0]) if j != target]
        a = weight[target] - weight[others]  # (9, 784): a·(x + r) + b ≥ margin
        b = bias[target] - bias[others]
        constraint = {"type": "ineq", "fun": lambda r: a @ (image + r) + b - margin, "jac": lambda r: a}
        bounds = list(zip(-image, 1.0 - image))
        solution = minimize(lambda r: (r @ r, 2 * r), np.zeros_like(image), jac=True, method="SLSQP",
                            constraints=[constraint], bounds=bounds, options={"maxiter": 500, "ftol": 1e-12})
        r = np.clip(solution.x, -image, 1.0 - image)
        logits = weight @ (image + r) + bias
        successes.append(bool(logits.argmax() == target))
        distortions.append(math.sqrt(float(np.mean(r * r))))
    seconds = time.perf_counter() - started
    distortions = np.array(distortions)[np.array(successes)]
    side = math.sqrt(images[0].numel())  # sqrt(D): L2 = distortion · sqrt(D)
    return float(np.mean(successes)), float(distortions.mean()), seconds, float(distortions.mean() * side), math.nan


def benchmark_inputs(name: str, model, images, labels, examples: int) -> list[Row]:
    """Every method on the input layer of one model."""
    import foolbox

    images, labels = correctly_classified(model, images, labels, examples)
    targets = choose_targets("random", labels, None, 10, generator=torch.Generator().manual_seed(0))
    measured: dict[str, Measured] = {}
    if name.startswith("fc10-"):
        measured["exact QP (SLSQP)"] = exact_softmax_regression(model, images, targets)
    measured["Foolbox C&W (9×1000)"] = run_foolbox(
        foolbox.attacks.L2CarliniWagnerAttack(binary_search_steps=9, steps=1000), model, images, targets, repeats=1)
    measured["Foolbox DDN (1000)"] = run_foolbox(foolbox.attacks.DDNAttack(steps=1000), model, images, targets)
    measured["BoxLBFGS()"] = run_ours(model, images, labels, targets)
    measured["BoxLBFGS(loss='both')"] = run_ours(model, images, labels, targets, loss="both")
    measured["BoxLBFGS(loss='ce')"] = run_ours(model, images, labels, targets, loss="ce")
    measured["evaluation_search()"] = run_ours(model, images, labels, targets, loss="both", polish_steps=100)
    if name in ("fc10-1e-4", "fc100-100-10"):
        measured["BoxLBFGS(loss='ce', backend='scipy')"] = run_ours(model, images, labels, targets, loss="ce",
                                                                backend="scipy", repeats=1)
    reference = measured.get("exact QP (SLSQP)", measured["Foolbox C&W (9×1000)"])[1]
    ddn_seconds = measured["Foolbox DDN (1000)"][2]
    return [
        Row(name, "input", method, len(images), success, distortion, seconds, distortion / reference, seconds / ddn_seconds,
            l2, linf)
        for method, (success, distortion, seconds, l2, linf) in measured.items()
    ]


def benchmark_layer(name: str, layer: str, model, images, labels, examples: int) -> list[Row]:
    """BoxLBFGS (each loss) on the activations of one hidden layer, inside that layer's box."""
    images, labels = correctly_classified(model, images, labels, examples)
    cut = cut_at(model, layer, images)
    (box,) = layer_bounds(model, [layer]).values()
    with torch.no_grad():
        activations = cut.bottom(images)
    head = cut.head_for(images)
    targets = choose_targets("random", labels, None, 10, generator=torch.Generator().manual_seed(0))
    rows = []
    for loss in ("margin", "both", "ce"):
        started = time.perf_counter()
        result = BoxLBFGS(loss=loss)(head, activations, labels, target=targets, bounds=box)
        seconds = time.perf_counter() - started
        distortion, l2, linf = norms(result.adversarial - activations, result.success)
        method = "BoxLBFGS()" if loss == "margin" else f"BoxLBFGS(loss={loss!r})"
        rows.append(Row(name, f"{layer} {tuple(float(b) for b in box)}", method, len(images),
                        result.success_rate, distortion, seconds, l2=l2, linf=linf))
    return rows


def markdown(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = ["| model | layer | method | n | success | mean distortion | mean L2 | mean L∞ | vs reference | seconds "
             "| time vs DDN |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "" if math.isnan(row.distortion_vs_reference) else f"{row.distortion_vs_reference:.4f}"
        speed = "" if math.isnan(row.time_vs_ddn) else f"{row.time_vs_ddn:.2f}×"
        linf = "" if math.isnan(row.linf) else f"{row.linf:.4f}"
        lines.append(f"| {row.model} | {row.layer} | {row.method} | {row.examples} | {100 * row.success:.0f}% | "
                     f"{row.distortion:.5f} | {row.l2:.4f} | {linf} | {ratio} | {row.seconds:.1f} | {speed} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run every benchmark, print the table, write JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100)
    parser.add_argument("--models-dir", type=Path, default=Path("runs/models"))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/attack"))
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    torch.manual_seed(0)
    data = MNISTDataModule(args.data_dir, val_size=0)
    data.prepare_data()
    images, labels = data.test_set.tensors
    rows: list[Row] = []
    for name in args.models:
        model = trained_model(name, args.models_dir, args.data_dir)
        rows.extend(benchmark_inputs(name, model, images, labels, args.examples))
        for layer in MODELS[name]:
            rows.extend(benchmark_layer(name, layer, model, images, labels, args.examples))
        print(markdown(rows), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "results.json", [asdict(row) for row in rows])  # strict JSON: NaN as null
    (args.output / "results.md").write_text(markdown(rows))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
