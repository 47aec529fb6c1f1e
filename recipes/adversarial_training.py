"""``advtrain adversarial-training``: a network on MNIST trained several ways, as in the paper's Section 4.2.

By default FC100-100-10 three ways: weight decay only, dropout, and per-layer adversarial pools
(input and both hidden layers), with the same recipe otherwise. ``--model small-resnet`` trains a
batch-norm residual convnet (:func:`advtrain.models.small_resnet`) with weight decay, without and
with pools at the input and its stage outputs. ``--ways`` adds the alternatives, all through the
same callback: ``input-pools`` (the pools way's settings with its input pool alone), ``pgd`` (PGD
adversarial training, Madry et al. 2018) and ``fast`` (fast adversarial training, Wong et al.
2020), the last two an input pool that holds exactly the batch's own examples, refreshed every
step. Prints test error, robust errors, mean minimal distortion on a fixed test subset, wall time
and training error for each. Reads top to bottom: settings, run
folder, data, then for each way: model, trainer, fit, evaluate; then the table, to the terminal,
the run folder and Weights & Biases.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from inspect import signature
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

from advtrain import Classifier
from advtrain.attacks import BoxLBFGS
from advtrain.callbacks import AdversarialEvaluation, AdversarialReport, LayerwiseAdversarialTraining
from advtrain.data import MNISTDataModule
from advtrain.evaluation import budgets_written
from advtrain.classifier_layer import ClassifierLayer
from advtrain.models import PaperModel, madry_convnet, sigmoid_mlp, small_resnet, wong_convnet
from advtrain.robustness import Ensemble
from advtrain.recipes.paper_models import prepared_mnist
from advtrain.recipes.pools_config import CONFIGS, build_pools, default_pools_config, pools_settings
from advtrain.recipes.run_folder import (config_of, save_weights, start_run_folder, wandb_mode, write_json, write_results,
                                        write_text)
from advtrain.recipes.trainer_parts import RandomState, WallClock, checkpoints, fit, on_a_terminal, progress
from advtrain.recipes.train import DEFAULTS, PENALTY_SCALES, error_on

WAYS = ("weight-decay", "dropout", "pools", "input-pools", "pgd", "fast")
#: The ways that train through LayerwiseAdversarialTraining.
CALLBACK_WAYS = ("pools", "input-pools", "pgd", "fast")
#: The config files of the adversarial-training ways (``recipes/configs/``): every batch replaced
#: by its own adversarial examples, so the recipe sizes their pool and refresh to the batch.
ADVERSARIAL_TRAINING_CONFIGS = {"pgd": CONFIGS / "pgd-mnist.yaml", "fast": CONFIGS / "fast-mnist.yaml"}
#: The standard MNIST threat models (Madry et al., 2018; RobustBench) of the robust errors.
THREAT_MODELS = {"linf": [0.1, 0.2, 0.3], "l2": [1.0, 1.5, 2.0]}
#: A lighter ensemble for the per-epoch validation (a trend to watch); the test figures use the
#: standard one (AutoAttack's effort).
VALIDATION_ENSEMBLE = Ensemble(steps=20, targets=3, queries=300, ddn=100)
MODELS = ("sigmoid-mlp", "small-resnet", "madry-convnet", "wong-convnet")
#: Per-model defaults of the settings left at None on the command line; the last two models are
#: the anchors' (Madry et al.'s and Wong et al.'s MNIST networks), with their optimizers.
MODEL_DEFAULTS = {
    "sigmoid-mlp": {"penalty_scale": PENALTY_SCALES["fc100-100-10"], "lr": DEFAULTS["lr"],
                    "batch_size": DEFAULTS["batch_size"], "eval_target": "nearest", "optimizer": "sgd",
                    "schedule": "cosine"},
    "small-resnet": {"penalty_scale": 1.0, "lr": 0.1, "batch_size": 128, "eval_target": "untargeted",
                     "optimizer": "sgd", "schedule": "cosine"},
    "madry-convnet": {"penalty_scale": 1.0, "lr": 1e-4, "batch_size": 50, "eval_target": "untargeted",
                      "optimizer": "adam", "schedule": "constant"},
    "wong-convnet": {"penalty_scale": 1.0, "lr": 5e-3, "batch_size": 100, "eval_target": "untargeted",
                     "optimizer": "adam", "schedule": "triangular"},
}
#: The networks of ``--model``.
NETWORKS = {"small-resnet": small_resnet, "madry-convnet": madry_convnet, "wong-convnet": wong_convnet}


@dataclass
class WayResult:
    """What one way of training measured."""

    way: str
    test_error: float
    mean_distortion: float
    seconds: float
    train_error: float
    robust_error: dict = field(default_factory=dict)  # norm to budget to robust test error (the ensemble)
    checks_failed: list = field(default_factory=list)
    # The ensemble the robust errors came from, which of its attacks broke each example first (norm
    # to budget to attack to count) and the evaluation's seconds; None in results written before
    # they were recorded.
    ensemble: dict | None = None
    broken_by: dict | None = None
    evaluation_seconds: float | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command line of ``advtrain adversarial-training``."""
    parser.add_argument("--model", choices=MODELS, default="sigmoid-mlp",
                        help="sigmoid-mlp: the paper's FC networks (--hidden); small-resnet: a batch-norm residual convnet; "
                             "madry-convnet, wong-convnet: Madry et al.'s and Wong et al.'s MNIST convnets")
    parser.add_argument("--ways", nargs="+", choices=WAYS, default=None,
                        help="default: weight-decay, dropout and pools for sigmoid-mlp; weight-decay and pools for "
                             "small-resnet")
    parser.add_argument("--epochs", type=int, default=None, help=f"default: {DEFAULTS['epochs']} (1 with --quick)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[100, 100],
                        help="widths of the sigmoid layers (default: the paper's FC100-100-10)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: 64 (sigmoid-mlp), 128 (small-resnet), 50 (madry-convnet), 100 (wong-convnet)")
    parser.add_argument("--lr", type=float, default=None,
                        help="default: 0.3 (sigmoid-mlp), 0.1 (small-resnet), 1e-4 (madry-convnet), 5e-3 (wong-convnet)")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                        help="default: sgd with Nesterov momentum; adam for madry-convnet and wong-convnet")
    parser.add_argument("--schedule", choices=["cosine", "constant", "triangular"], default=None,
                        help="learning-rate schedule (default: cosine; constant for madry-convnet, triangular for "
                             "wong-convnet)")
    parser.add_argument("--penalty-scale", type=float, default=None,
                        help="factor on the model's per-layer penalties (default: 300 for sigmoid-mlp, 1 for small-resnet)")
    parser.add_argument("--dropout", type=float, default=0.2, help="dropout after each hidden layer (the dropout way)")
    parser.add_argument("--eval-target", choices=["nearest", "untargeted"], default=None,
                        help="the minimal-distortion search: every wrong class (nearest, the sigmoid-mlp default) or one "
                             "untargeted search (the small-resnet default)")
    parser.add_argument("--pools", type=Path, default=None,
                        help="YAML of LayerwiseAdversarialTraining's arguments for the pools way, attack and pooling "
                             "nested as class_path/init_args (default: recipes/configs/pools-<model>.yaml)")
    parser.add_argument("--pools-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one setting of the pools and input-pools ways, dotted for nested ones: "
                             "mix_fraction=0.1, attack.init_args.epsilon=0.05 (repeatable)")
    parser.add_argument("--way-config", action="append", default=[], metavar="WAY=PATH",
                        help="YAML of LayerwiseAdversarialTraining's arguments for the pgd or fast way (default: "
                             "recipes/configs/pgd-mnist.yaml, fast-mnist.yaml; repeatable)")
    parser.add_argument("--shift-pixels", type=int, default=0,
                        help="augment every way's training batches with random shifts of up to this many pixels (0: none)")
    parser.add_argument("--eval-examples", type=int, default=200,
                        help="fixed test subset for the minimal distortion and the robust error")
    parser.add_argument("--val-size", type=int, default=5000,
                        help="training images held out to validate on every epoch (0: train on all 60,000, no validation)")
    parser.add_argument("--val-examples", type=int, default=100,
                        help="validation images attacked each epoch (robust error by a lighter ensemble)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--wandb", choices=["offline", "online", "off"], default=None,
                        help="W&B mode (default: online with WANDB_API_KEY set, else offline)")
    parser.add_argument("--output", type=Path, default=Path("runs/adversarial-training"),
                        help="run folder, new or empty (a folder holding another run is refused)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output: finished ways are kept, the way in progress resumes from "
                             "its last epoch's checkpoint")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2,000 images an epoch, one epoch unless --epochs says otherwise, 20 eval examples")


