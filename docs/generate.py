"""Every generated table in README.md and docs/*.md, written from the results JSON that the recipes
and benchmarks wrote and that is committed (``docs/results/<run>/`` and ``benchmarks/results/``).

    python docs/generate.py            # rewrite the generated tables (and the training plot) in place
    python docs/generate.py --check    # exit 1, naming each table that differs from its JSON

A generated table sits between ``<!-- generated: NAME -->`` and ``<!-- /generated -->``; nothing else
in the files is touched. ``tests/test_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
BENCHMARKS = REPO / "benchmarks" / "results"
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.S)


def load(path: Path):
    """A committed results file (``null`` for a non-finite number)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.relative_to(REPO)} is missing: run the command that writes it (docs/reproduce.md)")
    return json.loads(path.read_text())


def run_folder(name: str) -> tuple[dict, dict | list, str]:
    """``(config, results, command)`` of the committed run ``docs/results/<name>``."""
    folder = RESULTS / name
    return load(folder / "config.json"), load(folder / "results.json"), (folder / "command.txt").read_text().strip()


def percent(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{100 * value:.{digits}f}%"


def share(value: float) -> str:
    """A robust error of a few hundred examples as a percentage, to the half point it can take: ``28.5%``, ``95%``."""
    return f"{round(100 * value, 1):g}%"


def number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def short_command(command: str) -> str:
    """The command without the run's own folder, W&B mode and data root. An adversarial-training
    run made before it validated (no ``--val-size``) trained on all 60,000 images: ``--val-size 0``
    says so, and repeats it now."""
    command = re.sub(r" --(output|data-dir|models-dir) \S+", "", command)
    if command.startswith("advtrain adversarial-training") and "--val-size" not in command:
        command += " --val-size 0"
    return re.sub(r" --wandb \S+", "", command).replace("advtrain ", "advtrain ", 1)


# --------------------------------------------------------------------------------------------
# Tables


def knobs() -> str:
    """The callback's constructor: name, default, meaning (the first sentence of its Args entry)."""
    from advtrain.callbacks import LayerwiseAdversarialTraining

    doc = inspect.getdoc(LayerwiseAdversarialTraining) or ""
    args = doc.split("Args:", 1)[1].split("\n\n", 1)[0]
    meanings: dict[str, str] = {}
    current = None
    for line in args.splitlines():
        match = re.match(r"\s{4}(\w+): (.*)", line)
        if match:
            current = match.group(1)
            meanings[current] = match.group(2)
        elif current:
            meanings[current] += " " + line.strip()
    rows = []
    for name, parameter in inspect.signature(LayerwiseAdversarialTraining).parameters.items():
        default = "required" if parameter.default is inspect.Parameter.empty else repr(parameter.default)
        meaning = re.split(r"(?<=\.)\s", meanings.get(name, ""), maxsplit=1)[0]
        meaning = re.sub(r":(class|func|meth|mod):`~?([\w.]+)`", r"`\2`", meaning).replace("``", "`")
        rows.append([f"`{name}`", f"`{default}`", meaning])
    return table(["knob", "default", "what it does"], rows)


def attack_benchmark() -> str:
    rows = load(BENCHMARKS / "attack" / "results.json")
    out = []
    for row in rows:
        ratio = "" if row.get("distortion_vs_reference") is None else f"{row['distortion_vs_reference']:.4f}"
        speed = "" if row.get("time_vs_ddn") is None else f"{row['time_vs_ddn']:.2f}×"
        out.append([row["model"], row["layer"], row["method"], f"{100 * row['success']:.0f}%", number(row["distortion"], 5),
                    number(row.get("l2"), 3), number(row.get("linf"), 3), ratio, f"{row['seconds']:.1f}", speed])
    return table(["model", "layer", "method", "success", "sqrt(mean r²)", "L2", "L∞", "vs C&W (or exact)", "seconds",
                  "time vs DDN"], out)


def attack_summary() -> str:
    """``BoxLBFGS()`` against the reference and DDN, one line per model on its inputs."""
    rows = [row for row in load(BENCHMARKS / "attack" / "results.json")
            if row["method"] == "BoxLBFGS()" and row["layer"] == "input"]
    lines = []
    for row in rows:
        reference = "the exact optimum" if row["model"].startswith("fc10-") else "C&W"
        lines.append(f"- {row['model']}: {row['distortion_vs_reference']:.4f}× {reference}'s distortion in "
                     f"{row['time_vs_ddn']:.2f}× DDN's time, {100 * row['success']:.0f}% found")
    return "\n".join(lines) + "\n"


def targeted_search() -> str:
    """The evaluation's search run targeted (random wrong classes) on the ReLU convnet's inputs,
    beside BoxLBFGS() and Foolbox's C&W and DDN on the same examples and targets."""
    rows = [row for row in load(BENCHMARKS / "attack_convnet_evaluation_search" / "results.json") if row["layer"] == "input"]
    out = [[row["method"], f"{100 * row['success']:.0f}%", number(row["distortion"], 5),
            f"{row['distortion_vs_reference']:.4f}×", f"{row['time_vs_ddn']:.2f}×"] for row in rows]
    return table(["method (convnet, targeted)", "found", "sqrt(mean r²)", "vs C&W", "time vs DDN"], out)


def attack_headline() -> str:
    """Per model, on its inputs: the distortion of ``BoxLBFGS()``, C&W, DDN (and the exact optimum
    where known), ``BoxLBFGS()``'s distortion against C&W's and its time against DDN's."""
    rows = [row for row in load(BENCHMARKS / "attack" / "results.json") if row["layer"] == "input"]
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["method"]] = row
    out = []
    for model, methods in by_model.items():
        ours, cw, ddn = methods["BoxLBFGS()"], methods["Foolbox C&W (9×1000)"], methods["Foolbox DDN (1000)"]
        exact = methods.get("exact QP (SLSQP)", {}).get("distortion")
        out.append([model, number(ours["distortion"], 5), number(cw["distortion"], 5), number(ddn["distortion"], 5),
                    number(exact, 5), f"{ours['distortion'] / cw['distortion']:.4f}×", f"{ours['time_vs_ddn']:.2f}×",
                    " / ".join(f"{100 * row['success']:.0f}%" for row in (ours, cw, ddn))])
    return table(["model", "BoxLBFGS()", "C&W (9×1000)", "DDN (1000)", "exact optimum", "BoxLBFGS() vs C&W",
                  "BoxLBFGS() time vs DDN", "found (ours / C&W / DDN)"], out)


#: The section 4.2 runs, by setting: (label, run folders by seed).
TRAINING_SETTINGS = [
    ("FC100-100-10, input pools of fast-gradient steps of each batch's own half, one-pixel shifts, 120 epochs",
     ["target-shift1-seed0", "target-shift1-seed1"]),
    ("FC100-100-10, the paper's three pools (5% of each batch), 30 epochs", ["adversarial-training"]),
    ("SmallResNet (batch norm), pools at the input and three stage outputs, 5 epochs",
     ["adversarial-training-small-resnet"]),
]
#: The figure's short names of the settings above, in order.
SHORT_NAMES = ["FC100, shifts, 120 epochs", "FC100, 30 epochs", "SmallResNet"
]


def training_runs() -> list[tuple[str, list[tuple[int, dict, list, str]]]]:
    """The committed section 4.2 runs that exist, by setting: (seed, config, results, command)."""
    found = []
    for label, names in TRAINING_SETTINGS:
        runs = []
        for name in names:
            config, results, command = run_folder(name)
            runs.append((config.get("seed", 0), config, results, command))
        found.append((label, runs))
    return found


def training() -> str:
    """Every way of every section 4.2 setting: test error and minimal distortion per seed."""
    rows = []
    for label, runs in training_runs():
        ways = [entry["way"] for entry in runs[0][2]]
        for way in ways:
            by_seed = [next(entry for entry in results if entry["way"] == way) for _, _, results, _ in runs]
            errors = ", ".join(percent(entry["test_error"]) for entry in by_seed)
            distortions = ", ".join(number(entry["mean_distortion"]) for entry in by_seed)
            seeds = ", ".join(str(seed) for seed, *_ in runs)
            wall = ", ".join(minutes(entry["seconds"]) for entry in by_seed)
            robust = [robust_errors(by_seed, norm) for norm in ("linf", "l2")]
            rows.append([label, way, seeds, errors, *robust, distortions, wall])
    return table(["setting", "way", "seeds", "test error", "robust error L∞ 0.1 / 0.2 / 0.3",
                  "robust error L2 1 / 1.5 / 2", "mean minimal distortion", "training time"], rows)


def robust_errors(by_seed: list[dict], norm: str) -> str:
    """A way's robust test errors at ``norm``'s budgets, seeds separated by ``;`` (``–`` where a run
    has none)."""
    def one(entry: dict) -> str:
        errors = entry.get("robust_error", {}).get(norm)
        return " / ".join(share(value) for value in errors.values()) if errors else "–"

    return "; ".join(one(entry) for entry in by_seed)


def training_commands() -> str:
    rows = []
    for label, runs in training_runs():
        command = short_command(runs[0][3])
        command = re.sub(r" --seed \S+", "", command) + (" --seed S" if len(runs) > 1 else "")
        rows.append([label, f"`{command}`"])
    return table(["setting", "command"], rows)


#: The ways-to-train runs (``advtrain adversarial-training --ways ...``), by model: folders of one
#: seed each; a later folder adds the ways the earlier folders of its seed lack, each way's time a
#: ratio to the weight decay of its own folder.
WAYS_RUNS = [("FC100-100-10", ["ways-fc100-seed0", "ways-fc100-seed1"]),
             ("SmallResNet", ["ways-small-resnet-seed0", "ways-small-resnet-seed1", "ways-small-resnet-pgd-seed0",
                             "ways-small-resnet-pgd-seed1"])]
#: The ways in the order the table lists them, with what each is.
WAYS = {"weight-decay": "weight decay only", "pools": "the paper's, at the input and hidden layers",
        "input-pools": "the same, at the input only", "pgd": "PGD adversarial training",
        "fast": "fast adversarial training"}


