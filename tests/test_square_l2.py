"""Square's L2 update, Andriushchenko et al.'s Algorithm 3: the ``η`` pattern, its placement, and a
step that moves the energy of a second window into the first and keeps the perturbation on the sphere."""

from __future__ import annotations

import math

import pytest
import torch

from advtrain.attacks import Square
from advtrain.attacks.square import eta, nested_rectangles, placed


def test_nested_rectangles_weigh_each_ring_by_its_inverse_square_distance() -> None:
    values = nested_rectangles(3, 3)  # centre: 1 + 1/4 (both rectangles), the ring: 1/4 (the outer one)
    assert float(values[1, 1] / values[0, 0]) == pytest.approx(5.0)
    assert float(values[0, 1] / values[0, 0]) == pytest.approx(1.0)
    assert float(nested_rectangles(5, 7).norm()) == pytest.approx(1.0)


@pytest.mark.parametrize("height, width", [(5, 5), (4, 7), (1, 6)])
def test_eta_has_unit_norm_and_opposite_halves(height: int, width: int) -> None:
    pattern = eta(height, width, transpose=False)
    assert pattern.shape == (height, width)
    assert float(pattern.norm()) == pytest.approx(1.0)
    if height > 1:
        assert (pattern[: height // 2] > 0).all() and (pattern[height // 2:] < 0).all()
    sideways = eta(height, width, transpose=True)
    assert sideways.shape == (height, width)
    if width > 1:
        assert (sideways[:, : width // 2] > 0).all() and (sideways[:, width // 2:] < 0).all()


def test_placed_puts_the_patch_at_each_rows_corner_and_zeros_elsewhere() -> None:
    patch = torch.arange(1.0, 7.0).view(2, 3)
    out = placed(patch, torch.tensor([0, 2]), torch.tensor([1, 0]), 4, 5)
    expected = torch.zeros(2, 1, 4, 5)
    expected[0, 0, 0:2, 1:4] = patch
    expected[1, 0, 2:4, 0:3] = patch
    assert torch.equal(out, expected)


def test_a_step_empties_the_second_window_into_the_first_and_stays_on_the_sphere() -> None:
    """Energy only inside two disjoint windows: after the step the second window is empty, the rest
    outside the first is unchanged, and the first holds the two windows' energy plus the unused."""
    torch.manual_seed(0)
    attack = Square(epsilon=2.0, norm="l2")
    radius = 2.0
    generator = torch.Generator().manual_seed(3)
    probe = torch.Generator().manual_seed(3)  # the same draws: where the step's two windows fall
    n, height, width = 4, 12, 12
    share = 9 / (height * width)  # 3 × 3 windows
    first, _, _ = attack._window_at(n, height, width, 3, 3, probe, torch.device("cpu"))
    second, _, _ = attack._window_at(n, height, width, 3, 3, probe, torch.device("cpu"))
    current = torch.randn(n, 1, height, width) * 0.05
    current = radius * 0.9 * current / current.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # 0.19·r² unused
    updated = attack._l2_step(current, radius, share, generator)
    assert updated.flatten(1).norm(dim=1).tolist() == pytest.approx([radius] * n, rel=1e-5)
    apart = ~(first & second).flatten(1).any(1)
    assert apart.any(), "the seed should give rows whose windows do not overlap"
    for row in apart.nonzero()[:, 0].tolist():
        assert float(updated[row][second[row]].abs().max()) == 0.0
        outside = ~(first[row] | second[row])
        energy_windows = float(current[row][first[row] | second[row]].pow(2).sum())
        unused = radius**2 - float(current[row].pow(2).sum())
        before = float(current[row][outside].pow(2).sum()) + energy_windows + unused  # = r² before the rescale
        scale = radius / math.sqrt(before)
        assert torch.allclose(updated[row][outside], current[row][outside] * scale, atol=1e-6)
        assert float(updated[row][first[row]].pow(2).sum()) == pytest.approx((energy_windows + unused) * scale**2, rel=1e-4)


def test_the_l2_attack_stays_inside_the_budget_and_the_box() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    inputs = torch.rand(6, 1, 8, 8)
    labels = model(inputs).argmax(1)
    result = Square(epsilon=0.5, norm="l2", queries=60)(model, inputs, labels, generator=torch.Generator().manual_seed(0))
    perturbation = (result.adversarial - inputs).flatten(1)
    assert (perturbation.norm(dim=1) <= 0.5 + 1e-5).all()
    assert result.adversarial.min() >= 0 and result.adversarial.max() <= 1
