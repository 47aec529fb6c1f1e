"""``advtrain evaluate``: the robustness report of a trained MNIST model, at stated threat models.

For a recipe's run folder (``advtrain train``: its ``model.pt``; ``advtrain adversarial-training``:
one ``<way>.pt`` per way) or a saved state dict or Lightning checkpoint with ``--model``: robust
error at each budget by the ensemble of :mod:`advtrain.robustness` (AutoAttack's standard by
default), the mean minimal distortion of the untargeted search, and the checks that flag a broken
evaluation, on the first ``--examples`` MNIST test images. Writes ``robustness.json`` and the curve
``robustness.png`` to ``--output`` (default: ``robustness/`` in the run folder) and prints a table.

Reads top to bottom: settings, the models, the data, evaluate each, write, print.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn
from torch.utils.data import DataLoader, Dataset

from advtrain.budget import NORMS
from advtrain.data import MNISTDataModule
from advtrain.evaluation import RobustnessReport, evaluate_robustness, write_report
from advtrain.models import MODEL_BUILDERS, build_model
from advtrain.recipes.run_folder import load_weights, write_json
from advtrain.recipes.trainer_parts import on_a_terminal
from advtrain.robustness import Ensemble, check_threat_models

#: The standard MNIST threat models (Madry et al., 2018; RobustBench).
DEFAULT_BUDGETS = ["linf=0.1,0.2,0.3", "l2=1.0,1.5,2.0"]
DEFAULT_EXAMPLES = 1000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``advtrain evaluate``."""
    parser.add_argument("source", type=Path, help="a recipe's run folder, or a model.pt / Lightning .ckpt with --model")
    parser.add_argument("--model", choices=sorted(MODEL_BUILDERS), default=None,
                        help="the architecture of a state dict or checkpoint given directly")
    parser.add_argument("--way", action="append", default=None, help="an adversarial-training run's way (default: every way saved)")
    parser.add_argument("--budgets", nargs="+", default=None, metavar="NORM=EPS,EPS",
                        help=f"threat models, norms {', '.join(NORMS)} (default: {' '.join(DEFAULT_BUDGETS)})")
    parser.add_argument("--examples", type=int, default=None, help=f"the first N MNIST test images (default: {DEFAULT_EXAMPLES})")
    parser.add_argument("--as-trained", action="store_true",
                        help="an adversarial-training run folder: repeat the run's own test evaluation (its test "
                             "images, threat models and search) with this ensemble, to compare with its results.json; "
                             "--budgets then narrows the run's threat models")
    parser.add_argument("--steps", type=int, default=Ensemble.steps, help="APGD's steps")
    parser.add_argument("--targets", type=int, default=Ensemble.targets, help="wrong classes the targeted APGD and FAB-T try")
    parser.add_argument("--fab", action=argparse.BooleanOptionalAction, default=Ensemble.fab,
                        help="run FAB-T, the minimal boundary search (--no-fab: leave it out)")
    parser.add_argument("--ddn", type=int, default=Ensemble.ddn, help="DDN's steps per example in L2 and rms (0: no DDN)")
    parser.add_argument("--queries", type=int, default=Ensemble.queries, help="Square's queries per example (0: no Square)")
    parser.add_argument("--output", type=Path, default=None, help="where to write (default: <run folder>/robustness)")
    parser.add_argument("--data-dir", default=None, help="MNIST root (default: $ADVTRAIN_DATA_DIR, else ~/.cache/advtrain)")
    parser.add_argument("--seed", type=int, default=None, help="seeds every random draw (default: 0; --as-trained: the run's)")


def parse_budgets(tokens: list[str]) -> dict[str, tuple[float, ...]]:
    """``["linf=0.1,0.3", "l2=1"]`` as threat models.

    Raises:
        SystemExit: a token without ``=``, a budget that is not a number, or what
            :func:`~advtrain.robustness.check_threat_models` refuses.
    """
    budgets: dict[str, list[float]] = {}
    for token in tokens:
        norm, _, values = token.partition("=")
        if not values:
            raise SystemExit(f"advtrain evaluate: --budgets {token!r}: write NORM=EPS,EPS (e.g. linf=0.1,0.3)")
        try:
            budgets.setdefault(norm, []).extend(float(value) for value in values.split(","))
        except ValueError as error:
            raise SystemExit(f"advtrain evaluate: --budgets {token!r}: {error}") from error
    try:
        return check_threat_models(budgets)
    except ValueError as error:
        raise SystemExit(f"advtrain evaluate: --budgets: {error}") from error