#: The ways table's runs whose own evaluation ran with FAB-T, from before the recipe recorded its
#: ensemble (the others of that time ran before FAB-T joined; none ran with DDN).
EVALUATED_WITH_FAB = {"ways-small-resnet-pgd-seed1"}
#: Where a run folder's saved weights, re-evaluated by the current ensemble (``advtrain evaluate``,
#: the commands in docs/reproduce.md), write their report: ``docs/results/<run>/re-evaluation*/``
#: (one folder per command: ``re-evaluation-<way>`` where each way ran on its own).
RE_EVALUATION = "re-evaluation"


@dataclass
class WaysFolder:
    """One committed ways-to-train run folder: its seed, results entries, command and name."""

    seed: int
    results: list[dict]
    command: str
    name: str


@dataclass
class WayRun:
    """One way trained from one seed: its results entry, the weight decay of the same run folder,
    which of the ensemble's later attacks its training run's evaluation had, and the reports of its
    saved weights re-evaluated since, where committed (those by the two-window Square first)."""

    seed: int
    entry: dict
    baseline: dict | None
    evaluated_with: str = "no FAB-T or DDN"
    re_evaluations: list[dict] = field(default_factory=list)

    @property
    def time_ratio(self) -> float | None:
        return self.entry["seconds"] / self.baseline["seconds"] if self.baseline else None

    def report_for(self, norm: str) -> dict | None:
        """The re-evaluation that the robust errors in ``norm`` come from: the first that measured
        that norm."""
        return next((report for report in self.re_evaluations if norm in report.get("robust_error", {})), None)

    @property
    def re_evaluation(self) -> dict | None:
        """The first re-evaluation at every threat model of the run (not one narrowed to a norm)."""
        norms = set(self.entry.get("robust_error", {}))
        return next((report for report in self.re_evaluations if set(report.get("robust_error", {})) >= norms), None)

    @property
    def robust_error(self) -> dict:
        """Norm to budget to robust error: the most that the training run's evaluation or any
        re-evaluation of the same weights and test images found there. Each counts only verified
        breaks, so the most of them is still a lower bound (of the union of their breaks); they
        differ by an example or two where thread counts round APGD's path differently."""
        reports = [self.entry, *self.re_evaluations]
        return {norm: {budget: max(report["robust_error"][norm][budget] for report in reports
                                   if norm in report.get("robust_error", {}))
                       for budget in errors}
                for norm, errors in self.entry.get("robust_error", {}).items()}

    @property
    def attacks(self) -> str:
        """Which of FAB-T and DDN the robust errors shown had, and whether the L2 ones Square's two
        windows (its L∞ form is the same in both)."""
        if not self.re_evaluations:
            return self.evaluated_with
        l2 = self.report_for("l2")
        return attacks_named((self.re_evaluation or self.re_evaluations[0])["ensemble"]) + (
            " (re-evaluated; L2 with the two-window Square)" if l2 is not None and by_two_window_square(l2) else " (re-evaluated)")


def by_two_window_square(report: dict) -> bool:
    """Whether ``report``'s ensemble drew Square's two-window L2 proposal (Andriushchenko et al.'s
    Algorithm 3): results since record it as ``square_l2``; earlier ones drew one window."""
    return (report.get("ensemble") or {}).get("square_l2") == "two-window"


def attacks_named(ensemble: dict) -> str:
    """Which of the ensemble's later attacks, FAB-T and DDN, ``ensemble`` (as written) ran."""
    return {(True, True): "FAB-T and DDN", (True, False): "FAB-T, no DDN", (False, True): "DDN, no FAB-T",
            (False, False): "no FAB-T or DDN"}[(bool(ensemble.get("fab")), bool(ensemble.get("ddn")))]


def ways_runs() -> list[tuple[str, list[WaysFolder]]]:
    """The committed ways-to-train runs that exist, by model."""
    found = []
    for model, names in WAYS_RUNS:
        runs = [WaysFolder(config.get("seed", 0), results, command, name)
                for name, (config, results, command) in ((name, run_folder(name)) for name in names if (RESULTS / name).is_dir())]
        if runs:
            found.append((model, runs))
    return found


def same_weights(entry: dict, other: dict) -> bool:
    """Whether two results entries of one way come from the same weights: the same test and training
    error and the same minimal distortion of the search, to the last digit (training is
    deterministic on one machine at one thread count). Their robust errors may differ: they depend
    on the ensemble of the day."""
    keys = ("test_error", "train_error", "mean_distortion")
    return all(entry.get(key) == other.get(key) for key in keys)


def re_evaluations(way: str, entry: dict, folder: str) -> list[dict]:
    """The committed re-evaluations of ``way``'s weights whose results ``entry`` (of run folder
    ``folder``) shows: from ``advtrain evaluate --as-trained`` on its own run folder or on a rerun
    that trained the same weights (:func:`same_weights`), then the own evaluations of such reruns
    where their results record the ensemble (runs since the recipe records it); those by the
    two-window Square first, then those at every threat model of the run before narrowed ones.

    Raises:
        ValueError: the re-evaluation ran on other test images than the training run's evaluation
            (another count or seed), so its figures do not compare.
    """
    candidates = []  # (where, report, the folder whose weights it evaluated)
    for path in sorted(RESULTS.glob(f"*/{RE_EVALUATION}*/robustness.json")):
        candidates.append((path, load(path).get(way), path.parent.parent))
    for path in sorted(RESULTS.glob("*/results.json")):
        if path.parent.name == folder:
            continue
        results = load(path)
        if not isinstance(results, list):  # another recipe's results
            continue
        rerun = next((other for other in results if other.get("way") == way and other.get("ensemble")), None)
        if rerun is not None:
            config = load(path.parent / "config.json")
            candidates.append((path, {**rerun, "examples": config.get("eval_examples"), "seed": config.get("seed"),
                                      "seconds": rerun["evaluation_seconds"]}, path.parent))
    found = []
    for path, report, trained_in in candidates:
        rerun = next((other for other in load(trained_in / "results.json") if other["way"] == way), None)
        if report is None or rerun is None or not same_weights(entry, rerun):
            continue
        for config_path in (trained_in / "config.json", RESULTS / folder / "config.json"):  # the rerun's, the table's
            config = load(config_path) if config_path.is_file() else None
            if config is not None and (report["examples"], report.get("seed")) != (config.get("eval_examples"), config.get("seed")):
                raise ValueError(f"{path.relative_to(REPO)}: {way} re-evaluated on {report['examples']} test images with "
                                 f"seed {report.get('seed')}, its training run on {config.get('eval_examples')} with seed "
                                 f"{config.get('seed')}: re-evaluate with advtrain evaluate --as-trained")
        found.append(report)
    norms = set(entry.get("robust_error", {}))
    return sorted(found, key=lambda report: (not by_two_window_square(report), set(report["robust_error"]) < norms))


def way_runs(runs: list[WaysFolder], way: str) -> list[WayRun]:
    """``way`` on each seed that trained it, from the first folder of the seed that holds it, by seed."""
    chosen: dict[int, WayRun] = {}
    for run in runs:
        entry = next((entry for entry in run.results if entry["way"] == way), None)
        if entry is not None and run.seed not in chosen:
            evaluated_with = attacks_named(entry["ensemble"]) if entry.get("ensemble") else \
                "FAB-T, no DDN" if run.name in EVALUATED_WITH_FAB else "no FAB-T or DDN"
            chosen[run.seed] = WayRun(run.seed, entry, next((e for e in run.results if e["way"] == "weight-decay"), None),
                                      evaluated_with, re_evaluations(way, entry, run.name))
    return [chosen[seed] for seed in sorted(chosen)]


def ways() -> str:
    """Every way of training beside weight decay: clean and robust error, minimal distortion, and
    training time as a ratio to weight decay's in the same run, per seed."""
    rows = []
    for model, runs in ways_runs():
        for way, meaning in WAYS.items():
            by_seed = way_runs(runs, way)
            if not by_seed:
                continue
            entries = [run.entry for run in by_seed]
            robust = [{"robust_error": run.robust_error} for run in by_seed]
            ratios = ", ".join("–" if run.time_ratio is None else f"{run.time_ratio:.1f}×" for run in by_seed)
            rows.append([model, f"`{way}`: {meaning}", ", ".join(str(run.seed) for run in by_seed),
                         ", ".join(percent(entry["test_error"]) for entry in entries),
                         robust_errors(robust, "linf"), robust_errors(robust, "l2"),
                         "; ".join(run.attacks for run in by_seed),
                         ", ".join(number(entry["mean_distortion"]) for entry in entries), ratios])
    return table(["model", "way", "seeds", "test error", "robust error L∞ 0.1 / 0.2 / 0.3", "robust error L2 1 / 1.5 / 2",
                  "the evaluation had, per seed", "mean minimal distortion", "training time / weight decay's"], rows)


def ways_re_evaluation() -> str:
    """Each way whose saved weights were re-evaluated as trained by the current ensemble: its robust
    errors as its training run measured them and now, the distortion of the same search both times,
    and what FAB-T and DDN broke first."""
    rows = []
    for model, runs in ways_runs():
        for way in WAYS:
            for run in way_runs(runs, way):
                report = run.re_evaluation
                if report is None:
                    continue
                then = [{"robust_error": run.entry["robust_error"]}]
                now = [{"robust_error": report["robust_error"]}]
                broken = {name: sum(tally.get(name, 0) for budgets in report["broken_by"].values() for tally in budgets.values())
                          for name in ("fab-t", "ddn")}
                rows.append([model, f"`{way}`, seed {run.seed}", run.evaluated_with,
                             f"{robust_errors(then, 'linf')} → {robust_errors(now, 'linf')}",
                             f"{robust_errors(then, 'l2')} → {robust_errors(now, 'l2')}",
                             f"{broken['fab-t']} / {broken['ddn']}",
                             f"{number(run.entry['mean_distortion'])} / {number(report['mean_distortion'])}",
                             f"{report['seconds']:.0f}"])
    if not rows:
        return "(not run yet)"
    return table(["model", "way", "the training run's evaluation had", "robust error L∞ 0.1 / 0.2 / 0.3, then → now",
                  "robust error L2 1 / 1.5 / 2, then → now", "examples FAB-T / DDN broke first, all budgets",
                  "the search's mean minimal distortion, then / now", "re-evaluation s"], rows)


