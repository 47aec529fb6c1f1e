"""The FAB variants benchmark (benchmarks/fab_variants.py): its plane steps leave negligible gradient
coordinates unmoved where the boundary is out of the box's reach, and FAB gets its shipped step back."""

from __future__ import annotations

import pytest
import torch
from script_modules import REPO, load_script

import advtrain.attacks.fab as fab_module


def load_variants(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the script imports evaluation_benchmark
    return load_script("benchmarks/fab_variants.py", "fab_variants")


def unreachable_plane() -> tuple[torch.Tensor, ...]:
    """One row at the box's lower corner, a normal with two real and two negligible entries, and a
    level the box cannot reach: every coordinate the step moves goes to its bound."""
    points = torch.zeros(1, 4)
    normal = torch.tensor([[1.0, 0.5, 1e-10, 1e-12]])
    return points, torch.zeros(1, 4), torch.ones(1, 4), normal, torch.tensor([10.0])


def test_negligible_coordinates_stay_where_the_shipped_step_moves_them_to_the_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    variants = load_variants(monkeypatch)
    points, lower, upper, normal, level = unreachable_plane()
    shipped = fab_module.plane_step(points, lower, upper, normal, level, "l2")
    assert shipped.tolist() == [[1.0, 1.0, 1.0, 1.0]]  # the corner: what costs FAB a large L2 step
    absolute = variants.negligible_left(1e-8, relative=False)(points, lower, upper, normal, level, "l2")
    assert absolute.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    relative = variants.negligible_left(1e-8, relative=True)(points, lower, upper, normal, level, "l2")
    assert relative.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_the_relative_rule_is_blind_to_the_gradients_scale_and_the_absolute_rule_is_not(monkeypatch: pytest.MonkeyPatch) -> None:
    variants = load_variants(monkeypatch)
    points, lower, upper, normal, level = unreachable_plane()
    tiny, tiny_level = normal * 1e-9, level * 1e-9  # the same plane, its gradient scaled down (a masked model)
    relative = variants.negligible_left(1e-8, relative=True)(points, lower, upper, tiny, tiny_level, "l2")
    assert relative.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    absolute = variants.negligible_left(1e-8, relative=False)(points, lower, upper, tiny, tiny_level, "l2")
    assert absolute.tolist() == [[0.0, 0.0, 0.0, 0.0]]  # every coordinate below 1e-8: FAB would stand still


def test_fab_gets_its_shipped_plane_step_back_even_when_the_block_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    variants = load_variants(monkeypatch)
    shipped = fab_module.plane_step
    replacement = variants.negligible_left(1e-8, relative=False)
    with pytest.raises(RuntimeError), variants.plane_step_replaced(replacement):
        assert fab_module.plane_step is replacement
        raise RuntimeError("an attack failed")
    assert fab_module.plane_step is shipped


def test_the_negligible_share_counts_the_coordinates_a_model_ignores(monkeypatch: pytest.MonkeyPatch) -> None:
    variants = load_variants(monkeypatch)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
        model[1].bias.zero_()
    images, labels = torch.rand(5, 1, 2, 2), torch.zeros(5, dtype=torch.long)
    assert variants.negligible_share(model, images, labels) == pytest.approx(0.5)  # the last two pixels: no weight at all
