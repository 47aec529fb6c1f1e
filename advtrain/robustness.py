"""Robust error at stated threat models: the worst case per example over an ensemble of strong,
diverse attacks, the field's protocol (AutoAttack: Croce & Hein, 2020).

At each budget ε of each norm, an example counts as broken when it is misclassified as it is, or
when any attack found a point inside the box, within ε in that norm, that a fresh forward pass
misclassifies. The attacks, each on the rows nothing has broken yet:

1. the minimal search the caller already ran (its perturbations, measured in the norm);
2. APGD with cross-entropy (:class:`~advtrain.attacks.APGD`), run on *every* correctly classified
   example, so that its error at each budget, on its own, tells whether the error grows with the
   budget as it must (:mod:`advtrain.evaluation_checks`);
3. APGD with the targeted difference of logits ratio, towards each of the ``targets`` most likely
   wrong classes in turn;
4. FAB-T (:class:`~advtrain.attacks.FAB`), the minimal search along the linearised boundary
   towards each of the ``targets`` most likely wrong classes in turn; its minimal sizes do not
   depend on the budget, so each row is searched once per norm and the sizes count at every
   budget they fit in;
5. in L2 and ``rms``, DDN (:class:`~advtrain.attacks.DDN`), a minimal search that walks the norm
   down along the gradient's direction, searched once per row in the same way;
6. Square (:class:`~advtrain.attacks.Square`), which reads no gradient.

Budgets are taken in increasing order, and a row broken at one budget stays broken at every larger
one. Finally APGD with the difference of logits ratio is given the whole box (an L∞ budget as wide as the box): every
ordinary classifier then errs on nearly every example, and one that does not is hiding its
gradients.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from advtrain.attacks import APGD, DDN, FAB, AttackResult, Square
from advtrain.attacks.base import Attack
from advtrain.attacks.square import L2_PROPOSAL
from advtrain.attacks.targets import ranked_wrong_classes
from advtrain.box import Bounds, check_bounds
from advtrain.budget import check_epsilon, check_norm, perturbation_size
from advtrain.checks import check_count

#: relative slack on the budget for a verified point: projection onto the ball rounds in float32
BUDGET_TOLERANCE = 1e-5


@dataclass
class Ensemble:
    """The attacks of the evaluation and their effort (AutoAttack's standard version by default).

    Args:
        steps: APGD's steps per run.
        restarts: APGD's random restarts.
        targets: how many of the most likely wrong classes the targeted APGD and FAB-T try, one
            run each.
        queries: Square's model queries per example; 0 leaves Square out (and the check that
            compares it with the gradient attacks).
        fab: run FAB-T (``steps`` boundary steps per wrong class).
        ddn: DDN's steps per row in L2 and ``rms``; 0 leaves DDN out.
        whole_box: give APGD the whole box at the end (the check that a huge budget breaks nearly
            everything).

    Attributes:
        square_l2: which proposal Square draws in L2 (:data:`~advtrain.attacks.square.L2_PROPOSAL`),
            not settable: recorded with the settings so that results tell evaluations by the paper's
            two windows from the earlier one-window form (whose results lack the field).

    Raises:
        ValueError: ``steps``, ``restarts`` below 1, ``targets``, ``queries`` or ``ddn`` negative.
    """

    steps: int = 100
    restarts: int = 1
    targets: int = 9
    queries: int = 5000
    fab: bool = True
    ddn: int = 1000
    whole_box: bool = True
    square_l2: str = field(default=L2_PROPOSAL, init=False)

    def __post_init__(self) -> None:
        check_count("steps", self.steps)
        check_count("restarts", self.restarts)
        check_count("targets", self.targets, minimum=0)
        check_count("queries", self.queries, minimum=0)
        check_count("ddn", self.ddn, minimum=0)


@dataclass
class RobustnessResult:
    """What the ensemble found on one set of examples.

    Attributes:
        examples: how many examples were evaluated.
        clean_error: fraction misclassified as they are.
        robust_error: norm to budget to the fraction misclassified as they are or broken within
            that budget by any attack.
        broken_by: norm to budget to attack name to how many examples that attack broke first at
            that budget (the search, ``apgd-ce``, ``apgd-t``, ``fab-t``, ``ddn``, ``square``; rows broken at a smaller
            budget count as ``smaller budget``).
        first_attack_error: norm to budget to the error APGD with cross-entropy reached on its own
            over every correctly classified example.
        whole_box_error: the error APGD reached with the whole box (``nan`` where not run).
        broken: norm to budget to a ``(N,)`` bool tensor of the broken examples.
    """

    examples: int
    clean_error: float
    robust_error: dict[str, dict[float, float]] = field(default_factory=dict)
    broken_by: dict[str, dict[float, dict[str, int]]] = field(default_factory=dict)
    first_attack_error: dict[str, dict[float, float]] = field(default_factory=dict)
    whole_box_error: float = math.nan
    broken: dict[str, dict[float, torch.Tensor]] = field(default_factory=dict, repr=False)


def verified_breaks(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, points: torch.Tensor, norm: str,
                    epsilon: float, bounds: Bounds) -> torch.Tensor:
    """``(N,)`` rows whose ``points`` lie inside the box and within ``epsilon`` of ``inputs`` in
    ``norm`` and are misclassified by a fresh forward pass."""
    lower, upper = (torch.as_tensor(b, dtype=inputs.dtype, device=inputs.device).expand_as(inputs) for b in bounds)
    inside = ((points >= lower) & (points <= upper)).flatten(1).all(1)
    within = perturbation_size(points - inputs, norm) <= epsilon * (1 + BUDGET_TOLERANCE)
    with torch.no_grad():
        fooled = model(points).argmax(1) != labels
    return inside & within & fooled


def _attack_rows(attack: Attack, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor,
                 norm: str, epsilon: float, bounds: Bounds, generator: torch.Generator,
                 targets: torch.Tensor | None = None) -> torch.Tensor:
    """Run ``attack`` on ``rows`` and return the rows it verifiably broke."""
    if not rows.numel():
        return rows
    result: AttackResult = attack(model, inputs[rows], labels[rows], bounds=bounds, generator=generator,
                                  target=targets if targets is not None else "untargeted")
    broke = verified_breaks(model, inputs[rows], labels[rows], result.attempt, norm, epsilon, bounds)
    return rows[broke]


class CachedSearch:
    """Minimal searches for one norm, run once per row on demand and reused at every budget: a row
    is searched by ``attacks`` in turn until one lands within the budget asked; a row not yet
    searched by them all holds its smallest point so far.

    Args:
        model, inputs, labels, norm, bounds, generator: as :func:`run_ensemble` attacks with.
        attacks: minimal searches (their sizes do not depend on a budget), tried in order.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, attacks: Sequence[Attack],
                 norm: str, bounds: Bounds, generator: torch.Generator) -> None:
        self.model, self.inputs, self.labels = model, inputs, labels
        self.norm, self.bounds, self.generator = norm, bounds, generator
        self.attacks = list(attacks)
        self.points = inputs.clone()
        self.sizes = torch.full((labels.numel(),), math.inf, device=inputs.device)
        self.searched = torch.zeros(labels.numel(), dtype=torch.long, device=inputs.device)  # attacks tried per row

    def _fits(self, rows: torch.Tensor, epsilon: float) -> torch.Tensor:
        """The rows whose best point is verified wrong within ``epsilon``."""
        if not rows.numel():
            return rows
        return rows[verified_breaks(self.model, self.inputs[rows], self.labels[rows], self.points[rows], self.norm,
                                    epsilon, self.bounds)]

    def breaks(self, rows: torch.Tensor, epsilon: float) -> torch.Tensor:
        """The ``rows`` the searches break within ``epsilon``, searching further where needed."""
        hits = self._fits(rows[self.sizes[rows].isfinite()], epsilon)
        for index in range(len(self.attacks)):
            rest = rows[(self.searched[rows] == index) & ~torch.isin(rows, hits)]
            if rest.numel():
                self._search(rest, index)
                hits = torch.cat([hits, self._fits(rest, epsilon)])
        return hits

    def _search(self, rows: torch.Tensor, index: int) -> None:
        """Search ``rows`` with the attack at ``index`` and keep each row's smaller point."""
        result = self.attacks[index](self.model, self.inputs[rows], self.labels[rows], bounds=self.bounds,
                                     generator=self.generator)
        sizes = torch.where(result.success, perturbation_size(result.perturbation, self.norm), math.inf)
        smaller = sizes < self.sizes[rows]
        self.points[rows[smaller]] = result.adversarial[smaller]
        self.sizes[rows[smaller]] = sizes[smaller]
        self.searched[rows] = index + 1