def built(architecture: str, state: dict, path: Path) -> nn.Module:
    """The builder's module with ``state`` loaded.

    Raises:
        SystemExit: the weights do not fit the architecture.
    """
    module = build_model(architecture).module
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise SystemExit(f"advtrain evaluate: {path} is not a state dict of {architecture}: {error}") from error
    return module.eval()


def models_of(args: argparse.Namespace) -> dict[str, nn.Module]:
    """Name to model for the source: a run folder's model(s), or one file with ``--model``.

    Raises:
        SystemExit: no such source, a folder with no recipe run, a file without ``--model``, an unknown way.
    """
    source: Path = args.source
    if source.is_file():
        if args.model is None:
            raise SystemExit(f"advtrain evaluate: {source} is a file; say which architecture it holds with --model "
                             f"({', '.join(sorted(MODEL_BUILDERS))})")
        return {source.stem: built(args.model, load_weights(source, "evaluate", "source"), source)}
    config_path = source / "config.json"
    if not config_path.is_file():
        raise SystemExit(f"advtrain evaluate: {source} is neither a file nor a recipe's run folder (no config.json)")
    config = json.loads(config_path.read_text())
    if config.get("recipe") == "train":
        return {config["model"]: built(config["model"], load_weights(source / "model.pt", "evaluate", "source"), source)}
    if config.get("recipe") == "adversarial-training":
        from advtrain.recipes.adversarial_training import network

        saved = sorted(path.stem for path in source.glob("*.pt"))
        ways = args.way or saved
        missing = [way for way in ways if way not in saved]
        if missing or not ways:
            raise SystemExit(f"advtrain evaluate: {source} holds no weights for way(s) {missing or ways}; saved: "
                             f"{', '.join(saved) or 'none (the run has not finished a way)'}")
        settings = argparse.Namespace(**config)
        models = {}
        for way in ways:
            module = network(settings, way).module
            module.load_state_dict(load_weights(source / f"{way}.pt", "evaluate", "source"))
            models[way] = module.eval()
        return models
    raise SystemExit(f"advtrain evaluate: {source} is a run of {config.get('recipe')!r}, which saves no model to evaluate; "
                     "give a run folder of train or adversarial-training, or a model.pt with --model")


