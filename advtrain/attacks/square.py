"""Square: a random search that never reads a gradient, the gradient-free member of AutoAttack
(Andriushchenko et al., 2020), in L∞, L2 and ``sqrt(mean r²)``.

It starts at a perturbation of vertical stripes on the ε-sphere and, one model query per step,
redraws the perturbation inside a random square window, keeping the change only where it lowers
the margin ``z_y − max_{i≠y} z_i`` (targeted: ``max_{i≠t} z_i − z_t``); a row stops once the margin
is negative (misclassified). The window covers ``p`` of the image, ``p`` starting at
``p_init = 0.8`` and halving at fixed shares of the query budget. In L∞ the window gets ``±ε`` per
channel; in L2 a bump of random sign per channel that takes the window's energy plus whatever the
ε-ball leaves unused, so the perturbation stays on or inside the sphere. Because it needs no
gradient, a model whose gradients are zero, infinite or misleading (gradient masking) does not
stop it: when it breaks examples the gradient attacks could not, the gradients are not to be
trusted.

Inputs of any shape are read as images ``(C, H, W)``: a sequence ``(T, F)`` as one channel of
``T × F``, a vector ``(D,)`` as one row of ``D``.

Reference: Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020 (Algorithms 1 to 3). The L2 window update here is
a simplification of the paper's (one window takes the unused energy, rather than moving energy
between two windows).
"""

from __future__ import annotations

import math

import torch

from advtrain.attacks.base import Attack, Proposal
from advtrain.attacks.inputs import CheckedBatch, Head, head_for_rows
from advtrain.attacks.targets import TargetPolicy
from advtrain.budget import Norm, check_epsilon, check_norm, l2_radius
from advtrain.checks import check_count


def window_share(query: int, queries: int, p_init: float) -> float:
    """The share ``p`` of the image a window covers at ``query`` of ``queries``: ``p_init`` halved
    at 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 ten-thousandths of the budget."""
    progress = int(query / queries * 10000)
    halvings = sum(progress > mark for mark in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))
    return p_init / 2**halvings


