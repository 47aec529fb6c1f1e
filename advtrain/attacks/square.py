"""Square: a random search that never reads a gradient, the gradient-free member of AutoAttack
(Andriushchenko et al., 2020), in L∞, L2 and ``sqrt(mean r²)``.

One model query per step, it redraws the perturbation inside a random square window, keeping the
change only where it lowers the margin ``z_y − max_{i≠y} z_i`` (targeted: ``max_{i≠t} z_i − z_t``);
a row stops once the margin is negative (misclassified). The window covers ``p`` of the image, ``p``
starting at ``p_init = 0.8`` and halving at fixed shares of the query budget. In L∞ it starts from
vertical stripes of ``±ε`` and the window gets ``±ε`` per channel. In L2 (and
``sqrt(mean r²)``), Andriushchenko et al.'s update (their Algorithm 3): it starts from a grid of
blocks of ``η`` (a pair of opposite-signed nested rectangles, random sign per channel) on the
ε-sphere, and each step draws two windows, empties the second and gives the first its old content
(normalised) plus a fresh ``η`` of random sign, with the energy of both windows and whatever the
ε-ball leaves unused; the perturbation is then scaled back onto the sphere. Because it needs no
gradient, a model whose gradients are zero, infinite or misleading (gradient masking) does not
stop it: when it breaks examples the gradient attacks could not, the gradients are not to be
trusted.

Inputs of any shape are read as images ``(C, H, W)``: a sequence ``(T, F)`` as one channel of
``T × F``, a vector ``(D,)`` as one row of ``D``.

Reference: Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020 (Algorithms 1 to 3).
"""

from __future__ import annotations

import math

import torch

from advtrain.attacks.base import Attack, Proposal
from advtrain.attacks.inputs import CheckedBatch, Head, head_for_rows
from advtrain.attacks.targets import TargetPolicy
from advtrain.budget import Norm, check_epsilon, check_norm, l2_radius
from advtrain.checks import check_count

#: The L2 proposal this Square draws: ``"two-window"``, Andriushchenko et al.'s Algorithm 3. Results
#: record it (:class:`~advtrain.robustness.Ensemble`); an earlier form drew one window per step and
#: broke far less in L2, and its results lack the record.
L2_PROPOSAL = "two-window"


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