def ways_square_l2() -> str:
    """Each way whose L2 column was re-evaluated by the two-window Square (``advtrain evaluate
    --as-trained --budgets l2=...``): the L2 robust errors by the one-window ensemble and now, and
    the examples Square broke first at each budget."""
    rows = []
    for model, runs in ways_runs():
        for way in WAYS:
            for run in way_runs(runs, way):
                now = run.report_for("l2")
                if now is None or not by_two_window_square(now):
                    continue
                before = next((report for report in run.re_evaluations if not by_two_window_square(report)), run.entry)
                square = " / ".join(str(now["broken_by"]["l2"][budget].get("square", 0)) for budget in now["broken_by"]["l2"])
                rows.append([model, f"`{way}`, seed {run.seed}",
                             f"{robust_errors([before], 'l2')} → {robust_errors([now], 'l2')}", square, f"{now['seconds']:.0f}"])
    if not rows:
        return "(not run yet)"
    return table(["model", "way", "robust error L2 1 / 1.5 / 2, one-window Square → two-window", "examples Square broke first, L2 1 / 1.5 / 2",
                  "re-evaluation s"], rows)


#: The evaluation benchmark's runs on the ways table's models (``--run-folder``): the recipe's
#: saved weights against AutoAttack at 100 steps and Foolbox on the same images.
WAYS_PEER_CHECKS = ["evaluation_ways", "evaluation_ways_fast_small_resnet", "evaluation_ways_fc100", "evaluation_ways_fc100_fab",
                    "evaluation_ways_pgd_small_resnet", "evaluation_ways_pgd_small_resnet_seed1"]
#: The run folders it read, by the ways table's run they stand for (reruns the ways table matched
#: figure for figure stand for its own run, whose weights were not kept).
WAYS_PEER_FOLDERS = {"ways-small-resnet-seed1": "SmallResNet, seed 1",
                     "ways-small-resnet-pgd-seed0": "SmallResNet, seed 0", "ways-small-resnet-pgd-seed1": "SmallResNet, seed 1",
                     "ways-pgd-alone-2threads-seed0": "FC100-100-10, seed 0 (the rerun that matches the table)",
                     "ways-fast-alone-2threads-seed0": "FC100-100-10, seed 0 (the rerun that matches the table)"}


def ways_peer_check() -> str:
    """Each checked way's robust error by the evaluation beside AutoAttack (100 steps) and
    Foolbox's best on the same test images, by how much the best peer found more at the worst budget
    (negative: less everywhere), the
    search's distortion against Foolbox's per example, and the evaluation's seconds against AutoAttack's."""
    results = [load(path) for path in (BENCHMARKS / name / "results.json" for name in WAYS_PEER_CHECKS) if path.is_file()]
    if not results:
        return "(not run yet)"
    result = results[0]
    if any((other["examples"], other["budgets"], other["threads"]) != (result["examples"], result["budgets"], result["threads"])
           for other in results):
        raise ValueError(f"{WAYS_PEER_CHECKS}: the runs differ in examples, budgets or threads; one table cannot hold them")
    rows = []
    for other, row in ((other, row) for other in results for row in other["rows"]):
        folder, way = row["model"].split(": ")
        methods = list(row["robust_error"])
        cells = []
        for norm in ("linf", "l2"):
            cells.append("; ".join(" / ".join(share(row["robust_error"][method][norm][f"{e:g}"]) for e in result["budgets"][norm])
                                   for method in methods))
        hundred = row["seconds"].get("AutoAttack 100 steps")
        rows.append([WAYS_PEER_FOLDERS.get(folder, folder), f"`{way}`", ensemble_name(other), "; ".join(methods[1:]),
                     percent(row["clean_error"], 0), *cells,
                     f"{row['shortfall']:+.1f}",
                     f"{row['distortion_vs_foolbox']:.3f}× ({row['distortion']['examples']} examples)" if row.get("distortion") else "–",
                     f"{row['seconds']['advtrain'] / hundred:.2f}×" if hundred else "–",
                     ", ".join(row["checks_failed"]) or "none"])
    return (f"The first {result['examples']} MNIST test images, {result['threads']} CPU thread(s); each cell: advtrain, "
            "then each peer the row ran, in the order of its column \"peers\".\n\n"
            + table(["model", "way", "the evaluation's attacks", "peers", "clean error", "robust error L∞ 0.1 / 0.2 / 0.3", "robust error L2 1 / 1.5 / 2",
                     "best peer − advtrain, worst budget (points)", "the search's L2 against Foolbox's best, per example",
                     "advtrain s / AutoAttack s", "checks failed"], rows))


def fab_variants(folder: str = "fab_variants_pgd_small_resnet") -> str:
    """``benchmarks/fab_variants.py``: our FAB-T's plane step as shipped and leaving negligible
    gradient coordinates unmoved, beside torchattacks' FAB-T, per example on one model."""
    result = load(BENCHMARKS / folder / "results.json")
    rows = [[variant, " / ".join(share(error) for error in row["robust_error"].values()), f"{row['median_l2']:.3f}",
             "–" if variant == "shipped" else f"{row['smaller_than_shipped']} / {row['larger_than_shipped']}",
             "–" if variant == "shipped" else " / ".join(share(error) for error in row["robust_error_with_shipped"].values()),
             f"{row['seconds']:.0f}"]
            for variant, row in result["variants"].items()]
    return (f"`{result['model']}`, the first {result['examples']} MNIST test images ({share(result['clean_error'])} clean "
            f"error), FAB-T alone: {result['guide_classes']} guide classes of {result['steps']} steps, L2, "
            f"{result['threads']} CPU thread{'s' if result['threads'] > 1 else ''}. At the clean inputs, "
            f"{100 * result['gradient_share_below_1e-8']:.0f}% of the pixels' gradients of the runner-up margin are below "
            "10⁻⁸.\n\n"
            + table(["FAB-T", "robust error L2 1 / 1.5 / 2", "median minimal L2", "examples it ends below / above the shipped",
                     "with the shipped FAB-T, L2 1 / 1.5 / 2", "seconds"], rows))


def square_alone(folders: tuple[str, ...] = ("square_alone_pgd_small_resnet_seed1_before",
                                               "square_alone_pgd_small_resnet_seed1")) -> str:
    """``benchmarks/square_alone.py``: our Square (before and after the paper's L2 update) beside
    torchattacks' Square, each alone on the same images, robust error per budget."""
    results = [load(BENCHMARKS / folder / "results.json") for folder in folders]
    first = results[0]
    epsilons = sorted({row["epsilon"] for result in results for row in result["rows"]})
    attacks: dict[str, dict[float, dict]] = {}
    for folder, result in zip(folders, results):
        for row in result["rows"]:
            name = "torchattacks' Square" if row["attack"] == "torchattacks" else \
                ("our Square before (one window)" if row["attack"].startswith("advtrain from") else "our Square now (two windows)")
            attacks.setdefault(name, {})[row["epsilon"]] = row  # torchattacks' runs in both: the same seed, the later kept
    norm = "L∞" if first["norm"] == "linf" else "L2"
    rows = [[name, *(share(by[e]["robust_error"]) if e in by else "–" for e in epsilons),
             " / ".join(f"{by[e]['seconds']:.0f}" for e in epsilons if e in by)] for name, by in attacks.items()]
    return (f"`{first['model']}`, the first {first['examples']} MNIST test images, {first['queries']} queries, "
            f"{first['threads']} CPU thread{'s' if first['threads'] > 1 else ''}, each attack alone.\n\n"
            + table(["Square", *(f"robust error {norm} {e:g}" for e in epsilons), "seconds"], rows))


def evaluation_again(folder: str, before: str) -> str:
    """One budget's evaluation rerun alone (``evaluation_gap.py --peer none``) beside an earlier
    run's on the same images: the robust error and what each attack broke first."""
    now, then = load(BENCHMARKS / folder / "results.json"), load(BENCHMARKS / before / "results.json")
    budget = gap_budget(now)

    def tally(gap: dict) -> str:
        return ", ".join(f"{attack} {count}" for attack, count in gap["evaluation_broken_by"].items() if count)

    return (f"`{now['model']}` at {budget}, the first {now['examples']} test images, the evaluation {ensemble_name(now)}: "
            f"{share(then['evaluation_error'])} before ({tally(then)}), {share(now['evaluation_error'])} now "
            f"({tally(now)}; broken first by each attack); AutoAttack's members alone before: "
            + ", ".join(f"{attack} {share(error)}" for attack, error in then["attack_error"].items()) + ".\n")


#: The evaluation at one L2 budget with the paper's Square, by the ways table's model it ran on.
TWO_WINDOW_SQUARE_RUNS = [("`pgd`, seed 0", "evaluation_l2_1.5_two_window_square_pgd_seed0"),
                          ("`pgd`, seed 0", "evaluation_l2_2_two_window_square_pgd_seed0"),
                          ("`pgd`, seed 1", "evaluation_l2_1.5_two_window_square_pgd_seed1"),
                          ("`pgd`, seed 1", "evaluation_gap_pgd_small_resnet_seed1_l2_2_two_window_square"),
                          ("`input-pools`, seed 0", "evaluation_l2_1.5_two_window_square_input_pools_seed0"),
                          ("`input-pools`, seed 0", "evaluation_l2_2_two_window_square_input_pools_seed0"),
                          ("`fast`, seed 0", "evaluation_l2_1.5_two_window_square_fast_seed0")]


def two_window_square() -> str:
    """Per SmallResNet way: the evaluation at one L2 budget with the paper's Square, and how many
    examples the Square broke that every attack before it left (the most its L2 form can move the figure)."""
    gaps = [(way, load(path)) for way, path in ((way, BENCHMARKS / folder / "results.json") for way, folder in TWO_WINDOW_SQUARE_RUNS)
            if path.is_file()]
    if not gaps:
        return "(not run yet)"
    rows = []
    for way, gap in gaps:
        square = gap["evaluation_broken_by"].get("square", 0)
        rows.append([f"SmallResNet {way}", f"L2 {gap['epsilon']:g}", share(gap["evaluation_error"]), str(square),
                     share(gap["evaluation_error"] - square / gap["examples"])])
    threads = {gap["threads"] for _, gap in gaps}
    return (f"The first 100 MNIST test images, {'/'.join(map(str, sorted(threads)))} CPU thread(s).\n\n"
            + table(["model", "budget", "robust error, the paper's Square", "examples Square broke first",
                     "robust error without them"], rows))


