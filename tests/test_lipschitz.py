"""Per-layer Lipschitz bounds: checked against power iteration on the layers themselves."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advtrain.analysis import ContrastNormalization, lipschitz_bounds, register_bound
from advtrain.analysis.lipschitz import MODULE_BOUNDS, module_bound
from advtrain.analysis.operator_norms import circular_conv_norm, conv2d_norm, matrix_norm


def power_iteration_norm(linear_map, input_shape: tuple[int, ...], steps: int = 3000, seed: int = 0) -> float:
    """The operator norm of a linear map by power iteration on its normal operator (a lower bound that converges)."""
    x = torch.randn((1, *input_shape), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        x = x / x.norm()
        x = x.detach().requires_grad_(True)
        y = linear_map(x)
        (x,) = torch.autograd.grad(y, x, y)  # Aᵀ A x
    x = x / x.norm()
    with torch.no_grad():
        return float(linear_map(x).norm())


def random_conv(in_channels: int, out_channels: int, kernel: int, stride: int, padding: int, padding_mode: str,
                dilation: int = 1, groups: int = 1, seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, padding_mode=padding_mode, bias=False).double()


CONV_CASES = [
    pytest.param(dict(in_channels=2, out_channels=3, kernel=3, stride=1, padding=1), 8, id="3x3-stride1"),
    pytest.param(dict(in_channels=3, out_channels=2, kernel=3, stride=2, padding=1), 8, id="3x3-stride2"),
    pytest.param(dict(in_channels=2, out_channels=4, kernel=5, stride=2, padding=2), 12, id="5x5-stride2"),
    pytest.param(dict(in_channels=1, out_channels=5, kernel=3, stride=4, padding=1), 8, id="3x3-stride4"),
    pytest.param(dict(in_channels=4, out_channels=4, kernel=3, stride=1, padding=2, dilation=2, groups=2), 8,
                 id="dilated-grouped"),
]


@pytest.mark.parametrize("settings, size", CONV_CASES)
def test_conv_bound_is_exact_for_circular_convolution(settings: dict, size: int) -> None:
    conv = random_conv(**settings, padding_mode="circular")
    bound, note = conv2d_norm(conv.weight, (size, size), conv.stride, conv.padding, conv.dilation, conv.groups,
                              conv.padding_mode)
    reference = power_iteration_norm(conv, (settings["in_channels"], size, size))
    assert note == "exact (circular)"
    assert bound == pytest.approx(reference, rel=1e-3)
    assert reference <= bound * (1 + 1e-9)


@pytest.mark.parametrize("settings, size", CONV_CASES)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate"])
def test_conv_bound_holds_with_other_padding(settings: dict, size: int, padding_mode: str) -> None:
    conv = random_conv(**settings, padding_mode=padding_mode, seed=1)
    bound, _ = conv2d_norm(conv.weight, (size, size), conv.stride, conv.padding, conv.dilation, conv.groups,
                           conv.padding_mode)
    reference = power_iteration_norm(conv, (settings["in_channels"], size, size), steps=500)
    assert reference <= bound * (1 + 1e-9)
    assert reference > 0.3 * bound  # a bound, but not a vacuous one


def test_circular_norm_of_identity_kernel_is_one_and_stride_keeps_it_at_most_one() -> None:
    identity = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    identity[0, 0, 1, 1] = 1.0
    assert circular_conv_norm(identity, (8, 8), (1, 1)) == pytest.approx(1.0)
    assert circular_conv_norm(identity, (8, 8), (2, 2)) == pytest.approx(1.0)  # subsampling an identity: norm 1
    with pytest.raises(ValueError, match="must divide the grid"):
        circular_conv_norm(identity, (9, 9), (2, 2))


def test_linear_bound_is_the_largest_singular_value() -> None:
    weight = torch.randn(30, 50, generator=torch.Generator().manual_seed(0))
    assert matrix_norm(weight) == pytest.approx(float(torch.linalg.matrix_norm(weight.double(), ord=2)), rel=1e-9)
    assert matrix_norm(weight.T) == pytest.approx(matrix_norm(weight), rel=1e-9)
    with pytest.raises(ValueError, match="2-D weight"):
        matrix_norm(torch.ones(3))


@pytest.mark.parametrize("pool, expected", [
    pytest.param(nn.MaxPool2d(2), 1.0, id="max-2x2-disjoint"),
    pytest.param(nn.MaxPool2d(3, stride=2), 2.0, id="max-3x3-stride2"),
    pytest.param(nn.AvgPool2d(2), 0.5, id="avg-2x2-disjoint"),
    pytest.param(nn.AdaptiveAvgPool2d(1), 1 / 6, id="adaptive-avg-to-1"),
])
def test_pooling_bounds(pool: nn.Module, expected: float) -> None:
    row = module_bound("pool", pool, (2, 6, 6), tuple(pool(torch.zeros(1, 2, 6, 6)).shape[1:]))
    assert row.bound == pytest.approx(expected)


def test_overlapping_max_pool_bound_is_reached() -> None:
    """A spike shared by four 3×3 windows moves four outputs: the bound 2 is tight."""
    pool = nn.MaxPool2d(3, stride=2)
    spike = torch.zeros(1, 1, 7, 7)
    spike[0, 0, 2, 2] = 1.0
    assert float(pool(spike).norm()) == pytest.approx(2.0)


def test_average_pool_bound_covers_power_iteration() -> None:
    pool = nn.AvgPool2d(3, stride=2, padding=1)
    row = module_bound("pool", pool, (1, 9, 9), (1, 5, 5))
    assert power_iteration_norm(pool, (1, 9, 9), steps=300) <= row.bound * (1 + 1e-9)


def jacobian_norm(layer: nn.Module, x: torch.Tensor) -> float:
    jacobian = torch.autograd.functional.jacobian(layer, x).reshape(x.numel(), x.numel())
    return float(torch.linalg.matrix_norm(jacobian, ord=2))


@pytest.mark.parametrize("layer, shape", [
    pytest.param(ContrastNormalization(eps=0.5, gamma=0.75), (1, 12), id="contrast-normalisation"),
    pytest.param(nn.LocalResponseNorm(size=5, alpha=1.0, beta=0.75, k=2.0), (1, 8, 2, 2), id="local-response-norm"),
    pytest.param(nn.Sigmoid(), (1, 10), id="sigmoid"),
    pytest.param(nn.GELU(), (1, 10), id="gelu"),
    pytest.param(nn.SiLU(), (1, 10), id="silu"),
])
def test_nonlinear_bounds_cover_the_jacobian_at_random_points(layer: nn.Module, shape: tuple[int, ...]) -> None:
    row = module_bound("layer", layer, shape[1:], shape[1:])
    generator = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 3.0):
        for _ in range(20):
            x = scale * torch.randn(shape, dtype=torch.float64, generator=generator)
            assert jacobian_norm(layer, x) <= row.bound * (1 + 1e-9)


def test_contrast_normalisation_bound_is_reached_at_zero() -> None:
    layer = ContrastNormalization(eps=0.25, gamma=0.5)
    assert jacobian_norm(layer, torch.zeros(1, 6, dtype=torch.float64)) == pytest.approx(module_bound(
        "cn", layer, (6,), (6,)).bound)
    with pytest.raises(ValueError, match="gamma must be in"):
        ContrastNormalization(gamma=1.5)


def test_batch_norm_bound_uses_running_statistics() -> None:
    norm = nn.BatchNorm1d(3)
    norm.running_var = torch.tensor([4.0, 1.0, 0.25])
    norm.weight.data = torch.tensor([1.0, -1.0, 1.0])
    assert module_bound("bn", norm, (3,), (3,)).bound == pytest.approx(1 / math.sqrt(0.25 + norm.eps))


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.pool(self.conv(x))), 1))


def test_table_rows_product_and_network_bound() -> None:
    torch.manual_seed(0)
    model = TinyConvNet().double()
    table = lipschitz_bounds(model, (1, 8, 8))
    assert [row.kind for row in table.rows] == ["Conv2d", "MaxPool2d", "relu", "flatten", "Linear"]
    assert table.traced_with == "torch.fx"
    assert table.product == pytest.approx(math.prod(row.bound for row in table.rows))
    assert table.network_bound == pytest.approx(table.product)  # a chain
    assert table.rows[0].input_size == (1, 8, 8) and table.rows[4].input_size == (64,)
    assert "| conv | Conv2d | 1×3×3×4 | 1×1 | 1×8×8 |" in table.markdown()
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        x, r = torch.randn(2, 1, 1, 8, 8, dtype=torch.float64, generator=generator)
        ratio = float((model(x + r) - model(x)).norm() / r.norm())
        assert ratio <= table.product
    assert table.to_dict()["rows"][0]["size"] == "1×3×3×4"


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.odd = nn.Bilinear(4, 4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.fc(x) + x) * x


def test_unknown_steps_are_unbounded_rows_named_never_skipped() -> None:
    table = lipschitz_bounds(Residual(), (4,))
    by_kind = {row.kind: row for row in table.rows}
    assert by_kind["add"].bound == 1.0 and "sum of 2 branches" in by_kind["add"].note
    assert by_kind["add"].from_input == pytest.approx(by_kind["Linear"].bound + 1.0)
    assert math.isinf(by_kind["exp"].bound) and "exp" in by_kind["exp"].note
    assert math.isinf(by_kind["mul"].bound) and "combines 2 tensors by mul: no rule bounds it" in by_kind["mul"].note
    assert math.isinf(table.network_bound)
    assert "Unbounded rows: exp (exp), mul (mul)" in table.notes[-1]
    row = module_bound("odd", nn.Bilinear(4, 4, 4), (4,), (4,))
    assert math.isinf(row.bound) and "Bilinear" in row.note


class LinearResidualBlock(nn.Module):
    """``x + conv2(conv1(x))``: linear, so power iteration finds its exact norm."""

    def __init__(self, relu: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(x)
        return x + self.conv2(torch.relu(hidden) if self.relu else hidden)


def power_iteration(model: nn.Module, x: torch.Tensor, steps: int = 200) -> float:
    """The norm of ``model``'s Jacobian at ``x`` (for a linear model: its operator norm) by power
    iteration on ``JᵀJ``: a lower bound on the Lipschitz constant."""
    v = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        v = v / v.norm()
        _, jv = torch.autograd.functional.jvp(model, x, v)
        _, v = torch.autograd.functional.vjp(model, x, jv)
    v = v / v.norm()
    return float(torch.autograd.functional.jvp(model, x, v)[1].norm())


def test_residual_block_bound_sums_the_branches_and_holds_against_power_iteration() -> None:
    torch.manual_seed(0)
    block = LinearResidualBlock().double()
    table = lipschitz_bounds(block, (3, 6, 6))
    conv1, conv2 = (row.bound for row in table.rows if row.kind == "Conv2d")
    assert table.network_bound == pytest.approx(1.0 + conv1 * conv2)
    exact = power_iteration(block, torch.zeros(1, 3, 6, 6, dtype=torch.float64))
    assert exact <= table.network_bound * (1 + 1e-9)
    assert table.network_bound <= 2.5 * exact  # the sum of the branches is not loose here
    nonlinear = LinearResidualBlock(relu=True).double()
    nonlinear.load_state_dict(block.state_dict())
    bound = lipschitz_bounds(nonlinear, (3, 6, 6)).network_bound
    assert bound == pytest.approx(table.network_bound)
    for seed in range(5):
        x = torch.randn(1, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert power_iteration(nonlinear, x, steps=50) <= bound * (1 + 1e-9)


def test_resnet18_gets_a_finite_network_bound() -> None:
    import torchvision

    torch.manual_seed(0)
    table = lipschitz_bounds(torchvision.models.resnet18(weights=None, num_classes=10), (3, 32, 32))
    assert table.unbounded == [] and math.isfinite(table.network_bound)
    adds = [row for row in table.rows if row.kind == "add"]
    assert len(adds) == 8  # one per BasicBlock
    assert table.network_bound < table.product  # sums, not products, where the skip meets the block


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # torch.fx cannot trace this
            x = -x
        return self.act(self.fc(x))


def test_untraceable_model_falls_back_to_hooks_and_says_so() -> None:
    table = lipschitz_bounds(DataDependent(), (4,))
    assert table.traced_with == "module hooks"
    assert [row.kind for row in table.rows] == ["Linear", "Tanh"]
    assert "operations written as functions in forward are not in this table" in table.notes[0]


def test_register_bound_for_a_custom_module() -> None:
    class Halve(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / 2

    register_bound(Halve)(lambda module, input_shape, output_shape: (0.5, "halves"))
    try:
        table = lipschitz_bounds(nn.Sequential(nn.Linear(3, 3), Halve()), (3,))
        assert table.rows[-1].bound == 0.5 and table.rows[-1].note == "halves"
    finally:
        MODULE_BOUNDS.pop(Halve)


def test_bad_input_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="does not take inputs of shape"):
        lipschitz_bounds(nn.Sequential(nn.Linear(3, 3)), (5,))
    with pytest.raises(ValueError, match="input_shape must be one example's positive sizes"):
        lipschitz_bounds(nn.Sequential(nn.Linear(3, 3)), (0,))


def test_model_mode_is_restored() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    model.train()
    lipschitz_bounds(model, (3,))
    assert model.training