def logger_for(args: argparse.Namespace, way: str) -> pl.loggers.Logger:
    """A W&B logger per way (one run each, grouped), or CSV where W&B is off."""
    mode = wandb_mode(args)
    if mode == "off":
        return pl.loggers.CSVLogger(args.output, name=way)
    from pytorch_lightning.loggers import WandbLogger

    return WandbLogger(project="advtrain", group="adversarial-training", name=way, save_dir=str(args.output),
                       offline=mode == "offline", config={**config_of(args), "way": way})


def network(args: argparse.Namespace, way: str = "weight-decay") -> PaperModel:
    """The network one way trains: the sigmoid MLP of ``--hidden`` (with dropout for that way), or
    the network ``--model`` names."""
    if args.model in NETWORKS:
        return NETWORKS[args.model]()
    return sigmoid_mlp(args.hidden, dropout=args.dropout if way == "dropout" else 0.0)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the settings left at None with the model's defaults (:data:`MODEL_DEFAULTS`)."""
    for name, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.ways is None:
        args.ways = ["weight-decay", "dropout", "pools"] if args.model == "sigmoid-mlp" else ["weight-decay", "pools"]
    if args.epochs is None:
        args.epochs = 1 if args.quick else DEFAULTS["epochs"]
    if args.pools is None:
        args.pools = default_pools_config(args.model)
    return args