def gap_budget(gap: dict) -> str:
    """The one budget of a ``benchmarks/evaluation_gap.py`` run, as the docs write it (``L2 1.5``)."""
    return f"{'L∞' if gap['norm'] == 'linf' else 'L2'} {gap['epsilon']:g}"


def ensemble_name(result: dict) -> str:
    """Which of the ensemble's later attacks a benchmark's run had (:func:`attacks_named`), said in a
    sentence: runs from before FAB-T joined it record no ensemble, runs from before DDN joined
    record no ``ddn``."""
    return {"FAB-T and DDN": "with FAB-T and DDN", "FAB-T, no DDN": "with FAB-T, without DDN (before it joined)",
            "no FAB-T or DDN": "without FAB-T or DDN (before they joined)"}[attacks_named(result.get("ensemble", {}))]


def evaluation_gap(folder: str = "evaluation_gap") -> str:
    """``benchmarks/evaluation_gap.py``: AutoAttack's members one at a time beside the evaluation
    at one budget, and each example one broke that the evaluation did not, with the sizes."""
    gap = load(BENCHMARKS / folder / "results.json")
    budget = gap_budget(gap)
    alone = ", ".join(f"{attack} {share(error)}" for attack, error in gap["attack_error"].items())
    rows = [[str(miss["example"]), miss["attack"], f"{miss['attack_size']:.3f}",
             "none" if miss["search_size"] is None else f"{miss['search_size']:.3f}"] for miss in gap["missed"]]
    without = gap.get("without_ddn")
    ddn = (f" (without DDN, after the same search: {share(without['error'])}; the attacks after the search took "
           f"{gap['evaluation_seconds']:.0f} s with DDN, {without['seconds']:.0f} s without, {gap['threads']} CPU thread"
           f"{'s' if gap['threads'] > 1 else ''})") if without else ""
    return (f"`{gap['model']}` at {budget}, the first {gap['examples']} test images: the evaluation {ensemble_name(gap)}: "
            f"{share(gap['evaluation_error'])}{ddn}; "
            f"each peer attack alone: {alone}.\n\n"
            + (table(["example", "broken by (the evaluation did not)", f"its perturbation ({gap['norm']})",
                      "the evaluation's search, minimal perturbation"], rows) if rows
               else "No peer attack broke an example the evaluation left unbroken.\n"))


#: ``benchmarks/evaluation_gap.py`` against AutoAttack's members on the two-window cells that the
#: peer checks of the ways table did not cover (the seed-0 input pool and fast way of the SmallResNet).
TWO_WINDOW_PEER_GAPS = ["evaluation_gap_input_pools_small_resnet_seed0_l2_1.5", "evaluation_gap_input_pools_small_resnet_seed0_l2_2",
                        "evaluation_gap_fast_small_resnet_seed0_l2_1.5"]


def two_window_peer_gaps() -> str:
    """Per checked cell: the evaluation with the two-window Square beside each of AutoAttack's
    members alone at Croce & Hein's settings, and how many examples any member broke that the
    evaluation did not."""
    gaps = [load(path) for path in (BENCHMARKS / name / "results.json" for name in TWO_WINDOW_PEER_GAPS) if path.is_file()]
    if not gaps:
        return "(not run yet)"
    rows = [[f"`{gap['model']}`", gap_budget(gap), share(gap["evaluation_error"]),
             " / ".join(share(error) for error in gap["attack_error"].values()), str(len(gap["missed"]))] for gap in gaps]
    members = " / ".join(gaps[0]["attack_error"])
    return (f"The first {gaps[0]['examples']} MNIST test images, {'/'.join(sorted({str(gap['threads']) for gap in gaps}))} CPU "
            "thread(s).\n\n" + table(["model", "budget", "the evaluation (two-window Square)", f"alone: {members}",
                                        "examples a member broke that the evaluation did not"], rows))


def ways_commands() -> str:
    """Each model's ways commands, one row per distinct command (the seed written ``S``)."""
    rows = []
    for model, runs in ways_runs():
        commands = dict.fromkeys(re.sub(r" --seed \S+", "", short_command(run.command)) + " --seed S" for run in runs)
        rows += [[model, f"`{command}`"] for command in commands]
    return table(["model", "command"], rows)


#: Cheaper settings of the callback's defaults measured on FC100-100-10, one folder per seed and
#: step (``{seed}`` filled in), each with the generation search's settings it measured (older run
#: folders record ``attack: null``, the default), and whether it is the defaults now. The first
#: step's runs of seeds 0 and 1 hold weight decay of the same run, the reference.
DEFAULTS_STEPS = [
    ("defaults-fc100-seed{seed}", "10 iterations per c, 5 refine steps", False),
    ("defaults-iterations7-fc100-seed{seed}", "7 iterations per c, 5 refine steps", False),
    ("defaults-refresh256-fc100-seed{seed}", "10 iterations per c, 5 refine steps", True),
]
#: The folder pattern of the defaults now.
CURRENT_DEFAULTS = next(folder for folder, _, current in DEFAULTS_STEPS if current)
#: The ``input-pools`` way with the ways table's settings, by seed: the ways table's own runs, and
#: for a seed the table did not run, that way alone with the table's settings.
TABLE_SETTINGS_RUNS = {0: "ways-fc100-seed0", 1: "ways-fc100-seed1", 2: "ways-settings-input-pools-fc100-seed2"}


def defaults_runs() -> list[str]:
    """The committed folders of :data:`DEFAULTS_STEPS`, and the table-settings runs outside the
    ways table, seed by seed."""
    names = []
    for seed, table_run in TABLE_SETTINGS_RUNS.items():
        candidates = ([] if table_run.startswith("ways-fc100") else [table_run]) + \
            [folder.format(seed=seed) for folder, _, _ in DEFAULTS_STEPS]
        names += [name for name in candidates if (RESULTS / name).is_dir()]
    return names


def pools_refresh(config: dict) -> str:
    """The ``input-pools`` way's refresh as a run folder's config records it."""
    way = config["ways_resolved"]["input-pools"]
    return f"refresh {way['refresh_size']} rows every {way['refresh_every']} steps"


def generation_search(config: dict, recorded_elsewhere: str) -> str:
    """The ``input-pools`` way's generation search as the run folder records it (newer folders),
    else as :data:`DEFAULTS_STEPS` states it."""
    attack = config["ways_resolved"]["input-pools"]["attack"]
    if attack is None:
        return recorded_elsewhere
    settings = attack["init_args"]
    return f"{settings['iterations']} iterations per c, {settings['refine_steps']} refine steps"


def defaults_check() -> str:
    """The ``input-pools`` way with the ways table's settings against the same way with the
    callback's defaults after each change, seed by seed; weight decay of the first step's run as the
    reference where it ran."""
    rows = []
    for seed, table_run in TABLE_SETTINGS_RUNS.items():
        if not (RESULTS / table_run).is_dir():
            continue
        labelled = []
        first = DEFAULTS_STEPS[0][0].format(seed=seed)
        reference = run_folder(first)[1] if (RESULTS / first).is_dir() else []
        if any(entry["way"] == "weight-decay" for entry in reference):
            labelled.append(("weight-decay", f"`weight-decay` (run `{first}`)", reference))
        config, results, _ = run_folder(table_run)
        where = "the ways table" if table_run.startswith("ways-fc100") else "the ways table's settings"
        labelled.append(("input-pools", f"`input-pools`, {where} ({pools_refresh(config)}, "
                         f"{generation_search(config, '10 iterations per c, 20 refine steps')})", results))
        for folder, settings, current in DEFAULTS_STEPS:
            name = folder.format(seed=seed)
            if (RESULTS / name).is_dir():
                config, results, _ = run_folder(name)
                now = " (the defaults now)" if current else ""
                labelled.append(("input-pools", f"`input-pools`, {pools_refresh(config)}, "
                                 f"{generation_search(config, settings)}{now}", results))
        for way, label, entries in labelled:
            entry = next(e for e in entries if e["way"] == way)
            rows.append([str(seed), label, percent(entry["test_error"]), robust_errors([entry], "linf"),
                         robust_errors([entry], "l2"), number(entry["mean_distortion"])])
    return table(["seed", "way", "test error", "robust error L∞ 0.1 / 0.2 / 0.3", "robust error L2 1 / 1.5 / 2",
                  "mean minimal distortion"], rows)


def defaults_shift() -> str:
    """Each step of :data:`DEFAULTS_STEPS` against the ``input-pools`` way with the ways table's
    settings, averaged over the seeds both ran: the change in test error and in robust error at
    every budget, in points (positive: worse)."""
    rows, budgets = [], []
    for folder, settings, current in DEFAULTS_STEPS:
        pairs = []
        for seed, table_run in TABLE_SETTINGS_RUNS.items():
            name = folder.format(seed=seed)
            if (RESULTS / name).is_dir() and (RESULTS / table_run).is_dir():
                now = next(e for e in run_folder(name)[1] if e["way"] == "input-pools")
                before = next(e for e in run_folder(table_run)[1] if e["way"] == "input-pools")
                pairs.append((seed, now, before))
        if not pairs:
            continue

        def shift(value) -> str:
            mean = sum(value(now) - value(before) for _, now, before in pairs) / len(pairs)
            return f"{100 * mean:+.1f}"

        budgets = [(norm, budget) for norm in ("linf", "l2") for budget in pairs[0][1]["robust_error"][norm]]
        config = run_folder(folder.format(seed=pairs[0][0]))[0]
        label = f"{pools_refresh(config)}, {generation_search(config, settings)}"
        rows.append([label + (" (the defaults now)" if current else ""), ", ".join(str(seed) for seed, _, _ in pairs),
                     shift(lambda e: e["test_error"]),
                     *[shift(lambda e, n=norm, b=budget: e["robust_error"][n][b]) for norm, budget in budgets]])
    header = ["refresh and generation search", "seeds", "test error"]
    header += [f"{'L∞' if norm == 'linf' else 'L2'} {budget}" for norm, budget in budgets]
    return table(header, rows)


def defaults_commands() -> str:
    searches = {folder.format(seed=seed): settings for folder, settings, _ in DEFAULTS_STEPS for seed in TABLE_SETTINGS_RUNS}
    rows = []
    for name in defaults_runs():
        config, _, command = run_folder(name)
        settings = f"{pools_refresh(config)}, {generation_search(config, searches[name])}" if name in searches \
            else "the ways table's"
        rows.append([name, settings, f"`{short_command(command)}`"])
    return table(["run", "refresh and generation search when it ran", "command"], rows)


