"""The robustness report of a model in hand: robust error at stated threat models on a data
loader, outside training, with the checks that flag a broken evaluation.

:func:`evaluate_robustness` runs what :class:`~advtrain.callbacks.AdversarialEvaluation` runs (the
minimal search, then the ensemble of :mod:`advtrain.robustness`, then the checks of
:mod:`advtrain.evaluation_checks`) over the first ``examples`` examples of a loader, in chunks, and
returns a :class:`RobustnessReport`; :func:`write_report` writes it as JSON with the curve of robust
error against budget as a PNG: the report to attach to a paper or a model card.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from advtrain.attacks import Attack, evaluation_search
from advtrain.batch import BatchKeys, read_batch
from advtrain.box import UNIT_BOX, Bounds, check_bounds
from advtrain.checks import check_count
from advtrain.evaluation_checks import FailedCheck, output_checks, result_checks, warn_failed
from advtrain.model_state import untouched
from advtrain.robustness import Ensemble, RobustnessResult, check_threat_models, combine, run_ensemble


@dataclass
class RobustnessReport:
    """A model's robustness at stated threat models, as measured on ``examples`` examples.

    Attributes:
        examples: how many examples were evaluated.
        clean_error: fraction misclassified as they are.
        robust_error: norm to budget (written with ``:g``) to the fraction misclassified as they are
            or broken within that budget by any attack of the ensemble.
        broken_by: norm to budget to attack to how many examples it broke first there.
        whole_box_error: the error reached with the whole box as the L∞ budget.
        mean_distortion: mean minimal ``sqrt(mean r²)`` the search found over the correctly
            classified examples it succeeded on (``nan`` where none, or no search).
        search_success: fraction of the correctly classified examples the search succeeded on.
        checks_failed: names of the failed checks (:mod:`advtrain.evaluation_checks`).
        check_messages: what each failed check saw and what to do.
        seconds: wall time of the evaluation.
        ensemble: the ensemble's settings.
        bounds: the input box, as written (``"per-unit tensor"`` for tensors).
    """

    examples: int
    clean_error: float
    robust_error: dict[str, dict[str, float]]
    broken_by: dict[str, dict[str, dict[str, int]]]
    whole_box_error: float
    mean_distortion: float
    search_success: float
    checks_failed: list[str] = field(default_factory=list)
    check_messages: list[str] = field(default_factory=list)
    seconds: float = math.nan
    ensemble: dict = field(default_factory=dict)
    bounds: list = field(default_factory=list)

    def curve(self, norm: str) -> list[tuple[float, float]]:
        """``(epsilon, robust error)`` of one norm, budgets in increasing order."""
        return sorted((float(epsilon), error) for epsilon, error in self.robust_error[norm].items())


def collect(loader: Iterable, examples: int | None, keys: BatchKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``examples`` examples of ``loader`` (all where None) as ``(inputs, labels)``."""
    inputs, labels, count = [], [], 0
    for batch in loader:
        batch_inputs, batch_labels = read_batch(batch, keys)
        inputs.append(batch_inputs)
        labels.append(batch_labels)
        count += len(batch_labels)
        if examples is not None and count >= examples:
            break
    if not inputs:
        raise ValueError("the loader gave no batch: nothing to evaluate")
    return torch.cat(inputs)[:examples], torch.cat(labels)[:examples]