def nested_rectangles(height: int, width: int) -> torch.Tensor:
    """``(height, width)`` nested rectangles around the centre, the ``k``-th from the centre weighted
    ``1/k²``, with unit L2 norm (Andriushchenko et al.'s ``M``)."""
    values = torch.zeros(height, width)
    row, col = height // 2, width // 2  # the centre's top-left, as the paper's code places it
    for ring in range(max(height // 2 + 1, width // 2 + 1)):
        values[max(row - ring, 0):min(row - ring + 2 * ring + 1, height),
               max(col - ring, 0):min(col - ring + 2 * ring + 1, width)] += 1.0 / (ring + 1) ** 2
    return values / values.norm()


def eta(height: int, width: int, transpose: bool) -> torch.Tensor:
    """The paper's ``η``: nested rectangles on the top half and their negative on the bottom half
    (with ``transpose``, on the left and right halves), unit L2 norm, ``(height, width)``."""
    if transpose:
        return eta(width, height, False).T.contiguous()
    values = torch.cat([nested_rectangles(height // 2, width), -nested_rectangles(height - height // 2, width)]) \
        if height > 1 else -nested_rectangles(1, width)
    return values / values.norm()


def placed(patch: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(n, 1, height, width)``: ``patch (h, w)`` with its top-left corner at ``(top[i], left[i])``
    in row ``i``, zero elsewhere (the patch must fit)."""
    patch_h, patch_w = patch.shape
    rows = torch.arange(height, device=patch.device)[None] - top[:, None]  # (n, H): row inside the patch
    cols = torch.arange(width, device=patch.device)[None] - left[:, None]
    inside = ((rows >= 0) & (rows < patch_h))[:, :, None] & ((cols >= 0) & (cols < patch_w))[:, None, :]
    index = rows.clamp(0, patch_h - 1)[:, :, None] * patch_w + cols.clamp(0, patch_w - 1)[:, None, :]
    return torch.where(inside, patch.flatten()[index], torch.zeros((), dtype=patch.dtype, device=patch.device))[:, None]


def on_sphere(values: torch.Tensor, radius: float) -> torch.Tensor:
    """``values (n, ...)`` scaled, row by row, to L2 norm ``radius``."""
    return radius * values / values.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *(1,) * (values.dim() - 1))


def unit_per_channel(values: torch.Tensor) -> torch.Tensor:
    """``values (n, C, H, W)`` scaled to unit L2 norm per row and channel (zero stays zero)."""
    return values / values.pow(2).sum((2, 3), keepdim=True).sqrt().add(1e-12)


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
        """In L∞, vertical stripes of random sign; in L2, a grid of blocks of ``η`` of random sign per
        block and channel (stripes where the image is under 5 pixels high or wide); on the ε-sphere
        (``origin (n, C, H, W)``)."""
        n, channels, height, width = origin.shape
        block = min(height, width) // 5
        if self.norm == "linf" or block < 1:
            stripes = self._signs((n, channels, 1, width), generator, origin).expand_as(origin)
            return self.epsilon * stripes if self.norm == "linf" else on_sphere(stripes, radius)
        start = torch.zeros_like(origin)
        pattern = eta(block, block, False).to(origin)
        top0, left0 = (height - block * (height // block)) // 2, (width - block * (width // block)) // 2
        for top in range(top0, height - block + 1, block):
            for left in range(left0, width - block + 1, block):
                start[:, :, top:top + block, left:left + block] = pattern * self._signs((n, channels, 1, 1), generator, origin)
        return on_sphere(start, radius)

    def _l2_step(self, current: torch.Tensor, radius: float, share: float, generator: torch.Generator) -> torch.Tensor:
        """Andriushchenko et al.'s L2 update of ``current (n, C, H, W)``: the second of two random
        windows emptied, the first given its old content (normalised per channel) plus a fresh ``η``
        of random sign per channel, scaled to the energy of both windows and what the ball leaves
        unused; the whole scaled back onto the sphere of ``radius``."""
        n, channels, height, width = current.shape
        side = max(round(math.sqrt(share * height * width)), 3)
        side += 1 - side % 2  # odd, as the paper's
        side_h, side_w = min(side, height), min(side, width)
        first, top, left = self._window_at(n, height, width, side_h, side_w, generator, current.device)
        second, _, _ = self._window_at(n, height, width, side_h, side_w, generator, current.device)
        transpose = bool(torch.randint(0, 2, (1,), generator=generator))
        pattern = placed(eta(side_h, side_w, transpose).to(current), top, left, height, width)
        old = current * first
        fresh = pattern * self._signs((n, channels, 1, 1), generator, current) + unit_per_channel(old)
        unused = (radius**2 - current.flatten(1).pow(2).sum(1)).clamp_min(0).view(-1, 1, 1, 1)
        windows = (current * (first | second)).flatten(1).pow(2).sum(1).view(-1, 1, 1, 1)
        fresh = unit_per_channel(fresh) * (unused / channels + windows).sqrt()
        updated = torch.where(first, fresh, torch.where(second, torch.zeros_like(current), current))
        return on_sphere(updated, radius)

    def _window_at(self, n: int, height: int, width: int, side_h: int, side_w: int, generator: torch.Generator,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A random ``side_h × side_w`` window per row: its mask ``(n, 1, H, W)``, top and left ``(n,)``."""
        top = torch.randint(0, height - side_h + 1, (n,), generator=generator).to(device)
        left = torch.randint(0, width - side_w + 1, (n,), generator=generator).to(device)
        rows = torch.arange(height, device=device)[None]
        cols = torch.arange(width, device=device)[None]
        in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side_h)
        in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side_w)
        return in_rows[:, None, :, None] & in_cols[:, None, None, :], top, left

    def _windows(self, n: int, height: int, width: int, share: float, generator: torch.Generator,
                 device: torch.device) -> tuple[torch.Tensor, int, int]:
        """A random window per row covering ``share`` of ``height × width``: the mask ``(n, 1, H, W)``
        and its sides."""
        area = max(round(share * height * width), 1)
        side_h = min(height, max(round(math.sqrt(area)), 1))
        side_w = min(width, max(round(area / side_h), 1))
        mask, _, _ = self._window_at(n, height, width, side_h, side_w, generator, device)
        return mask, side_h, side_w

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
            share = window_share(step, self.queries, self.p_init)
            current = delta[rows]
            if self.norm == "linf":
                window, _, _ = self._windows(len(rows), height, width, share, generator, origin.device)
                signs = self._signs((len(rows), channels, 1, 1), generator, origin)
                candidate = clipped(torch.where(window, self.epsilon * signs, current), rows)
            else:
                candidate = clipped(self._l2_step(current, radius, share, generator), rows)
            with torch.no_grad():
                candidate_margin = query(candidate, rows)
            better = candidate_margin < margin[rows]
            delta[rows[better]] = candidate[better]
            margin[rows] = torch.where(better, candidate_margin, margin[rows])
            used[rows] += 1
        points = (origin + delta).view(shape)
        return Proposal(points, torch.ones(shape[0], dtype=torch.bool, device=origin.device), iterations=used)


__all__ = ["Square", "as_image_shape", "eta", "margins", "nested_rectangles", "placed", "window_share"]