def mean_robust_error(robust_error: dict) -> float | None:
    """The mean of a way's robust errors over every budget of both norms (``None`` without them)."""
    values = [value for errors in robust_error.values() for value in errors.values()]
    return sum(values) / len(values) if values else None


def ways_figures(clean_path: Path, time_path: Path) -> None:
    """``docs/figures/ways-robust-clean.png`` and ``ways-robust-time.png``: each way's mean robust
    error over the six budgets against its clean test error, and against its training time as a
    ratio to weight decay's, one point per way and seed."""
    by_clean, by_time = [], []
    for model, runs in ways_runs():
        for way in WAYS:
            for run in way_runs(runs, way):
                robust = mean_robust_error(run.robust_error)
                if robust is None:
                    continue
                by_clean.append((run.entry["test_error"], robust, f"{model}: {way}"))
                if run.time_ratio is not None:
                    by_time.append((run.time_ratio, robust, f"{model}: {way}"))
    y_label = "robust error, mean over L-inf 0.1/0.2/0.3 and L2 1/1.5/2 (lower: harder to fool)"
    if by_clean:
        scatter(by_clean, clean_path, "clean test error", y_label, lambda e: f"{100 * e:.1f}%",
                lambda r: f"{100 * r:.0f}%", y_high=1.0)
    if by_time:
        scatter(by_time, time_path, "training time / weight decay's (same run)", y_label, lambda t: f"{t:.1f}x",
                lambda r: f"{100 * r:.0f}%", y_high=1.0)


#: The plain-PyTorch peers of the recipe's callback ways (``benchmarks/reference_fast_gradient.py
#: --method M``), by way: the folders of their runs (one run per seed or several).
REFERENCE_PEERS = {"pgd": ["reference_pgd", "reference_pgd_seed1", "reference_pgd_order1",
                           "reference_pgd_callback_randomness", "reference_pgd_callback_randomness_jitter1",
                           "reference_pgd_seed1_callback_randomness", "reference_pgd_callback_mixing",
                           "reference_pgd_callback_mixing_2threads", "reference_pgd_seed1_callback_mixing"],
                   "fast": ["reference_fast", "reference_fast_seed1", "reference_fast_order1", "reference_fast_order2",
                            "reference_fast_callback_randomness", "reference_fast_callback_mixing"]}

#: Reruns of a callback way outside the ways table's run, (way, seed) -> [(run folder, label)].
CALLBACK_RERUNS = {("pgd", 0): [("ways-pgd-alone-2threads-seed0", "`pgd` through the callback, run alone (`--ways pgd`, two threads)"),
                                 ("ways-pgd-alone-seed0", "`pgd` through the callback, run alone (`--ways pgd`, one thread)")],
                   ("pgd", 1): [("ways-pgd-alone-seed1", "`pgd` through the callback, run alone (`--ways pgd`, one thread)")],
                   ("fast", 0): [("ways-fast-alone-2threads-seed0", "`fast` through the callback, run alone (`--ways fast`, two threads)"),
                                 ("ways-fast-alone-seed0", "`fast` through the callback, run alone (`--ways fast`, one thread)")],
                   ("fast", 1): [("ways-fast-alone-seed1", "`fast` through the callback, run alone (`--ways fast`, one thread)")]}

#: Thread counts of the loop runs made with the mixed step before the loop recorded its count
#: (the earlier runs did not record theirs and are not labelled).
LOOP_THREADS = {"reference_pgd_callback_mixing": 1, "reference_pgd_seed1_callback_mixing": 1,
                "reference_pgd_callback_mixing_2threads": 2}


def _loop_label(run: dict, threads: int | None) -> str:
    """What sets a loop run apart: its order seed, the recipe's randomness, the mixed step, its
    thread count, a jitter of its initial weights."""
    label = "the plain-PyTorch loop" if run.get("order_seed") is None else f"the plain-PyTorch loop, order seed {run['order_seed']}"
    if run.get("callback_randomness"):
        label = "the plain-PyTorch loop, the recipe's batch order and random starts"
        if run.get("mixed_last_batch"):
            label += ", and its pool's mixed step at each epoch's last batch"
        if threads is not None:
            label += f", {'one thread' if threads == 1 else 'two threads' if threads == 2 else f'{threads} threads'}"
    if run.get("jitter"):
        label += (f", every initial weight × (1 + {run['jitter']['scale']:g}·N(0, 1)) "
                  f"(jitter seed {run['jitter']['seed']})")
    return label


def reference_peers() -> str:
    """Each callback way of the ways table beside its plain-PyTorch loop, seed by seed, for the
    seeds the loop ran; a loop run with another order seed (the seed's weights, other batches and
    starts), or with the recipe's own batches and starts, as one more row under its seed; reruns
    of the callback way (:data:`CALLBACK_RERUNS`) under the ways table's run."""
    rows, shown = [], set()
    for way, folders in REFERENCE_PEERS.items():
        for folder in folders:
            path = BENCHMARKS / folder / "results.json"
            if not path.is_file():
                continue
            result = load(path)
            threads = result["settings"].get("threads", LOOP_THREADS.get(folder))
            for run in result["runs"]:
                seed, entries = run["seed"], []
                if (way, seed) not in shown:
                    shown.add((way, seed))
                    for name, label in [(f"ways-fc100-seed{seed}", f"`{way}` through the callback"),
                                        *CALLBACK_RERUNS.get((way, seed), [])]:
                        _, results, _ = run_folder(name)
                        entries.append((label, next(entry for entry in results if entry["way"] == way)))
                entries.append((_loop_label(run, threads), run))
                for label, entry in entries:
                    rows.append([way, str(seed), label, percent(entry["test_error"]), robust_errors([entry], "linf"),
                                 robust_errors([entry], "l2"), number(entry["mean_distortion"])])
    rows.sort(key=lambda row: (row[0] != "pgd", row[1]))  # each seed's rows together, the callback's first
    return table(["method", "seed (weights)", "trained by", "test error", "robust error L∞ 0.1 / 0.2 / 0.3",
                  "robust error L2 1 / 1.5 / 2", "mean minimal distortion"], rows)


def reference_one_epoch() -> str:
    """The recipe's ``pgd`` way after one epoch beside the loop with the recipe's batch order and
    random starts, before and with the pool's mixed step at the epoch's last batch: how far apart
    their weights are."""
    before = load(BENCHMARKS / "reference_pgd_1_epoch_callback_randomness" / "results.json")["runs"][0]
    mixed = load(BENCHMARKS / "reference_pgd_1_epoch_callback_mixing" / "results.json")["runs"][0]
    three = load(BENCHMARKS / "reference_pgd_3_epochs_callback_mixing" / "results.json")["runs"][0]
    return (f"After one epoch of MNIST (938 steps), the loop with the recipe's batch order and random starts and the "
            f"recipe's `pgd` way from the same seed hold the same weights to "
            f"{before['weights_against']['max_abs_difference']:.1e}, and to "
            f"{mixed['weights_against']['max_abs_difference']:.1e} with the pool's mixed step at the epoch's last "
            f"batch reproduced too (the largest weight is {mixed['weights_against']['max_abs_weight']:.2f}); after "
            f"three epochs, each run with its own three-epoch cosine schedule, to "
            f"{three['weights_against']['max_abs_difference']:.1e} (the largest weight "
            f"{three['weights_against']['max_abs_weight']:.2f}). Both models then predict one class for every image "
            f"({percent(mixed['test_error'])} and {percent(three['test_error'])} test error).\n")


def real_model_cost() -> str:
    """``benchmarks/real_model_cost.py``'s settings against plain training: the run's design says
    which plain runs each compares with (older runs: the plain run of the same repeat)."""
    result = load(BENCHMARKS / "real_model_cost" / "results.json")

    def generating(entry: dict) -> str:  # the refreshes' seconds per epoch, over every epoch run
        runs = entry.get("seconds_generating")
        epochs = sum(len(run) for run in entry["epoch_seconds"])
        return "–" if not runs else f"{sum(runs) / epochs:.1f}"

    def per_repeat(entry: dict) -> str:
        """Each repeat's run against its plain reference: the spread the machine's drift leaves."""
        ratios = entry["ratios_to_plain"]
        return f"{min(ratios):.2f}–{max(ratios):.2f}×" if len(ratios) > 1 else f"{ratios[0]:.2f}×"

    rows = [[name.replace("_", " "), f"{entry['median_run_mean']:.1f}", generating(entry),
             f"{sum(len(run) - 1 for run in entry['epoch_seconds'])}", f"{entry['ratio_to_plain']:.2f}×",
             per_repeat(entry)]
            for name, entry in result["settings"].items()]
    return table(["setting (resnet18, 32×32, 96 steps of 32)", "seconds per epoch (a run's mean, median of the repeats)",
                  "of which generating (mean, warm-up included)", "epochs timed", "against plain (median of the repeats)",
                  "repeat by repeat"], rows)


def real_model_cost_bracketed() -> str:
    """The bracketed run of ``benchmarks/real_model_cost.py`` (each setting's run between two plain
    runs): its table, each repeat's ratio, and the median again without the first repeat, whose
    plain run before it is the process's first."""
    result = load(BENCHMARKS / "real_model_cost_bracketed" / "results.json")
    plain = result["settings"]["plain"]["run_means_after_warmup"]
    lines = [table(["setting (resnet18, 32×32, 96 steps of 32)", "seconds per epoch (a run's mean, median of the runs)",
                    "runs", "against the plain runs before and after it (median)", "repeat by repeat"],
                   [[name.replace("_", " "), f"{entry['median_run_mean']:.1f}", str(len(entry["epoch_seconds"])),
                     f"{entry['ratio_to_plain']:.2f}×",
                     " ".join(f"{ratio:.2f}" for ratio in entry["ratios_to_plain"]) if name != "plain" else "–"]
                    for name, entry in result["settings"].items()])]
    for name, entry in result["settings"].items():
        if name == "plain" or len(entry["ratios_to_plain"]) < 3:
            continue
        later = statistics.median(entry["ratios_to_plain"][1:])
        lines.append(f"`{name}`: {entry['ratio_to_plain']:.2f}× the plain runs beside it (median of "
                     f"{len(entry['ratios_to_plain'])} repeats); {later:.2f}× without the first repeat, whose plain run "
                     f"before it is the process's first ({plain[0]:.1f} s an epoch against "
                     f"{min(plain[1:]):.1f}–{max(plain[1:]):.1f} s for the other plain runs). "
                     f"{result['threads']} CPU threads, nothing else running.\n")
    return "\n\n".join(line.strip("\n") for line in lines) + "\n"


