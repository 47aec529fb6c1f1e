"""The paper's box-constrained L-BFGS search (Section 4.1), batched, with a per-example search on c.

For input (or activation) x and target l, minimise ``c·‖x′ − x‖² + loss(head(x′), l)`` over x′ in
the box ``[lower, upper]``. A larger c gives a smaller perturbation, so for every example the search
looks for the largest c whose minimiser still reaches l: c grows ×``c_growth`` while the target is
reached (shrinks while it is not), then bisects (geometrically) between the last success and the
first failure, warm-starting each solve from the best success so far. Every iterate that reaches
the target is a candidate; the smallest one is kept.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from advtrain.attacks.base import Attack, Proposal
from advtrain.attacks.inputs import CheckedBatch, Head, head_for_rows
from advtrain.attacks.lbfgs import project, projected_lbfgs
from advtrain.attacks.polish import polish_on_boundary, walk_from_clean
from advtrain.attacks.targets import TargetPolicy
from advtrain.checks import check_count

Loss = Literal["ce", "margin", "both"]
Backend = Literal["torch", "scipy"]


class BoxLBFGS(Attack):
    """Box-constrained L-BFGS adversarial search with a per-example line search over c.

    Args:
        loss: ``"margin"`` (the default), a logit margin after Carlini and Wagner made smooth:
            ``Σ_j max(z_j − z_target + confidence, 0)²`` over the other classes, whose minimiser
            near the largest successful c approaches the minimum-norm point even where several
            classes tie at the optimum; ``"ce"``, the paper's cross-entropy to the target; or
            ``"both"``, the margin search and then a short cross-entropy search (3 values of c,
            half the iterations), the smaller success kept per example.
        backend: ``"torch"`` (batched projected L-BFGS, one history per example, CPU or GPU),
            or ``"scipy"`` (scipy's L-BFGS-B per example: exact box handling, slower).
        search_steps: how many values of c to try per example.
        iterations: L-BFGS iterations per value of c.
        history: L-BFGS memory (curvature pairs kept per example).
        c_init: the first c (default: 1 for the cross-entropy, 0.1 for the margin loss).
        c_growth: factor by which c grows (or shrinks) before a bracket is found.
        confidence: for the margin loss, how far past the best other logit the loss pushes the
            target logit, so that minimisers lie strictly beyond the decision boundary.
        refine_steps: bisection steps that finally pull each success back along its perturbation
            towards the clean input, to just past the decision boundary (0 to skip): the
            minimiser of ``c·‖r‖² + loss`` overshoots the boundary, and the box is convex, so the
            shortened ``r`` stays inside it.
        polish_steps: steps that finally walk each success along the decision boundary towards the
            clean input (:func:`~advtrain.attacks.polish.polish_on_boundary`), keeping the smallest
            adversarial point met (0, the default, to skip: the paper's search alone). The
            evaluation's search (:func:`evaluation_search`) takes 50.
        clean_walk_steps: steps of a second walk, started again from the clean input with three
            times the found perturbation's norm (:func:`~advtrain.attacks.polish.walk_from_clean`),
            after the polish; each row keeps the smaller of the two points (0, the default, to
            skip). The evaluation's search takes 50.
        target: the default target policy (see :class:`~advtrain.attacks.base.Attack`); besides
            the others, ``"nearest"`` searches every wrong class and keeps the closest success (as
            many searches as wrong classes), where ``"untargeted"`` runs one search whose loss
            pushes the true class below the best other one.
        progress: show a progress bar over the search steps.

    Raises:
        ValueError: a setting out of range (at construction); bad inputs, labels, targets or
            bounds (at call).

    Example::

        >>> import torch
        >>> _ = torch.manual_seed(0)  # a model and inputs whose examples can all be fooled inside the box
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> result = BoxLBFGS()(model, torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> bool(result.success.all()), result.distortion.shape
        (True, torch.Size([5]))

    Reference: Szegedy et al. (2013), Section 4.1; Tabacof and Valle (2015) for the c search.
    """

    policies = ("untargeted", "nearest", "random", "runner_up", "least_likely")

    def __init__(
        self,
        *,
        loss: Loss = "margin",
        backend: Backend = "torch",
        search_steps: int = 6,
        iterations: int = 50,
        history: int = 10,
        c_init: float | None = None,
        c_growth: float = 10.0,
        confidence: float = 0.01,
        refine_steps: int = 20,
        polish_steps: int = 0,
        clean_walk_steps: int = 0,
        target: TargetPolicy = "untargeted",
        progress: bool = False,
    ) -> None:
        if loss not in ("ce", "margin", "both"):
            raise ValueError(f"loss must be 'ce', 'margin' or 'both', got {loss!r}")
        if backend not in ("torch", "scipy"):
            raise ValueError(f"backend must be 'torch' or 'scipy', got {backend!r}")
        for name, value in (("search_steps", search_steps), ("iterations", iterations), ("history", history)):
            check_count(name, value)
        if c_init is not None and not (c_init > 0 and math.isfinite(c_init)):
            raise ValueError(f"c_init must be positive and finite, got {c_init}")
        if not c_growth > 1:
            raise ValueError(f"c_growth must be greater than 1, got {c_growth}")
        check_count("refine_steps", refine_steps, minimum=0)
        check_count("polish_steps", polish_steps, minimum=0)
        check_count("clean_walk_steps", clean_walk_steps, minimum=0)
        if confidence < 0:
            raise ValueError(f"confidence must be non-negative, got {confidence}")
        super().__init__(target=target)
        self.loss = loss
        self.backend = backend
        self.search_steps = search_steps
        self.iterations = iterations
        self.history = history
        self.c_init = c_init
        self.c_growth = c_growth
        self.confidence = confidence
        self.refine_steps = refine_steps
        self.polish_steps = polish_steps
        self.clean_walk_steps = clean_walk_steps
        self.progress = progress

    def propose(self, model: Head, batch: CheckedBatch, targets: torch.Tensor | None, policy: TargetPolicy | torch.Tensor,
                generator: torch.Generator) -> Proposal:
        """The search on every row: towards ``targets``, or away from the true labels (one search,
        or one per wrong class for ``"nearest"``)."""
        inputs, lower, upper = batch.inputs, batch.lower, batch.upper
        untargeted = targets is None
        goals = batch.labels if untargeted else targets
        found = None
        for loss, steps, iterations in self.searches():
            if policy == "nearest":
                candidate = self._nearest(model, inputs, batch.labels, lower, upper, batch.num_classes, loss, steps, iterations)
            else:
                candidate = self._search(model, inputs, goals, lower, upper, untargeted, loss, steps, iterations)
            found = candidate if found is None else _closer(inputs, found, candidate)
        keeps = _leaves_by_margin if untargeted else _reaches_by_margin
        for walk, steps in ((polish_on_boundary, self.polish_steps), (walk_from_clean, self.clean_walk_steps)):
            if steps:
                walked = walk(model, inputs.flatten(1), found.points.flatten(1), found.found, goals, untargeted, keeps,
                              lower, upper, inputs.shape, steps=steps)
                found = Proposal(walked.view(inputs.shape), found.found, c=found.c,
                                 iterations=found.iterations + steps * found.found.long())
        return found

    def searches(self) -> list[tuple[str, int, int]]:
        """``(loss, values of c, iterations)`` of each search: one, or for ``loss="both"`` the margin
        search and then a short cross-entropy one (3 values of c, half the iterations), which only
        has to land in a better minimum where the margin search stayed in a worse one."""
        if self.loss != "both":
            return [(self.loss, self.search_steps, self.iterations)]
        return [("margin", self.search_steps, self.iterations), ("ce", min(3, self.search_steps), max(1, self.iterations // 2))]

    def _c_init(self, loss: str) -> float:
        return self.c_init if self.c_init is not None else (1.0 if loss == "ce" else 0.1)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, untargeted: bool, loss: str) -> torch.Tensor:
        """Per-example ``loss`` ``(n,)``: low where the head prefers the target (untargeted: where it
        prefers any class to ``targets``, the true labels)."""
        if untargeted:
            others = logits.scatter(1, targets[:, None], float("-inf"))
            if loss == "ce":  # -log(1 - p_true), stably
                return torch.logsumexp(logits, 1) - torch.logsumexp(others, 1)
            return (_lead(logits, targets) + self.confidence).clamp_min(0).pow(2)
        if loss == "ce":
            return nn.functional.cross_entropy(logits, targets, reduction="none")
        target_logit = logits.gather(1, targets[:, None])
        excess = (logits - target_logit + self.confidence).clamp_min(0)  # (n, C); the target's own is κ
        return excess.pow(2).sum(1) - self.confidence**2

    def _search(self, head: Head, inputs: torch.Tensor, targets: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                untargeted: bool, loss: str, search_steps: int, solve_iterations: int) -> Proposal:
        """Search every row with ``loss``, ``search_steps`` values of c, ``solve_iterations`` L-BFGS
        iterations each; ``targets`` are the targets, or with ``untargeted`` the
        true labels to leave."""
        reaches = _leaves if untargeted else _reaches
        keeps = _leaves_by_margin if untargeted else _reaches_by_margin  # what may become the best example
        shape, count = inputs.shape, inputs.shape[0]
        origin = inputs.flatten(1)  # (N, D)
        device, dtype = origin.device, origin.dtype
        best = origin.clone()
        best_l2 = torch.full((count,), math.inf, device=device, dtype=dtype)
        best_c = torch.full((count,), math.nan, device=device, dtype=dtype)
        c = torch.full((count,), self._c_init(loss), device=device, dtype=dtype)
        c_success = torch.zeros_like(c)  # largest c that succeeded (0: none yet)
        c_failure = torch.full_like(c, math.inf)  # smallest c that failed
        iterations = torch.zeros(count, dtype=torch.long, device=device)
        scale: torch.Tensor | None = None  # each row's L-BFGS scale, carried from one c to the next

        def objective(x: torch.Tensor, rows: torch.Tensor,
                      with_gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
            with torch.set_grad_enabled(with_gradient):
                x = x.detach().requires_grad_(with_gradient)
                logits = head_for_rows(head, rows)(x.view(-1, *shape[1:]))
                value = c[rows] * (x - origin[rows]).pow(2).sum(1) + self._loss(logits, targets[rows], untargeted, loss)
            if not with_gradient:
                return value, None, logits
            (gradient,) = torch.autograd.grad(value.sum(), x)
            return value.detach(), gradient, logits.detach()

        def on_point(x: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> None:
            l2 = (x - origin[rows]).norm(dim=1)
            better = keeps(logits, targets[rows]) & (l2 < best_l2[rows])
            improved, pick = smallest_per_row(l2.where(better, torch.full_like(l2, math.inf)), rows, count)
            best[improved], best_l2[improved], best_c[improved] = x[pick], l2[pick], c[improved]

        solve = self._solve_torch if self.backend == "torch" else self._solve_scipy
        steps = range(search_steps)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="BoxLBFGS search on c", unit="c", disable=None)  # None: off without a terminal
        for _ in steps:
            start = torch.where(torch.isfinite(best_l2)[:, None], best, origin)
            final, used, scale = solve(objective, on_point, start, lower, upper, scale, solve_iterations)
            iterations += used
            with torch.no_grad():
                reached = reaches(head(final.view(shape)), targets)
            c_success = torch.where(reached, torch.maximum(c_success, c), c_success)
            c_failure = torch.where(reached, c_failure, torch.minimum(c_failure, c))
            c = torch.where(
                torch.isinf(c_failure), c * self.c_growth,
                torch.where(c_success == 0, c / self.c_growth, (c_success * c_failure).sqrt()),
            )
        found = torch.isfinite(best_l2)
        best = self._refine(head, origin, best, targets, found, shape, keeps, lower, upper)
        return Proposal(best.view(shape), found, c=best_c, iterations=iterations)

    @torch.no_grad()
    def _refine(self, head: Head, origin: torch.Tensor, best: torch.Tensor, targets: torch.Tensor,
                found: torch.Tensor, shape: torch.Size,
                keeps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
        """Shrink each success ``x + r`` to ``x + t·r`` with the smallest ``t`` in (0, 1] that still
        ``keeps`` the target (bisection; ``t = 1`` always does): the search keeps only examples that
        reach it by a logit margin of at least ``REFINE_MARGIN``, so that an example stays
        adversarial when evaluated in another batch, whose sums round differently. Each point is
        projected onto the box: ``x + t·r`` rounds past a bound that ``x + r`` touches."""
        perturbation = best - origin

        def point(t: torch.Tensor) -> torch.Tensor:
            return project(origin + t[:, None] * perturbation, lower, upper)

        low = torch.zeros(best.shape[0], device=best.device, dtype=best.dtype)  # fails (or untested)
        high = torch.ones_like(low)  # succeeds
        for _ in range(self.refine_steps):
            middle = (low + high) / 2
            reached = keeps(head(point(middle).view(shape)), targets)
            high = torch.where(reached, middle, high)
            low = torch.where(reached, low, middle)
        return torch.where(found[:, None], point(high), best)

    def _solve_torch(self, objective, on_point, start, lower, upper, scale, iterations):
        return projected_lbfgs(objective, start, lower, upper, iterations=iterations,
                               history=self.history, on_point=on_point, scale=scale)

    def _solve_scipy(self, objective, on_point, start, lower, upper, scale, iterations):
        """scipy's L-BFGS-B, one example at a time, in float64."""
        from scipy.optimize import minimize

        final = start.clone()
        used = torch.zeros(start.shape[0], dtype=torch.long, device=start.device)
        for row in range(start.shape[0]):
            rows = torch.tensor([row], device=start.device)

            def value_and_gradient(z: np.ndarray) -> tuple[float, np.ndarray]:
                x = torch.as_tensor(z, dtype=start.dtype, device=start.device)[None]
                value, gradient, logits = objective(x, rows)
                on_point(x, logits, rows)
                return float(value), gradient[0].double().cpu().numpy()

            box = [(float(lo), float(hi)) for lo, hi in zip(lower[row].double().cpu(), upper[row].double().cpu())]
            box = [(None if math.isinf(lo) else lo, None if math.isinf(hi) else hi) for lo, hi in box]
            solution = minimize(value_and_gradient, start[row].double().cpu().numpy(), jac=True, method="L-BFGS-B",
                                bounds=box, options={"maxiter": iterations, "maxcor": self.history})
            final[row] = project(torch.as_tensor(solution.x, dtype=start.dtype, device=start.device), lower[row], upper[row])
            used[row] = int(solution.nit)
        return final, used, scale

    def _nearest(self, head, inputs, labels, lower, upper, num_classes, loss: str, search_steps: int,
                 iterations: int) -> Proposal:
        """Search every wrong class at once and keep each row's closest success."""
        count, wrong = inputs.shape[0], num_classes - 1
        offsets = torch.arange(1, num_classes, device=labels.device)
        targets = ((labels[:, None] + offsets[None, :]) % num_classes).reshape(-1)  # (N·(C-1),)
        expanded = inputs.repeat_interleave(wrong, dim=0)
        head = head_for_rows(head, torch.arange(count, device=inputs.device).repeat_interleave(wrong))
        found = self._search(head, expanded, targets, lower.repeat_interleave(wrong, 0), upper.repeat_interleave(wrong, 0),
                             False, loss, search_steps, iterations)
        l2 = (found.points - expanded).flatten(1).norm(dim=1).where(found.found, torch.tensor(math.inf, device=inputs.device))
        pick = l2.view(count, wrong).argmin(1) + torch.arange(count, device=labels.device) * wrong
        return Proposal(found.points[pick], found.found[pick], c=found.c[pick], iterations=found.iterations[pick])


def evaluation_search() -> BoxLBFGS:
    """The minimal search the robustness evaluation runs by default: the margin search, then a short
    cross-entropy search (``loss="both"``: the cross-entropy away from the true class weighs every
    other class, where the margin follows the one that leads, and so lands nearer on some
    examples), then 50 steps along the decision boundary (``polish_steps``), then 50 steps of a
    walk from the clean input (``clean_walk_steps``), which reaches another part of the boundary.
    Its effect against Foolbox's minimum-norm attacks is measured in
    ``benchmarks/evaluation_benchmark.py`` and ``benchmarks/search_variants.py``."""
    return BoxLBFGS(loss="both", polish_steps=50, clean_walk_steps=50)


def smallest_per_row(values: torch.Tensor, rows: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For candidates ``values`` ``(n,)`` of the batch rows ``rows`` ``(n,)`` (ids may repeat;
    ``inf``: no candidate), the rows with a finite candidate and, for each, the position of its
    smallest candidate, the first of equals.

    The line search tries several steps of a row in one call, so ``rows`` repeats, and an indexed
    write ``best[rows] = x`` with repeated indices keeps an arbitrary one of them.
    """
    smallest = torch.full((count,), math.inf, device=values.device, dtype=values.dtype)
    smallest = smallest.scatter_reduce(0, rows, values, "amin")
    is_smallest = (values == smallest[rows]) & torch.isfinite(values)
    positions = torch.arange(rows.numel(), device=rows.device)
    first = torch.full((count,), rows.numel(), dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, rows[is_smallest], positions[is_smallest], "amin")
    found = (first < rows.numel()).nonzero()[:, 0]
    return found, first[found]


def _closer(inputs: torch.Tensor, first: Proposal, second: Proposal) -> Proposal:
    """Per row, the proposal with the shorter found perturbation."""
    def l2(proposal: Proposal) -> torch.Tensor:
        size = (proposal.points - inputs).flatten(1).norm(dim=1)
        return torch.where(proposal.found, size, torch.full_like(size, math.inf))

    take = l2(second) < l2(first)
    rows = take.view(-1, *[1] * (inputs.ndim - 1))
    return Proposal(torch.where(rows, second.points, first.points), first.found | second.found,
                    c=torch.where(take, second.c, first.c), iterations=first.iterations + second.iterations)


def _reaches(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rows whose prediction is their target."""
    return logits.argmax(1) == targets


def _leaves(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows whose prediction is not their true label (the untargeted search's success)."""
    return logits.argmax(1) != labels


#: The logit margin past the decision boundary that the search demands of the examples it keeps
#: and its final bisection preserves: float32 logits of the same input differ by rounding between
#: batch sizes, so an example refined to a margin of zero can stop being adversarial when evaluated
#: in a different batch (the test recipes saw it on a CPU).
REFINE_MARGIN = 1e-4


def _lead(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """How far each row's logit of ``classes`` lies above its largest other logit (negative: below)."""
    others = logits.scatter(1, classes[:, None], float("-inf"))
    return logits.gather(1, classes[:, None])[:, 0] - others.amax(1)


def _reaches_by_margin(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Rows whose target logit leads every other by at least ``REFINE_MARGIN``."""
    return _lead(logits, targets) >= REFINE_MARGIN


def _leaves_by_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows where some wrong class leads the true label's logit by at least ``REFINE_MARGIN``."""
    return -_lead(logits, labels) >= REFINE_MARGIN