def margins(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
    """``z_y − max_{i≠y} z_i`` per row (targeted: ``max_{i≠t} z_i − z_t``); negative means fooled."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    anchor = labels if targets is None else targets
    others = logits.scatter(1, anchor[:, None], float("-inf")).amax(1)
    return logits[rows, anchor] - others if targets is None else others - logits[rows, anchor]


def as_image_shape(shape: torch.Size) -> tuple[int, int, int]:
    """``(C, H, W)`` for one example of ``shape`` (batch first)."""
    example = tuple(shape[1:])
    if len(example) == 1:
        return 1, 1, example[0]
    if len(example) == 2:
        return 1, example[0], example[1]
    return math.prod(example[:-2]), example[-2], example[-1]


class Square(Attack):
    """The Square attack: random search over square windows, one query per step.

    Args:
        epsilon: the budget in ``norm`` (:mod:`advtrain.budget`).
        norm: ``"linf"``, ``"l2"`` or ``"rms"``.
        queries: model queries per example (AutoAttack's standard: 5000).
        p_init: the share of the image the first windows cover.
        target: the default target policy (see :class:`~advtrain.attacks.base.Attack`).

    Raises:
        ValueError: a budget that is not positive and finite, an unknown norm, ``queries`` below 1,
            ``p_init`` outside (0, 1], ``target="nearest"``.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> attack = Square(epsilon=0.1, queries=50)
        >>> result = attack(model, torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]), generator=torch.Generator().manual_seed(0))
        >>> bool(((result.attempt - result.adversarial + result.perturbation).abs().amax((1, 2, 3)) <= 0.1 + 1e-6).all())
        True

    Reference: Andriushchenko et al. (2020).
    """

    fixed_budget = True

    def __init__(self, *, epsilon: float, norm: Norm = "linf", queries: int = 5000, p_init: float = 0.8,
                 target: TargetPolicy = "untargeted") -> None:
        epsilon = check_epsilon(epsilon)
        check_norm(norm)
        check_count("queries", queries)
        if not 0 < p_init <= 1:
            raise ValueError(f"p_init must lie in (0, 1], got {p_init!r}")
        super().__init__(target=target)
        self.epsilon = epsilon
        self.norm = norm
        self.queries = queries
        self.p_init = float(p_init)

    def _signs(self, shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        """Random ``±1`` of ``shape``."""
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(like.device, like.dtype)

    def _start(self, origin: torch.Tensor, radius: float, generator: torch.Generator) -> torch.Tensor:
        """Vertical stripes of random sign on the ε-sphere (``origin (n, C, H, W)``)."""
        n, channels, _, width = origin.shape
        stripes = self._signs((n, channels, 1, width), generator, origin).expand_as(origin)
        if self.norm == "linf":
            return self.epsilon * stripes
        return radius * stripes / stripes.flatten(1).norm(dim=1).view(-1, 1, 1, 1)

    def _windows(self, n: int, height: int, width: int, share: float, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, int, int]:
        """A random window per row covering ``share`` of ``height × width``: the mask ``(n, 1, H, W)``
        and its sides."""
        area = max(round(share * height * width), 1)
        side_h = min(height, max(round(math.sqrt(area)), 1))
        side_w = min(width, max(round(area / side_h), 1))
        top = torch.randint(0, height - side_h + 1, (n, 1), generator=generator).to(device)
        left = torch.randint(0, width - side_w + 1, (n, 1), generator=generator).to(device)
        rows = torch.arange(height, device=device)[None]
        cols = torch.arange(width, device=device)[None]
        in_rows = (rows >= top) & (rows < top + side_h)  # (n, H)
        in_cols = (cols >= left) & (cols < left + side_w)  # (n, W)
        return (in_rows[:, None, :, None] & in_cols[:, None, None, :]), side_h, side_w

    def _bump(self, height: int, width: int, side_h: int, side_w: int, like: torch.Tensor) -> torch.Tensor:
        """A smooth bump ``(H, W)`` on a window's grid (peaked at its centre), to be masked."""

        def profile(size: int, side: int) -> torch.Tensor:
            position = torch.arange(size, device=like.device, dtype=like.dtype)
            return torch.exp(-0.5 * ((position % side - (side - 1) / 2) / max(side / 3, 0.5)) ** 2)

        return profile(height, side_h)[:, None] * profile(width, side_w)[None, :]

    def propose(self, model: Head, batch: CheckedBatch, targets: torch.Tensor | None, policy: TargetPolicy | torch.Tensor,
                generator: torch.Generator) -> Proposal:
        """Up to ``queries`` queries per row; rows stop once fooled."""
        shape = batch.inputs.shape
        image = (shape[0], *as_image_shape(shape))
        origin = batch.inputs.reshape(image)
        lower, upper = batch.lower.view(image), batch.upper.view(image)
        radius = l2_radius(self.epsilon, self.norm, origin[0].numel())

        def clipped(delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return torch.minimum(torch.maximum(origin[rows] + delta, lower[rows]), upper[rows]) - origin[rows]

        def query(delta: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            head = head_for_rows(model, rows)
            return margins(head((origin[rows] + delta).view(-1, *shape[1:])), batch.labels[rows],
                           None if targets is None else targets[rows])

        every = torch.arange(shape[0], device=origin.device)
        delta = clipped(self._start(origin, radius, generator), every)
        with torch.no_grad():
            margin = query(delta, every)
        used = torch.ones(shape[0], dtype=torch.long, device=origin.device)
        _, channels, height, width = image
        for step in range(1, self.queries):
            rows = (margin >= 0).nonzero()[:, 0]
            if not rows.numel():
                break
            window, side_h, side_w = self._windows(len(rows), height, width, window_share(step, self.queries, self.p_init),
                                                   generator, origin.device)
            current = delta[rows]
            signs = self._signs((len(rows), channels, 1, 1), generator, origin)
            if self.norm == "linf":
                fresh = self.epsilon * signs
            else:
                energy = (current * window).flatten(1).pow(2).sum(1) + (radius**2 - current.flatten(1).pow(2).sum(1)).clamp_min(0)
                bump = self._bump(height, width, side_h, side_w, origin) * window * signs
                fresh = bump * (energy.sqrt() / bump.flatten(1).norm(dim=1).clamp_min(1e-12)).view(-1, 1, 1, 1)
            candidate = clipped(torch.where(window, fresh, current), rows)
            with torch.no_grad():
                candidate_margin = query(candidate, rows)
            better = candidate_margin < margin[rows]
            delta[rows[better]] = candidate[better]
            margin[rows] = torch.where(better, candidate_margin, margin[rows])
            used[rows] += 1
        points = (origin + delta).view(shape)
        return Proposal(points, torch.ones(shape[0], dtype=torch.bool, device=origin.device), iterations=used)


__all__ = ["Square", "as_image_shape", "margins", "window_share"]