def train_one_way(args: argparse.Namespace, way: str, data: MNISTDataModule) -> tuple[Classifier, float]:
    """Train the network (FC100-100-10 by default) one way, from its last checkpoint where an
    earlier attempt left one; return the classifier and the seconds training took (all attempts)."""
    pl.seed_everything(args.seed, workers=True)
    paper_model = network(args, way)
    classifier = Classifier.from_paper_model(paper_model, penalty_scale=args.penalty_scale, lr=args.lr,
                                             optimizer=args.optimizer, schedule=args.schedule)
    folder = args.output / way / "checkpoints"
    clock = WallClock()
    callbacks: list[pl.Callback] = [checkpoints(folder), RandomState(), clock, *progress(way)]
    if way in CALLBACK_WAYS:
        callbacks.append(pools_callback(args, way))
    if args.val_size:  # clean and robust validation error every epoch, on a fixed subset of the held-out images
        callbacks.append(AdversarialEvaluation(examples=min(args.val_examples, args.val_size), budgets=THREAT_MODELS,
                                               ensemble=VALIDATION_ENSEMBLE, figure_examples=0, seed=args.seed,
                                               attack=BoxLBFGS(), target="untargeted"))
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=args.accelerator, devices=1,
        logger=logger_for(args, way), callbacks=callbacks, enable_progress_bar=on_a_terminal(),
        limit_train_batches=2000 // args.batch_size if args.quick else None, num_sanity_val_steps=0,
        log_every_n_steps=10, enable_model_summary=False, limit_val_batches=1.0 if args.val_size else 0,
    )
    fit(trainer, classifier, data, folder, "adversarial-training")
    return classifier, clock.seconds


def pools_callback(args: argparse.Namespace, way: str = "pools") -> LayerwiseAdversarialTraining:
    """The callback of one of :data:`CALLBACK_WAYS`: for ``pools``, from ``--pools`` (the model's
    own file by default) and ``--pools-set``; for ``input-pools``, the same with its input pool
    alone; for ``pgd`` and ``fast``, from their file (``--way-config``) with the pool and the
    refresh sized to the rows mixed into each batch. The resolved settings land in
    ``args.ways_resolved[way]`` (the pools way's also in ``args.pools_resolved``), and so in
    config.json.

    Raises:
        ValueError: a setting the config parser, the callback or its attack refuses, or a
            ``--way-config`` that is not ``WAY=PATH`` for the pgd or fast way.
    """
    resolve_defaults(args)
    path, overrides = way_config(args, way), list(args.pools_set) if way in ("pools", "input-pools") else []
    settings = pools_settings(path, overrides)
    if way == "input-pools":  # the paper's claim tested: all else equal, no hidden-layer pool
        settings["layers"] = ["input"]
        if settings.get("bounds"):
            settings["bounds"] = {layer: box for layer, box in settings["bounds"].items() if layer == "input"}
    if way in ADVERSARIAL_TRAINING_CONFIGS:  # every batch trained on its own examples: a pool of exactly those
        mix_fraction = settings.get("mix_fraction", signature(LayerwiseAdversarialTraining).parameters["mix_fraction"].default)
        mixed = max(1, round(float(mix_fraction) * args.batch_size))
        settings["capacity"] = settings["refresh_size"] = mixed
    try:
        callback, resolved = build_pools(settings, module="model", seed=args.seed)
    except ValueError as error:
        described = "".join(f" --pools-set {override}" for override in overrides)
        raise ValueError(f"{path}{described}: {error}") from error
    if not hasattr(args, "ways_resolved"):
        args.ways_resolved = {}
    args.ways_resolved[way] = resolved
    if way == "pools":
        args.pools_resolved = resolved
    return callback