class BoundarySearch(CachedSearch):
    """FAB-T's minimal points for one norm (a :class:`CachedSearch`): towards each of the
    ``ensemble.targets`` most likely wrong classes by the clean logits in turn, ``ensemble.steps``
    steps each.

    Args:
        wrong_classes: how many wrong classes the model has (``C - 1``).
        the rest: as :class:`CachedSearch`, and the ensemble's effort.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, wrong_classes: int,
                 norm: str, bounds: Bounds, ensemble: Ensemble, generator: torch.Generator) -> None:
        attacks = [FAB(norm=norm, steps=ensemble.steps, guide_rank=rank + 1)
                   for rank in range(min(ensemble.targets, wrong_classes))]
        super().__init__(model, inputs, labels, attacks, norm, bounds, generator)


def run_ensemble(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, threat_models: Mapping[str, Sequence[float]],
                 bounds: Bounds, *, ensemble: Ensemble | None = None, search: AttackResult | None = None,
                 seed: int = 0, clean_logits: torch.Tensor | None = None) -> RobustnessResult:
    """The robust error of ``model`` (in eval mode, callers put it back) on ``inputs`` at every
    budget of every threat model (see the module docstring).

    Args:
        model: inputs to logits.
        inputs, labels: the examples, inside ``bounds``.
        threat_models: ``{norm: [epsilon, ...]}``, checked by the caller.
        bounds: the input box.
        ensemble: the attacks' effort (default: :class:`Ensemble`'s).
        search: a minimal search's result on the correctly classified rows, in order, whose
            perturbations count at every budget they fit in.
        seed: seeds every random start and draw.
        clean_logits: the model's logits on ``inputs``, where the caller has them (one forward
            pass fewer).
    """
    ensemble = ensemble if ensemble is not None else Ensemble()
    bounds = check_bounds(bounds)
    generator = torch.Generator().manual_seed(seed)
    if clean_logits is None:
        with torch.no_grad():
            clean_logits = model(inputs)
    elif clean_logits.shape[:1] != labels.shape:
        raise ValueError(f"clean_logits has {clean_logits.shape[0]} rows for {labels.shape[0]} labels")
    correct = clean_logits.argmax(1) == labels
    count = labels.numel()
    result = RobustnessResult(examples=count, clean_error=float((~correct).float().mean()) if count else math.nan)
    candidates = correct.nonzero()[:, 0]
    wrong_classes = ranked_wrong_classes(clean_logits, labels)
    for norm, epsilons in threat_models.items():
        broken = ~correct
        fab_search = BoundarySearch(model, inputs, labels, wrong_classes.shape[1], norm, bounds, ensemble, generator)
        ddn_search = (CachedSearch(model, inputs, labels, [DDN(norm=norm, steps=ensemble.ddn)], norm, bounds, generator)
                      if ensemble.ddn and norm != "linf" else None)
        result.robust_error[norm], result.broken_by[norm], result.first_attack_error[norm], result.broken[norm] = {}, {}, {}, {}
        for epsilon in sorted(float(e) for e in epsilons):
            tally = {"smaller budget": int((broken & correct).sum())}
            new = broken.clone()
            if search is not None and len(search) == candidates.numel():  # a random model may disagree with itself
                sizes = perturbation_size(search.perturbation, norm).to(inputs.device)
                hits = candidates[search.success.to(inputs.device) & (sizes <= epsilon * (1 + BUDGET_TOLERANCE))]
                tally["search"] = int((~new[hits]).sum())
                new[hits] = True
            ce = APGD(epsilon=epsilon, norm=norm, steps=ensemble.steps, restarts=ensemble.restarts, loss="ce")
            by_ce = _attack_rows(ce, model, inputs, labels, candidates, norm, epsilon, bounds, generator)
            first = ~correct
            first[by_ce] = True
            result.first_attack_error[norm][epsilon] = float(first.float().mean())
            tally["apgd-ce"] = int((~new[by_ce]).sum())
            new[by_ce] = True
            targeted = APGD(epsilon=epsilon, norm=norm, steps=ensemble.steps, restarts=ensemble.restarts, loss="dlr")
            tally["apgd-t"] = 0
            for rank in range(min(ensemble.targets, wrong_classes.shape[1])):
                rest = (~new).nonzero()[:, 0]
                hits = _attack_rows(targeted, model, inputs, labels, rest, norm, epsilon, bounds, generator,
                                    targets=wrong_classes[rest, rank])
                tally["apgd-t"] += hits.numel()
                new[hits] = True
            if ensemble.fab:
                hits = fab_search.breaks((~new).nonzero()[:, 0], epsilon)
                tally["fab-t"] = hits.numel()
                new[hits] = True
            if ddn_search is not None:
                hits = ddn_search.breaks((~new).nonzero()[:, 0], epsilon)
                tally["ddn"] = hits.numel()
                new[hits] = True
            if ensemble.queries:
                square = Square(epsilon=epsilon, norm=norm, queries=ensemble.queries)
                hits = _attack_rows(square, model, inputs, labels, (~new).nonzero()[:, 0], norm, epsilon, bounds, generator)
                tally["square"] = hits.numel()
                new[hits] = True
            broken = new
            result.robust_error[norm][epsilon] = float(broken.float().mean())
            result.broken_by[norm][epsilon] = tally
            result.broken[norm][epsilon] = broken.clone()
    if ensemble.whole_box:  # with nothing correctly classified, every example is already an error
        result.whole_box_error = (whole_box_error(model, inputs, labels, correct, threat_models, bounds, ensemble, generator)
                                  if candidates.numel() else result.clean_error)
    return result


def whole_box_width(bounds: Bounds, threat_models: Mapping[str, Sequence[float]]) -> float:
    """An L∞ budget that covers the whole box: its widest side, or where the box is unbounded, ten
    times the largest budget given."""
    lower, upper = (torch.as_tensor(b, dtype=torch.float64) for b in bounds)
    width = float((upper - lower).max())
    return width if math.isfinite(width) else 10 * max(max(e) for e in threat_models.values())


def whole_box_error(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor,
                    threat_models: Mapping[str, Sequence[float]], bounds: Bounds, ensemble: Ensemble,
                    generator: torch.Generator) -> float:
    """The error APGD with the difference of logits ratio reaches when its L∞ budget covers the
    whole box."""
    width = whole_box_width(bounds, threat_models)
    attack = APGD(epsilon=width, norm="linf", steps=ensemble.steps, loss="dlr")  # scale-free: a saturated softmax cannot stop it
    hits = _attack_rows(attack, model, inputs, labels, correct.nonzero()[:, 0], "linf", width, bounds, generator)
    broken = ~correct
    broken[hits] = True
    return float(broken.float().mean())


def result_counts(result: RobustnessResult) -> dict[str, float]:
    """Everything ``result`` measured as counts of examples, keyed by name: what ranks or chunks
    add up (:func:`result_from_counts` makes a result of the sums)."""
    counts = {"examples": float(result.examples), "clean": round(result.clean_error * result.examples),
              "whole box": math.nan if math.isnan(result.whole_box_error) else round(result.whole_box_error * result.examples)}
    for norm, errors in result.robust_error.items():
        for epsilon, error in errors.items():
            counts[f"robust|{norm}|{epsilon!r}"] = round(error * result.examples)
            counts[f"first|{norm}|{epsilon!r}"] = round(result.first_attack_error[norm][epsilon] * result.examples)
            for name, broke in result.broken_by[norm][epsilon].items():
                counts[f"by|{norm}|{epsilon!r}|{name}"] = broke
    return {key: float(value) for key, value in counts.items()}


def result_from_counts(counts: Mapping[str, float]) -> RobustnessResult:
    """The result whose counts (:func:`result_counts`) are ``counts`` (summed over parts)."""
    examples = round(counts["examples"])
    result = RobustnessResult(examples=examples, clean_error=counts["clean"] / examples,
                              whole_box_error=counts["whole box"] / examples)
    for key, value in counts.items():
        kind, *rest = key.split("|")
        if kind in ("robust", "first", "by"):
            norm, epsilon = rest[0], float(rest[1])
            if kind == "robust":
                result.robust_error.setdefault(norm, {})[epsilon] = value / examples
            elif kind == "first":
                result.first_attack_error.setdefault(norm, {})[epsilon] = value / examples
            else:
                result.broken_by.setdefault(norm, {}).setdefault(epsilon, {})[rest[2]] = round(value)
    for norm in result.robust_error:  # budgets in increasing order, as run
        result.robust_error[norm] = dict(sorted(result.robust_error[norm].items()))
        result.first_attack_error[norm] = dict(sorted(result.first_attack_error[norm].items()))
        result.broken_by[norm] = dict(sorted(result.broken_by[norm].items()))
    return result


def combine(parts: Sequence[RobustnessResult]) -> RobustnessResult:
    """One result for the examples of several (the chunks of a data set, evaluated in turn):
    counts added up (:func:`result_counts`), broken masks concatenated."""
    if not parts or not sum(part.examples for part in parts):
        raise ValueError("combine needs at least one result with examples")
    counts = [result_counts(part) for part in parts]
    result = result_from_counts({key: sum(c[key] for c in counts) for key in counts[0]})
    for norm, budgets in parts[0].broken.items():
        result.broken[norm] = {e: torch.cat([p.broken[norm][e].cpu() for p in parts]) for e in budgets}
    return result


def check_threat_models(budgets: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, ...]]:
    """``{norm: (epsilon, ...)}`` after checking every norm and budget.

    Raises:
        ValueError: an unknown norm (listing the norms), an empty list, a budget that is not positive
            and finite.
    """
    checked = {}
    for norm, epsilons in budgets.items():
        check_norm(norm, name=f"budgets key {norm!r}: a norm")
        if isinstance(epsilons, (int, float)) or not len(epsilons):
            raise ValueError(f"budgets[{norm!r}] must be a non-empty list of budgets, got {epsilons!r}")
        checked[norm] = tuple(check_epsilon(epsilon, name=f"budgets[{norm!r}] entry") for epsilon in epsilons)
    if not checked:
        raise ValueError("budgets must name at least one norm: {'linf': [...], 'l2': [...], 'rms': [...]}")
    return checked


__all__ = ["BUDGET_TOLERANCE", "BoundarySearch", "CachedSearch", "Ensemble", "RobustnessResult", "check_threat_models", "combine", "result_counts", "result_from_counts", "ranked_wrong_classes", "run_ensemble",
           "verified_breaks", "whole_box_error", "whole_box_width"]