def generation_settings() -> str:
    """The generation search's iterations and bisection steps against time and distortion."""
    result = load(BENCHMARKS / "generation_refine" / "results.json")
    rows = [[str(entry["iterations"]), str(entry["refine_steps"]), f"{entry['median_seconds']:.2f}",
             f"{entry['time_ratio_to_first']:.2f}×", f"{100 * entry['success_rate']:.1f}%", f"{entry['mean_distortion']:.4f}"]
            for entry in result["settings"]]
    return table([f"L-BFGS iterations per c ({result['rows']} rows)", "refine steps", "median seconds",
                  "time / first", "success", "mean distortion"], rows)


def full_autoattack_rows() -> dict[str, dict]:
    """The rows of the runs against AutoAttack at Croce & Hein's 100 steps, by model name (empty
    where no such run is committed), with the search's distortion against Foolbox's from a run
    with Foolbox alone where the AutoAttack run had none."""
    rows = {}
    for path in sorted(BENCHMARKS.glob("evaluation_autoattack100*/results.json")):  # a folder per run
        rows.update({row["model"]: row for row in load(path)["rows"]})
    for path in sorted(BENCHMARKS.glob("evaluation_foolbox*/results.json")):  # Foolbox alone, for the distortion
        for row in load(path)["rows"]:
            if row["model"] in rows and not rows[row["model"]].get("distortion"):
                rows[row["model"]] = {**rows[row["model"]], "distortion": row["distortion"],
                                      "distortion_vs_foolbox": row["distortion_vs_foolbox"]}
    return rows


def evaluation_benchmark() -> str:
    """Robust error per model and budget: advtrain's ensemble, AutoAttack (torchattacks' shipped
    10 steps, and 100 steps where measured), Foolbox's best."""
    result = load(BENCHMARKS / "evaluation" / "results.json")
    full = full_autoattack_rows()
    rows = []
    for row in result["rows"]:
        for norm, epsilons in result["budgets"].items():
            for epsilon in epsilons:
                key = f"{epsilon:g}"
                values = [row["robust_error"][method][norm][key] for method in ("advtrain", "AutoAttack", "Foolbox")]
                hundred = full.get(row["model"], {}).get("robust_error", {}).get("AutoAttack 100 steps")
                if hundred is not None:
                    values.insert(2, hundred[norm][key])
                best_peer = max(values[1:])
                cells = [f"{100 * v:.0f}%" for v in values]
                if hundred is None:
                    cells.insert(2, "–")
                rows.append([row["model"], f"{'L∞' if norm == 'linf' else 'L2'} {key}", f"{100 * row['clean_error']:.0f}%",
                             *cells, f"{100 * (values[0] - best_peer):+.0f}"])
    return (f"{result['examples']} MNIST test images, {result['threads']} CPU threads.\n\n"
            + table(["model", "budget", "clean error", "advtrain", "AutoAttack (torchattacks' standard: 10 steps)",
                     "AutoAttack (100 steps)", "Foolbox best of DDN, FMN, C&W", "advtrain − best peer (points)"], rows))


def evaluation_cost() -> str:
    """Seconds per model for the whole list of budgets against AutoAttack at 10 and 100 steps, and
    the search's distortion against Foolbox's; the PGD convnet also as re-measured alone on an
    otherwise idle machine."""
    result = load(BENCHMARKS / "evaluation" / "results.json")
    alone = load(BENCHMARKS / "evaluation_convnet_alone" / "results.json")
    for row in alone["rows"]:
        row["model"] += " (measured alone)"
    full = full_autoattack_rows()
    rows = []
    for row in result["rows"] + alone["rows"]:
        hundred = full.get(row["model"])
        against_full = ("–", "–", "–") if hundred is None else (
            f"{hundred['seconds']['advtrain']:.0f} / {hundred['seconds']['AutoAttack 100 steps']:.0f}",
            f"{hundred['seconds']['advtrain'] / hundred['seconds']['AutoAttack 100 steps']:.2f}×",
            f"{hundred['distortion_vs_foolbox']:.4f}× ({hundred['distortion']['examples']} examples)"
            if hundred.get("distortion") else "–")
        rows.append([row["model"], f"{row['seconds']['advtrain']:.0f}", f"{row['seconds']['AutoAttack']:.0f}",
                     f"{row['seconds']['advtrain'] / row['seconds']['AutoAttack']:.2f}×",
                     f"{row['distortion_vs_foolbox']:.3f}× ({row['distortion']['examples']} examples)", *against_full,
                     ", ".join(row["checks_failed"]) or "none"])
    return table(["model", "advtrain s (BoxLBFGS() + ensemble, all budgets)", "AutoAttack s (10 steps, once per budget)",
                  "ratio", "BoxLBFGS()'s L2 against Foolbox's best, per example",
                  "advtrain s (evaluation_search() + ensemble) / AutoAttack s at 100 steps, one run", "ratio at 100 steps",
                  "evaluation_search()'s L2 against Foolbox's best, per example", "checks failed"], rows)


def variant_rows(result: dict, reference: float) -> list[list[str]]:
    """One row per variant of a ``benchmarks/search_variants.py`` run: its settings, successes, mean
    size, that size against ``reference``, and its time against the default's."""
    default = result["variants"]["evaluation_search"]
    return [[f"`{name}`", ", ".join(f"{key}={value!r}" for key, value in entry["settings"].items()),
             f"{entry['found']} / {result['examples']}", f"{entry['mean_l2_over_28']:.6f}",
             f"{entry['mean_l2_over_28'] / reference:.4f}×", f"{entry['seconds']:.0f}",
             f"{entry['seconds'] / default['seconds']:.1f}×"] for name, entry in result["variants"].items()]


def search_variants() -> str:
    """Longer settings of the evaluation's search on one model, against Foolbox's best there."""
    result = load(BENCHMARKS / "search_variants" / "results.json")
    peer = next(row for row in load(BENCHMARKS / "evaluation_foolbox_small_resnet" / "results.json")["rows"]
                if row["model"] == result["model"])
    foolbox = peer["distortion"]["Foolbox"]
    rows = variant_rows(result, foolbox)
    return (f"{result['model']}, the first {result['examples']} MNIST test images, untargeted, "
            f"{result['threads']} thread; Foolbox's best of DDN, FMN and C&W there: {foolbox:.6f}.\n\n"
            + table(["variant", "BoxLBFGS settings", "found", "mean L2 / 28", "against Foolbox's mean",
                     "seconds", "time against the default"], rows))


def search_gap_rows(rows: int = 10) -> str:
    """Where the default search's gap to the longest variant lies, from the per-example sizes of
    ``benchmarks/search_variants.py``: the share held by the ``rows`` rows with the largest gap, and
    the largest gap on one row."""
    variants = load(BENCHMARKS / "search_variants" / "results.json")["variants"]
    default, longest = variants["evaluation_search"]["l2_per_example"], variants["iterations150_polish400"]["l2_per_example"]
    gaps = sorted((ours - theirs for ours, theirs in zip(default, longest)), reverse=True)
    largest = max(ours / theirs for ours, theirs in zip(default, longest))
    return (f"Most of the gap lies in a few examples: on the {len(gaps)} images above, {rows} rows hold "
            f"{100 * sum(gaps[:rows]) / sum(gaps):.0f}% of the difference between the default and the 150-iteration, "
            f"400-step variant, up to {100 * (largest - 1):.0f}% on one row.\n")


def search_variants_polish_heavy() -> str:
    """Iterations traded for boundary steps, on a retrained SmallResNet: each variant against the
    default on the same model (no Foolbox run on that model)."""
    result = load(BENCHMARKS / "search_variants_polish_heavy" / "results.json")
    rows = variant_rows(result, result["variants"]["evaluation_search"]["mean_l2_over_28"])
    return table(["variant", "BoxLBFGS settings", "found", "mean L2 / 28", "against the default's mean", "seconds",
                  "time against the default"], rows)


#: For each model: the ``benchmarks/search_variants.py`` run of the walk's settings, and the
#: evaluation benchmark run holding Foolbox's per-example sizes on the same model and images.
CLEAN_WALK_VARIANTS = [("search_variants_clean_walk_small_resnet", "evaluation_clean_walk_foolbox_small_resnet"),
                       ("search_variants_clean_walk_fc100", "evaluation_clean_walk_fc100"),
                       ("search_variants_clean_walk_convnet", "evaluation_clean_walk_convnet")]


def against_foolbox(result: dict, foolbox_folder: str, name: str) -> tuple[float, int]:
    """A search variant's size against Foolbox's best, per example (mean of the ratios over the
    examples both found, clean mistakes left out), and how many examples that is; ``result`` is a
    ``benchmarks/search_variants.py`` run."""
    peer = next(row for row in load(BENCHMARKS / foolbox_folder / "results.json")["rows"] if row["model"] == result["model"])
    pairs = [(ours, theirs) for ours, theirs in zip(result["variants"][name]["l2_per_example"], peer["l2_per_example"]["Foolbox"])
             if ours is not None and theirs is not None and theirs > 0]
    return sum(ours / theirs for ours, theirs in pairs) / len(pairs), len(pairs)


def clean_walk_gain() -> str:
    """Per model, the search's settings with and without the walk from the clean input: mean size,
    size against Foolbox's best per example (the examples both found, clean mistakes left out),
    and time against the search before the walk."""
    rows = []
    for variants_folder, foolbox_folder in CLEAN_WALK_VARIANTS:
        result = load(BENCHMARKS / variants_folder / "results.json")
        before = result["variants"]["before_clean_walk"]["seconds"]
        for name, entry in result["variants"].items():
            ratio, count = against_foolbox(result, foolbox_folder, name)
            settings = ", ".join(f"{key}={value!r}" for key, value in entry["settings"].items())
            rows.append([result["model"], f"`{name}`", settings, f"{entry['mean_l2_over_28']:.6f}",
                         f"{ratio:.4f}× ({count})", f"{entry['seconds']:.0f}", f"{entry['seconds'] / before:.2f}×"])
    return table(["model", "variant", "BoxLBFGS settings", "mean L2 / 28", "against Foolbox's best, per example",
                  "seconds (1 thread)", "time against the search before"], rows)