def way_config(args: argparse.Namespace, way: str) -> Path:
    """The config file of a callback way: ``--pools`` for pools and input-pools, ``--way-config``
    or the recipe's own file for pgd and fast.

    Raises:
        ValueError: a ``--way-config`` entry without ``=`` or for another way.
    """
    given = {}
    for entry in args.way_config:
        name, separator, path = entry.partition("=")
        if not separator or name not in ADVERSARIAL_TRAINING_CONFIGS or not path:
            raise ValueError(f"--way-config takes WAY=PATH with WAY one of {', '.join(ADVERSARIAL_TRAINING_CONFIGS)} (the "
                             f"pools and input-pools ways read --pools), got {entry!r}")
        given[name] = Path(path)
    if way in ADVERSARIAL_TRAINING_CONFIGS:
        return given.get(way, ADVERSARIAL_TRAINING_CONFIGS[way])
    return args.pools


def check_settings(args: argparse.Namespace) -> str:
    """The network's name, after filling the model's defaults; fails before any training where
    ``--hidden`` is not a list of widths, a way does not apply to the model, ``--layers`` names a
    layer the network lacks or the pools way's settings (pools or search) are invalid (the pools
    way would otherwise fail after the other ways trained)."""
    resolve_defaults(args)
    if args.epochs < 1:
        raise SystemExit(f"advtrain adversarial-training: --epochs must be at least 1, got {args.epochs}")
    if args.model != "sigmoid-mlp" and "dropout" in args.ways:
        raise SystemExit(f"advtrain adversarial-training: --ways dropout: the {args.model} has no dropout layers; "
                         "use the other ways")
    try:
        model = network(args)
    except ValueError as error:
        raise SystemExit(f"advtrain adversarial-training: --hidden: {error}") from error
    try:
        MNISTDataModule(args.data_dir, shift_pixels=args.shift_pixels, val_size=args.val_size)  # checks, reads nothing
    except ValueError as error:
        raise SystemExit(f"advtrain adversarial-training: --shift-pixels or --val-size: {error}") from error
    if args.val_examples < 1:
        raise SystemExit(f"advtrain adversarial-training: --val-examples must be at least 1, got {args.val_examples}")
    for way in (way for way in args.ways if way in CALLBACK_WAYS):
        try:
            callback = pools_callback(args, way)  # the config, the callback and its attack check their own settings
        except ValueError as error:
            raise SystemExit(f"advtrain adversarial-training: {way} way: {error}") from error
        example = torch.rand(2, *model.input_shape, generator=torch.Generator().manual_seed(0))
        for layer in callback.layers:
            try:
                with warnings.catch_warnings():  # random example inputs: a box widened for them says nothing
                    warnings.simplefilter("ignore")
                    ClassifierLayer(model.module, layer, example, bounds=callback.bounds_override.get(layer))
            except ValueError as error:
                raise SystemExit(f"advtrain adversarial-training: {way} way: {error}") from error
    return model.name


def final_evaluation(examples: int, seed: int, target: str, *, quick: bool = False) -> AdversarialEvaluation:
    """The test evaluation of every way: robust error at :data:`THREAT_MODELS` by the standard
    ensemble (the lighter one with ``quick``), and the mean minimal distortion by the paper's search
    (no final walk along the boundary: distortions comparable with the paper's and earlier runs)."""
    return AdversarialEvaluation(examples=examples, seed=seed, attack=BoxLBFGS(), target=target, budgets=THREAT_MODELS,
                                 ensemble=VALIDATION_ENSEMBLE if quick else Ensemble())