def evaluate_robustness(
    model: nn.Module,
    loader: Iterable,
    budgets: Mapping[str, Sequence[float]],
    *,
    examples: int | None = 1000,
    bounds: Bounds = UNIT_BOX,
    ensemble: Ensemble | None = None,
    search: Attack | None = None,
    chunk_size: int = 250,
    batch_keys: BatchKeys | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> RobustnessReport:
    """The robustness report of ``model`` on the first ``examples`` examples of ``loader``.

    Args:
        model: inputs to logits; evaluated as in eval mode and left as found.
        loader: batches ``(inputs, labels)`` or dicts (see :mod:`advtrain.batch`).
        budgets: threat models ``{"linf": [...], "l2": [...], "rms": [...]}``.
        examples: how many examples (None: the whole loader).
        bounds: the input box.
        ensemble: the attacks' effort (default: AutoAttack's standard).
        search: the minimal search for the distortion figures (default:
            :func:`~advtrain.attacks.box_lbfgs.evaluation_search`, untargeted).
        chunk_size: examples attacked at once (memory).
        batch_keys: keys of dict batches.
        device: where to evaluate (default: the model's device).
        seed: seeds every random draw.
        progress: show a progress bar over the chunks.

    Raises:
        ValueError: bad budgets (an unknown norm, an empty list, a budget not positive), a bad box,
            an empty loader, ``examples`` or ``chunk_size`` below 1.

    Example::

        report = evaluate_robustness(model, test_loader, {"linf": [0.1, 0.3], "l2": [1.0]}, examples=1000)
        write_report(report, Path("robustness"))
    """
    threat_models = check_threat_models(budgets)
    bounds = check_bounds(bounds)
    if examples is not None:
        check_count("examples", examples)
    check_count("chunk_size", chunk_size)
    ensemble = ensemble if ensemble is not None else Ensemble()
    search = search if search is not None else evaluation_search()
    started = time.perf_counter()
    inputs, labels = collect(loader, examples, batch_keys)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    chunks = range(0, len(labels), chunk_size)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(chunks, desc="robustness", unit="chunk", total=math.ceil(len(labels) / chunk_size))
    parts: list[RobustnessResult] = []
    failed: dict[str, FailedCheck] = {}
    found, attacked, distortion_sum = 0, 0, 0.0
    with untouched(model), torch.inference_mode(False):
        for index, start in enumerate(chunks):
            chunk_inputs = inputs[start:start + chunk_size].to(device)
            chunk_labels = labels[start:start + chunk_size].to(device)
            with torch.no_grad():
                logits = model(chunk_inputs)
            correct = logits.argmax(1) == chunk_labels
            result = search(model, chunk_inputs[correct], chunk_labels[correct], target="untargeted", bounds=bounds,
                            generator=torch.Generator().manual_seed(seed + index))
            found += int(result.success.sum())
            attacked += len(result)
            distortion_sum += float(result.distortion[result.success].sum())
            for check in output_checks(model, chunk_inputs, chunk_labels):
                failed.setdefault(check.name, check)
            parts.append(run_ensemble(model, chunk_inputs, chunk_labels, threat_models, bounds, ensemble=ensemble,
                                      search=result, seed=seed + index, clean_logits=logits))
    total = combine(parts)
    for check in result_checks(total):
        failed.setdefault(check.name, check)
    warn_failed(list(failed.values()), "evaluate_robustness")
    return RobustnessReport(
        examples=total.examples, clean_error=total.clean_error,
        robust_error=budgets_written(total.robust_error), broken_by=budgets_written(total.broken_by),
        whole_box_error=total.whole_box_error,
        mean_distortion=distortion_sum / found if found else math.nan,
        search_success=found / attacked if attacked else math.nan,
        checks_failed=list(failed), check_messages=[check.message for check in failed.values()],
        seconds=time.perf_counter() - started, ensemble=asdict(ensemble),
        bounds=[float(b) if not isinstance(b, torch.Tensor) or b.numel() == 1 else "per-unit tensor" for b in bounds],
    )


#: colours of the norms' curves
COLOURS = {"linf": "#1f77b4", "l2": "#d62728", "rms": "#2ca02c"}


def curve_image(reports: Mapping[str, RobustnessReport], path: Path) -> Path:
    """A PNG with one panel per norm: robust error against budget, one line per report (drawn
    with PIL, no plotting library needed)."""
    from PIL import Image, ImageDraw

    norms = sorted({norm for report in reports.values() for norm in report.robust_error}, key=["linf", "l2", "rms"].index)
    panel, margin = 360, 60
    width, height = panel * len(norms) + margin, 360
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for column, norm in enumerate(norms):
        left, right, top, bottom = margin + column * panel, margin + (column + 1) * panel - 30, 30, height - 50
        epsilons = sorted({e for r in reports.values() for e, _ in (r.curve(norm) if norm in r.robust_error else [])})
        high = max(epsilons) * 1.05
        to_x = lambda e: left + e / high * (right - left)  # noqa: E731
        to_y = lambda v: bottom - v * (bottom - top)  # noqa: E731
        draw.line([(left, top), (left, bottom), (right, bottom)], fill="black")
        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            draw.text((left - 40, to_y(tick) - 6), f"{tick:.0%}", fill="black")
        for epsilon in epsilons:
            draw.text((to_x(epsilon) - 10, bottom + 6), f"{epsilon:g}", fill="black")
        draw.text(((left + right) // 2 - 40, bottom + 26), f"{'L-inf' if norm == 'linf' else norm.upper()} budget", fill="black")
        for row, (name, report) in enumerate(reports.items()):
            if norm not in report.robust_error:
                continue
            colour = palette[row % len(palette)]
            points = [(to_x(0.0), to_y(report.clean_error))] + [(to_x(e), to_y(v)) for e, v in report.curve(norm)]
            draw.line(points, fill=colour, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            if column == 0:
                draw.text((left + 10, top + 4 + 14 * row), name.replace("∞", "-inf"), fill=colour)  # PIL's font lacks ∞
    draw.text((8, 8), "robust error (clean error at budget 0)", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def budgets_written(by_norm: Mapping[str, Mapping[float, object]]) -> dict[str, dict[str, object]]:
    """Norm to budget to value with each budget written as JSON keys are (``:g``: ``0.1``, ``1``)."""
    return {norm: {f"{epsilon:g}": value for epsilon, value in values.items()} for norm, values in by_norm.items()}


def write_report(reports: Mapping[str, RobustnessReport], folder: Path) -> tuple[Path, Path]:
    """``robustness.json`` (every report, strict JSON) and ``robustness.png`` (the curves) in ``folder``."""
    from advtrain.recipes.run_folder import write_json

    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "robustness.json"
    write_json(json_path, {name: asdict(report) for name, report in reports.items()})
    return json_path, curve_image(reports, folder / "robustness.png")


__all__ = ["RobustnessReport", "budgets_written", "collect", "curve_image", "evaluate_robustness", "write_report"]