#: The runs of the evaluation benchmark with the walk from the clean input in ``evaluation_search()``:
#: against AutoAttack at 100 steps (and Foolbox where the folder's run had it), and Foolbox alone
#: for the SmallResNet's distortion.
CLEAN_WALK_RUNS = ["evaluation_clean_walk_fc100", "evaluation_clean_walk_small_resnet", "evaluation_clean_walk_convnet"]


def clean_walk_cost() -> str:
    """Per model, with the walk from the clean input: the evaluation's seconds for every budget
    against AutoAttack's at 100 steps in the same run, its robust error's shortfall against the
    best peer, and the search's distortion against Foolbox's best per example."""
    foolbox_alone = {row["model"]: row for row in
                     load(BENCHMARKS / "evaluation_clean_walk_foolbox_small_resnet" / "results.json")["rows"]}
    rows = []
    for folder in CLEAN_WALK_RUNS:
        path = BENCHMARKS / folder / "results.json"
        if not path.is_file():
            continue
        for row in load(path)["rows"]:
            if row.get("distortion"):
                distortion = f"{row['distortion_vs_foolbox']:.4f}× ({row['distortion']['examples']} examples)"
            else:  # Foolbox ran alone, under an earlier default: the default's search run against its sizes
                variants, foolbox_folder = next((result, f) for result, f in
                                                ((load(BENCHMARKS / v / "results.json"), f) for v, f in CLEAN_WALK_VARIANTS)
                                                if result["model"] == row["model"])
                ratio, count = against_foolbox(variants, foolbox_folder, "evaluation_search")
                distortion = f"{ratio:.4f}× ({count} examples; the search's own run)"
            shortfall = max(row["shortfall"], (foolbox_alone.get(row["model"]) or row)["shortfall"])
            seconds, peer = row["seconds"]["advtrain"], row["seconds"]["AutoAttack 100 steps"]
            rows.append([row["model"], f"{seconds:.0f}", f"{peer:.0f}", f"{seconds / peer:.2f}×", f"{shortfall:+.1f}",
                         distortion, ", ".join(row["checks_failed"]) or "none"])
    return table(["model", "advtrain s (evaluation_search() + ensemble, all budgets)",
                  "AutoAttack s (100 steps, once per budget)", "ratio", "best peer − advtrain, worst budget (points)",
                  "evaluation_search()'s L2 against Foolbox's best, per example", "checks failed"], rows)


#: The evaluation benchmark's models with FAB-T in the ensemble, each also evaluated without it in
#: the same run (``--without-fab``).
FAB_RUNS = ["evaluation_fab_fc100", "evaluation_fab_small_resnet", "evaluation_fab_convnet"]
#: The same four models with DDN in the ensemble, each also evaluated without it (``--without-ddn``).
DDN_RUNS = ["evaluation_ddn"]


def later_attack_cost(folders: list[str], attack: str, tally: str, setting: str) -> str:
    """Per model, the evaluation with and without one of its later attacks (``attack``, counted as
    ``tally`` in ``broken_by``, switched by the ensemble's ``setting``) beside AutoAttack at 100
    steps, all in one run: seconds, the shortfall against the best peer at the worst budget, and what
    the attack broke first."""
    rows, first = [], None
    for folder in folders:
        path = BENCHMARKS / folder / "results.json"
        if not path.is_file():
            continue
        result = load(path)
        first = first or result
        if not result.get("ensemble", {}).get(setting):
            raise ValueError(f"{path}: the run's ensemble had no {attack}")
        peers = list(result["peers"])
        for row in result["rows"]:
            errors, seconds = row["robust_error"], row["seconds"]
            # the one method that is neither ours with the attack nor a peer: the benchmark's run without it
            (without,) = set(seconds) - set(peers) - {"advtrain"}
            shortfall = lambda method: 100 * max(max(errors[p][n][e] for p in peers) - errors[method][n][e]  # noqa: E731
                                                 for n in errors[method] for e in errors[method][n])
            peer = seconds["AutoAttack 100 steps"]
            broken = sum(budget_tally.get(tally, 0) for budgets in row["broken_by"].values() for budget_tally in budgets.values())
            rows.append([row["model"], f"{seconds['advtrain']:.0f} / {seconds[without]:.0f}", f"{peer:.0f}",
                         f"{seconds['advtrain'] / peer:.2f}× / {seconds[without] / peer:.2f}×",
                         f"{shortfall('advtrain'):+.1f} / {shortfall(without):+.1f}", str(broken),
                         ", ".join(row["checks_failed"]) or "none"])
    if not rows:
        return "(not run yet)"
    return (f"The first {first['examples']} MNIST test images, {first['threads']} CPU threads, the evaluation "
            f"{ensemble_name(first)}; each pair: with {attack} / without.\n\n"
            + table(["model", "advtrain s (all budgets)", "AutoAttack s (100 steps, once per budget)", "ratio",
                     "best peer − advtrain, worst budget (points)", f"examples {attack} broke first, all budgets",
                     "checks failed"], rows))


def reproductions() -> str:
    """One row per recipe: the paper's table, the command, its time, ours against the paper's headline."""
    rows = []
    for entry in REPRODUCTIONS:
        try:
            rows.append(entry())
        except FileNotFoundError as missing:
            raise FileNotFoundError(f"reproductions table: {missing}") from missing
    return table(["recipe", "paper", "command", "time (2-core CPU)", "ours", "paper's"], rows)


def _training_row() -> list[str]:
    label, runs = training_runs()[0]
    pools = [next(e for e in results if e["way"] == "pools") for _, _, results, _ in runs]
    decay = [next(e for e in results if e["way"] == "weight-decay") for _, _, results, _ in runs]
    ratios = [p["mean_distortion"] / d["mean_distortion"] for p, d in zip(pools, decay)]
    ours = (f"pools {', '.join(percent(p['test_error']) for p in pools)} test error at "
            f"{min(ratios):.2f}–{max(ratios):.2f}× weight decay's minimal distortion")
    measured = [(seed, p, d) for (seed, *_), p, d in zip(runs, pools, decay) if p.get("robust_error") and d.get("robust_error")]
    if measured:  # robust errors by the evaluation's ensemble, seeds in order, where the runs measured them
        budgets = [("linf", "0.1", "L∞ 0.1"), ("l2", "1.5", "L2 1.5")]
        at = lambda entries, norm, key: ", ".join(share(e["robust_error"][norm][key]) for e in entries)  # noqa: E731
        ours += "; robust error " + ", ".join(
            f"at {label} {at([p for _, p, _ in measured], norm, key)} (weight decay {at([d for *_, d in measured], norm, key)})"
            for norm, key, label in budgets)
        ours += f" (seed{'s' if len(measured) > 1 else ''} {', '.join(str(seed) for seed, *_ in measured)})"
    seconds = min(p["seconds"] + d["seconds"] for p, d in zip(pools, decay))  # a run that had the machine to itself
    command = re.sub(r" --seed \S+", "", short_command(runs[0][3]))
    return ["`adversarial-training`", "§4.2", f"`{command}`", f"{minutes(seconds)} a seed (the faster)", ours,
            "below 1.2% (weight decay 1.6%)"]


def table1() -> str:
    """The recipe's own table, from its committed results."""
    from advtrain.recipes import table1 as recipe

    config, results, _ = run_folder("table1")
    rows = [recipe.Table1Row(**row) for row in results["rows"]]
    for row in rows:
        row.mean_distortion = math.inf if row.mean_distortion is None else row.mean_distortion
    return recipe.markdown(argparse.Namespace(**config), rows, results["examples"])


def table2() -> str:
    from advtrain.recipes import table2 as recipe

    config, results, _ = run_folder("table2")
    return recipe.markdown(config["models"], results["errors"], results["mean_distortion"], results["examples"])


def table3() -> str:
    from advtrain.recipes import table3 as recipe

    _, results, _ = run_folder("table3")
    return recipe.markdown(results["table3"], results["table4"], results["mean_distortion"], results["examples"])


def lipschitz_table(name: str = "lipschitz-alexnet"):
    """The committed Table 5 run as a :class:`LipschitzTable` again."""
    from advtrain.analysis.lipschitz import LayerBound, LipschitzTable

    _, results, _ = run_folder(name)
    (saved,) = results["tables"].values()
    finite = lambda value: math.inf if value in ("inf", None) else value  # noqa: E731
    rows = [LayerBound(name=row["name"], kind=row["kind"],
                       weight_shape=None if row["weight_shape"] is None else tuple(row["weight_shape"]),
                       stride=None if row["stride"] is None else tuple(row["stride"]), input_size=tuple(row["input_size"]),
                       bound=finite(row["bound"]), note=row["note"], from_input=finite(row["from_input"]))
            for row in saved["rows"]]
    return LipschitzTable(rows, saved["traced_with"], saved["notes"]), results


def lipschitz_alexnet() -> str:
    from advtrain.recipes.lipschitz import beside_paper

    table_, results = lipschitz_table()
    return (beside_paper(table_) + f"\nThe whole network, along its graph: {table_.network_bound:.4g}. Weights: "
            f"{results['weights']}; computed in {results['seconds'][0]:.0f} s.\n")


def units() -> str:
    _, results, _ = run_folder("units")
    purity = results["mean_label_purity"]
    header = (f"directions at {results['layer']} ({results['directions_measured']} of each kind, "
              f"top {results['top']} of {results['images']} test images)")
    return table([header, "mean label purity of the top images"],
                 [["single units (natural basis)", f"{purity['unit']:.3f}"], ["random directions", f"{purity['random']:.3f}"]])


def _table1_row() -> list[str]:
    config, results, command = run_folder("table1")
    fc100 = next(row for row in results["rows"] if row["model"] == "FC100-100-10")
    seconds = sum(row["seconds"] for row in results["rows"])
    return ["`table1`", "Table 1", f"`{short_command(command)}`", minutes(seconds),
            f"FC100-100-10: {percent(fc100['test_error'])} test error, distortion {number(fc100['mean_distortion'], 3)}",
            "1.64%, 0.058"]