def evaluation_record(report: AdversarialReport, ensemble: Ensemble, seconds: float) -> dict:
    """What a run records of its final evaluation, in :class:`WayResult` and in ``advtrain evaluate
    --as-trained``'s report alike: the robust errors, which attack broke each example first, the mean
    minimal distortion, the failed checks, the ensemble and the evaluation's ``seconds``."""
    return {"robust_error": budgets_written(report.robust_error),
            "broken_by": budgets_written(report.robustness.broken_by) if report.robustness else None,
            "mean_distortion": report.mean_distortion, "checks_failed": report.checks_failed,
            "ensemble": asdict(ensemble), "seconds": seconds}


def run(args: argparse.Namespace) -> list[WayResult]:
    """Train every way, evaluate, write and print the table."""
    network_name = check_settings(args)
    start_run_folder(args)
    if not args.resume:  # each callback way's settings, every default filled in: pools.yaml, pgd.yaml...
        for way in (way for way in args.ways if way in CALLBACK_WAYS):
            write_text(args.output / f"{way}.yaml", yaml.safe_dump(args.ways_resolved[way], sort_keys=False))
    data = prepared_mnist(args, shift_pixels=args.shift_pixels, val_size=args.val_size)
    test_images, test_labels = data.test_set.tensors
    train_images, train_labels = data.train_set.tensors
    evaluation = final_evaluation(20 if args.quick else args.eval_examples, args.seed, args.eval_target, quick=args.quick)
    subset = evaluation.subset(data.test_dataloader())
    results = []
    for way in args.ways:
        finished = args.output / way / "result.json"
        if finished.is_file():  # an earlier attempt finished this way (--resume)
            results.append(WayResult(**json.loads(finished.read_text())))
            print(f"{way}: finished in an earlier attempt ({finished})")
            continue
        classifier, seconds = train_one_way(args, way, data)
        evaluation_started = time.perf_counter()
        report, _ = evaluation.evaluate(classifier.model, *(t.to(classifier.device) for t in subset))
        recorded = evaluation_record(report, evaluation.ensemble, time.perf_counter() - evaluation_started)
        recorded["evaluation_seconds"] = recorded.pop("seconds")
        results.append(WayResult(way, test_error=error_on(classifier, test_images, test_labels), seconds=seconds,
                                 train_error=error_on(classifier, train_images, train_labels), **recorded))
        save_weights(args.output / f"{way}.pt", classifier.model.state_dict())
        write_json(finished, asdict(results[-1]))
        _finish_wandb(args, results[-1])
    write_results(args, [asdict(r) for r in results], markdown(results, network_name))
    return results


def _finish_wandb(args: argparse.Namespace, result: WayResult) -> None:
    """Log the way's result as a summary and a one-row table, then close its W&B run."""
    if wandb_mode(args) == "off":
        return
    import wandb

    if wandb.run is not None:
        wandb.run.summary.update({"test/err_full": result.test_error, "adv_test/mean_min_distortion": result.mean_distortion})
        wandb.log({"result": wandb.Table(columns=list(asdict(result)), data=[list(asdict(result).values())])})
        wandb.finish()


def markdown(results: list[WayResult], model_name: str = "FC100-100-10") -> str:
    """The comparison table: clean, minimal distortion, robust error at each budget, cost."""
    budgets = [(norm, key) for norm, errors in (results[0].robust_error if results else {}).items() for key in errors]
    robust_header = "".join(f" {'L∞' if norm == 'linf' else 'L2'} {key} |" for norm, key in budgets)
    lines = [f"| {model_name} trained with | test error | mean minimal distortion |{robust_header} wall time | training error |",
             "|---|---|---|" + "---|" * len(budgets) + "---|---|"]
    for r in results:
        robust = "".join(f" {100 * r.robust_error[norm][key]:.1f}% |" if norm in r.robust_error else " – |" for norm, key in budgets)
        lines.append(f"| {r.way} | {100 * r.test_error:.2f}% | {r.mean_distortion:.4f} |{robust} {r.seconds:.0f} s "
                     f"| {100 * r.train_error:.2f}% |")
    return "\n".join(lines) + "\n"