def markdown(reports: dict[str, RobustnessReport]) -> str:
    """One row per model: clean error, robust error per budget, distortion, failed checks."""
    first = next(iter(reports.values()))
    budgets = [(norm, epsilon) for norm, values in first.robust_error.items() for epsilon in values]
    header = ["model", "clean", *(f"{'L∞' if n == 'linf' else n.upper() if n == 'l2' else 'rms'} {e}" for n, e in budgets),
              "mean min. distortion", "checks failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, report in reports.items():
        cells = [name, f"{report.clean_error:.1%}", *(f"{report.robust_error[n][e]:.1%}" for n, e in budgets),
                 f"{report.mean_distortion:.4f}", ", ".join(report.checks_failed) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def mnist_test_set(data_dir: str | None) -> Dataset:
    """The MNIST test set under ``data_dir``, fetched there where missing."""
    data = MNISTDataModule(data_dir)
    data.prepare_data()
    data.setup("test")
    return data.test_set


def run_threat_models_narrowed(run: Mapping[str, Sequence[float]], chosen: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    """``chosen``, each of which is one of the ``run``'s threat models (norm to budgets).

    Raises:
        SystemExit: a norm or budget of ``chosen`` that the run did not evaluate.
    """
    for norm, budgets in chosen.items():
        missing = [budget for budget in budgets if budget not in run.get(norm, ())]
        if missing:
            raise SystemExit(f"advtrain evaluate: --as-trained --budgets: the run evaluated no {norm} budget "
                             f"{', '.join(f'{b:g}' for b in missing)} (its threat models: "
                             f"{' '.join(f'{n}=' + ','.join(f'{b:g}' for b in bs) for n, bs in run.items())})")
    return {norm: tuple(budgets) for norm, budgets in chosen.items()}


def as_trained(args: argparse.Namespace, models: dict[str, nn.Module], ensemble: Ensemble, output: Path) -> dict[str, dict]:
    """Each way of an ``adversarial-training`` run folder evaluated as the run evaluated it (its
    seeded subset of ``eval_examples`` test images, its threat models, the paper's search) by
    ``ensemble``; written to ``output/robustness.json``, way to report.

    ``--budgets`` narrows the run's threat models to some of them (to re-evaluate one norm after a
    change to its attacks).

    Raises:
        SystemExit: the source is no ``adversarial-training`` run folder, ``--examples`` or
            ``--seed`` is given (the run's own are used), or ``--budgets`` names a threat model the
            run did not evaluate.
    """
    from advtrain.recipes.adversarial_training import evaluation_record, final_evaluation

    config_path = args.source / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if config.get("recipe") != "adversarial-training":
        raise SystemExit(f"advtrain evaluate: --as-trained repeats an adversarial-training run's evaluation; {args.source} "
                         "is no adversarial-training run folder")
    if args.examples is not None or args.seed is not None:
        raise SystemExit("advtrain evaluate: --as-trained evaluates the run's own test images with its seed; leave out "
                         "--examples and --seed")
    evaluation = final_evaluation(20 if config.get("quick") else config["eval_examples"], config["seed"],
                                  config["eval_target"])
    evaluation.ensemble = ensemble
    if args.budgets is not None:
        evaluation.threat_models = run_threat_models_narrowed(evaluation.threat_models, parse_budgets(args.budgets))
    inputs, labels = evaluation.subset(DataLoader(mnist_test_set(args.data_dir)))
    reports = {}
    for way, model in models.items():
        print(f"{way}: evaluating the run's {len(labels)} test images as it did", flush=True)
        started = time.perf_counter()
        report, _ = evaluation.evaluate(model, inputs, labels)
        reports[way] = {"examples": report.examples, "clean_error": report.clean_error, "seed": config["seed"],
                        **evaluation_record(report, ensemble, time.perf_counter() - started)}
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / "robustness.json", reports)
    return reports


def run(args: argparse.Namespace) -> dict[str, RobustnessReport] | dict[str, dict]:
    """Evaluate every model of the source; write and print the report."""
    try:
        ensemble = Ensemble(steps=args.steps, targets=args.targets, queries=args.queries, fab=args.fab, ddn=args.ddn)
    except ValueError as error:
        raise SystemExit(f"advtrain evaluate: {error}") from error
    if not args.as_trained:
        budgets = parse_budgets(args.budgets or DEFAULT_BUDGETS)
        examples = DEFAULT_EXAMPLES if args.examples is None else args.examples
        if examples < 1:
            raise SystemExit(f"advtrain evaluate: --examples must be at least 1, got {examples}")
    output = args.output or (args.source / "robustness" if args.source.is_dir() else args.source.with_name(f"{args.source.stem}-robustness"))
    if (output / "robustness.json").exists():
        raise SystemExit(f"advtrain evaluate: {output} already holds a report; choose another --output: nothing is overwritten")
    if args.as_trained:
        reports = as_trained(args, models_of(args), ensemble, output)
        print(json.dumps({way: report["robust_error"] for way, report in reports.items()}) + f"\nwritten: {output / 'robustness.json'}")
        return reports
    models = models_of(args)
    loader = DataLoader(mnist_test_set(args.data_dir), batch_size=500)
    reports = {}
    for name, model in models.items():
        print(f"{name}: evaluating {examples} test images", flush=True)
        reports[name] = evaluate_robustness(model, loader, budgets, examples=examples, ensemble=ensemble,
                                            seed=args.seed or 0, progress=on_a_terminal())
    json_path, png_path = write_report(reports, output)
    table = markdown(reports)
    (output / "robustness.md").write_text(table)
    print(table + f"\nwritten: {json_path}, {png_path}")
    return reports