def _table2_row() -> list[str]:
    _, results, command = run_folder("table2")
    errors = results["errors"]["fc100-100-10"]
    return ["`table2`", "Table 2", f"`{short_command(command)}`", minutes(results["seconds"]) if "seconds" in results else "–",
            f"FC100-100-10's examples fool FC10(1e-4) {100 * errors['fc10-1e-4']:.1f}%, AE400-10 {100 * errors['ae400-10']:.1f}%",
            "28.9%, 2%"]


def _table3_row() -> list[str]:
    _, results, command = run_folder("table3")
    row = results["table4"]["distorted for FC100"]
    return ["`table3`", "Tables 3, 4", f"`{short_command(command)}`",
            minutes(results["seconds"]) if "seconds" in results else "–",
            f"FC100's examples fool FC123 {100 * row['FC123']:.1f}%, FC100′ {100 * row['FC100′']:.1f}%", "26.2%, 5.9%"]


def _lipschitz_row() -> list[str]:
    table_, results = lipschitz_table()
    _, _, command = run_folder("lipschitz-alexnet")
    conv = [row.bound for row in table_.rows if row.kind == "Conv2d"]
    return ["`lipschitz`", "Table 5", f"`{short_command(command)}`", minutes(results["seconds"][0]),
            f"AlexNet (random weights) conv bounds {min(conv):.2f}–{max(conv):.2f}", "2.75–11 (trained weights)"]


def _units_row() -> list[str]:
    _, results, command = run_folder("units")
    purity = results["mean_label_purity"]
    return ["`units`", "Figures 1, 2", f"`{short_command(command)}`", minutes(results["seconds"]),
            f"label purity: units {purity['unit']:.3f}, random directions {purity['random']:.3f}",
            "alike (qualitative)"]


def _way_summary(way: str, entry: dict) -> str:
    """``way 1.74% at 0.0375`` (test error at mean minimal distortion), with the robust errors at
    L∞ 0.1 and L2 1.5 where the run measured them."""
    robust = entry.get("robust_error") or {}
    at = [f"{label} {share(robust[norm][key])}" for norm, key, label in (("linf", "0.1", "L∞ 0.1"), ("l2", "1.5", "L2 1.5"))
          if key in robust.get(norm, {})]
    return f"{way} {percent(entry['test_error'])} at {number(entry['mean_distortion'])}" + (f" ({', '.join(at)})" if at else "")


def _default_training_row() -> list[str]:
    _, results, command = run_folder("adversarial-training")
    seconds = sum(entry["seconds"] for entry in results)
    ours = ", ".join(_way_summary(entry["way"], entry) for entry in results)
    return ["`adversarial-training`", "§4.2 baselines", f"`{short_command(command)}`", minutes(seconds), ours,
            "1.6%, about 1.3%, below 1.2%"]


def _small_resnet_row() -> list[str]:
    _, results, command = run_folder("adversarial-training-small-resnet")
    seconds = sum(entry["seconds"] for entry in results)
    ours = ", ".join(_way_summary(entry["way"], entry) for entry in results)
    return ["`adversarial-training --model small-resnet`", "§4.2 on a BN ResNet", f"`{short_command(command)}`",
            minutes(seconds), ours, "–"]


REPRODUCTIONS: list[Callable[[], list[str]]] = [_table1_row, _table2_row, _table3_row, _lipschitz_row, _units_row,
                                                _default_training_row, _training_row, _small_resnet_row]

TABLES: dict[str, Callable[[], str]] = {
    "knobs": knobs,
    "attack-benchmark": attack_benchmark,
    "attack-summary": attack_summary,
    "attack-headline": attack_headline,
    "training": training,
    "training-commands": training_commands,
    "real-model-cost": real_model_cost,
    "real-model-cost-bracketed": real_model_cost_bracketed,
    "reference-one-epoch": reference_one_epoch,
    "generation-settings": generation_settings,
    "reference-peers": reference_peers,
    "search-variants-polish-heavy": search_variants_polish_heavy,
    "clean-walk-gain": clean_walk_gain,
    "clean-walk-cost": clean_walk_cost,
    "fab-cost": lambda: later_attack_cost(FAB_RUNS, "FAB-T", "fab-t", "fab"),
    "ddn-cost": lambda: later_attack_cost(DDN_RUNS, "DDN", "ddn", "ddn"),
    "search-gap-rows": search_gap_rows,
    "ways": ways,
    "ways-commands": ways_commands,
    "ways-re-evaluation": ways_re_evaluation,
    "ways-square-l2": ways_square_l2,
    "two-window-peer-gaps": two_window_peer_gaps,
    "ways-peer-check": ways_peer_check,
    "evaluation-gap": evaluation_gap,
    "evaluation-gap-fab": lambda: evaluation_gap("evaluation_gap_fab"),
    "evaluation-gap-foolbox": lambda: evaluation_gap("evaluation_gap_foolbox_fast_small_resnet"),
    "evaluation-gap-pgd-small-resnet": lambda: evaluation_gap("evaluation_gap_pgd_small_resnet"),
    "evaluation-gap-pgd-small-resnet-seed1": lambda: evaluation_gap("evaluation_gap_pgd_small_resnet_seed1_l2_2"),
    "fab-variants": fab_variants,
    "square-alone": square_alone,
    "two-window-square": two_window_square,
    "evaluation-again-square": lambda: evaluation_again("evaluation_gap_pgd_small_resnet_seed1_l2_2_two_window_square",
                                                        "evaluation_gap_pgd_small_resnet_seed1_l2_2"),
    "defaults-check": defaults_check,
    "defaults-shift": defaults_shift,
    "defaults-commands": defaults_commands,
    "evaluation-benchmark": evaluation_benchmark,
    "evaluation-cost": evaluation_cost,
    "search-variants": search_variants,
    "targeted-search": targeted_search,
    "reproductions": reproductions,
    "table1": table1,
    "table2": table2,
    "table3": table3,
    "lipschitz-alexnet": lipschitz_alexnet,
    "units": units,
}


def robustness_figure(path: Path) -> None:
    """``docs/figures/robustness.png``: every way of every Section 4.2 setting, clean test error
    against mean minimal distortion (one point per seed)."""
    points = []  # (test error, distortion, label)
    for (label, runs), short in zip(training_runs(), SHORT_NAMES):
        for _, _, results, _ in runs:
            for entry in results:
                if entry["mean_distortion"] is not None:
                    points.append((entry["test_error"], entry["mean_distortion"], f"{short}: {entry['way']}"))
    scatter(points, path, "clean test error", "mean minimal distortion (higher: harder to fool)",
            lambda e: f"{100 * e:.2f}%", lambda d: f"{d:.3f}")


def scatter(points: list[tuple[float, float, str]], path: Path, x_label: str, y_label: str,
            x_text: Callable[[float], str], y_text: Callable[[float], str], *, y_high: float | None = None) -> None:
    """A scatter plot of ``(x, y, legend entry)`` points from zero up, one colour per entry, drawn with PIL."""
    from PIL import Image, ImageDraw

    width, height, margin = 720, 480, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = 0.0, max(xs) * 1.15
    y_low, y_high = 0.0, y_high if y_high is not None else max(ys) * 1.15
    to_x = lambda e: margin + (e - x_low) / (x_high - x_low) * (width - 2 * margin)  # noqa: E731
    to_y = lambda d: height - margin - (d - y_low) / (y_high - y_low) * (height - 2 * margin)  # noqa: E731
    draw.line([(margin, margin), (margin, height - margin), (width - margin, height - margin)], fill="black")
    for i in range(5):
        e, d = x_low + i * (x_high - x_low) / 4, y_low + i * (y_high - y_low) / 4
        draw.text((to_x(e) - 12, height - margin + 6), x_text(e), fill="black")
        draw.text((8, to_y(d) - 6), y_text(d), fill="black")
    draw.text((width // 2 - 60, height - 30), x_label, fill="black")
    draw.text((8, 20), y_label, fill="black")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]
    legend = sorted({p[2] for p in points})
    for x_value, y_value, name in points:
        colour = colours[legend.index(name) % len(colours)]
        x, y = to_x(x_value), to_y(y_value)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=colour)
    top = height - margin - 18 * len(legend) - 10  # the legend in the lower right corner
    for row, name in enumerate(legend):
        draw.ellipse([width - 290, top + 18 * row, width - 280, top + 10 + 18 * row], fill=colours[row % len(colours)])
        draw.text((width - 274, top - 2 + 18 * row), name, fill="black")
    image.save(path)


def evaluation_curves(path: Path) -> None:
    """``docs/figures/robustness-curves.png``: robust error against budget per norm, one line per
    model of the evaluation benchmark (advtrain's figures), drawn by :func:`advtrain.evaluation.curve_image`."""
    import math

    from advtrain.evaluation import RobustnessReport, curve_image

    result = load(BENCHMARKS / "evaluation" / "results.json")
    reports = {row["model"]: RobustnessReport(examples=result["examples"], clean_error=row["clean_error"],
                                              robust_error=row["robust_error"]["advtrain"], broken_by={},
                                              whole_box_error=math.nan, mean_distortion=math.nan, search_success=math.nan)
               for row in result["rows"]}
    curve_image(reports, path)


# --------------------------------------------------------------------------------------------
# Writing


def render(text: str, path: Path, cache: dict[str, str]) -> str:
    """``text`` with every generated block replaced by its table."""

    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise KeyError(f"{path.relative_to(REPO)}: no generator for the table {name!r}; known: {', '.join(TABLES)}")
        if name not in cache:
            cache[name] = TABLES[name]()
        return match.group(1) + cache[name] + match.group(4)

    return MARKER.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated table differs from its JSON")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    cache: dict[str, str] = {}
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        new = render(text, path, cache)
        if new != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.write_text(new)
    if not args.check:
        robustness_figure(REPO / "docs" / "figures" / "robustness.png")
        evaluation_curves(REPO / "docs" / "figures" / "robustness-curves.png")
        ways_figures(REPO / "docs" / "figures" / "ways-robust-clean.png", REPO / "docs" / "figures" / "ways-robust-time.png")
    if args.check and stale:
        print("generated tables differ from the committed results JSON in: " + ", ".join(map(str, stale))
              + "; run python docs/generate.py", file=sys.stderr)
        return 1
    print(("up to date" if args.check else f"rewrote {len(stale)} file(s)") + f"; {len(cache)} tables")
    return 0


if __name__ == "__main__":
    sys.exit(main())
