"""Operator norms of the linear maps inside networks: matrices, convolutions, pooling windows.

The convolution bound is the paper's Section 4.3 construction. By Parseval, a circular
convolution with ``C`` input maps and ``D`` output maps is block-diagonal in the Fourier basis:
at each frequency ξ it multiplies the ``C`` input coefficients by the ``D × C`` matrix of the
kernel's Fourier coefficients. Keeping every ``Δ``-th output (stride ``Δ``) folds the ``Δ²``
frequencies ``ξ + a·n/Δ`` onto one, so the strided map is block-diagonal with ``D × (C·Δ²)``
blocks ``A(ξ) = [W(ξ + a·n/Δ)]_a / Δ``; its norm is the largest singular value over all blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Gram matrices larger than this on a side are formed in float32 (AlexNet's 4096-wide FC layers:
#: float64 costs twice the time for a relative change below 1e-5); smaller ones in float64.
FLOAT64_GRAM_SIDE = 2048
#: Convolution spectra with more entries than this are computed in complex64.
FLOAT64_SPECTRUM_LIMIT = 32_000_000


def matrix_norm(weight: torch.Tensor) -> float:
    """The largest singular value of a matrix (``weight`` of shape ``(out, in)``), to float32 rounding
    (relative 1e-5) for matrices wider than FLOAT64_GRAM_SIDE on both sides, else float64.

    Computed as the square root of the largest eigenvalue of the smaller Gram matrix, which is
    exact and many times faster than a full SVD for the large fully connected layers of AlexNet.
    """
    if weight.dim() != 2:
        raise ValueError(f"matrix_norm expects a 2-D weight (out, in), got shape {tuple(weight.shape)}")
    dtype = torch.float64 if min(weight.shape) <= FLOAT64_GRAM_SIDE else torch.float32
    w = weight.detach().to(dtype)
    return math.sqrt(largest_gram_eigenvalue(w.unsqueeze(0)))


def dense_kernel(weight: torch.Tensor, groups: int, dilation: tuple[int, int]) -> torch.Tensor:
    """A grouped, dilated 2-D kernel ``(D, C/groups, kh, kw)`` as the equivalent dense,
    undilated one ``(D, C, (kh-1)·dh+1, (kw-1)·dw+1)`` (zeros between taps and across groups)."""
    out_channels, group_in, kh, kw = weight.shape
    dh, dw = dilation
    dense = weight.new_zeros(out_channels, group_in * groups, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
    group_out = out_channels // groups
    for g in range(groups):
        rows = slice(g * group_out, (g + 1) * group_out)
        dense[rows, g * group_in:(g + 1) * group_in, ::dh, ::dw] = weight[rows]
    return dense


def circular_conv_norm(kernel: torch.Tensor, grid: tuple[int, int], stride: tuple[int, int]) -> float:
    """The operator norm of the circular convolution (cross-correlation) of ``kernel``
    ``(D, C, kh, kw)`` on an ``grid = (n_h, n_w)`` torus, keeping every ``stride``-th output.

    Each stride must divide its grid size. Kernels larger than the grid wrap around (their taps
    are summed modulo the grid), as a circular convolution does.
    """
    (n_h, n_w), (s_h, s_w) = grid, stride
    if n_h % s_h or n_w % s_w:
        raise ValueError(f"stride {stride} must divide the grid {grid}")
    out_channels, in_channels, kh, kw = kernel.shape
    dtype = torch.float64 if kernel.numel() * n_h * n_w <= FLOAT64_SPECTRUM_LIMIT else torch.float32
    rows = (torch.arange(kh) % n_h).view(kh, 1)
    cols = (torch.arange(kw) % n_w).view(1, kw)
    flat_index = (rows * n_w + cols).reshape(-1).to(kernel.device)
    placed = kernel.detach().to(dtype).new_zeros(out_channels, in_channels, n_h * n_w)
    placed.index_add_(2, flat_index, kernel.detach().to(dtype).reshape(out_channels, in_channels, -1))
    spectrum = torch.fft.fft2(placed.view(out_channels, in_channels, n_h, n_w))  # (D, C, n_h, n_w)
    # frequency ξ_h = η_h + a·(n_h/s_h): split each frequency axis into (alias a, base η)
    spectrum = spectrum.view(out_channels, in_channels, s_h, n_h // s_h, s_w, n_w // s_w)
    blocks = spectrum.permute(3, 5, 0, 1, 2, 4).reshape(-1, out_channels, in_channels * s_h * s_w)
    return math.sqrt(largest_gram_eigenvalue(blocks)) / math.sqrt(s_h * s_w)


def largest_gram_eigenvalue(blocks: torch.Tensor) -> float:
    """``max_i σ_max(blocks[i])²`` for a batch of matrices ``(B, m, n)``, from the eigenvalues of the
    smaller Gram matrices (far faster than batched SVD on CPU, and exact)."""
    gram = blocks @ blocks.mH if blocks.shape[1] <= blocks.shape[2] else blocks.mH @ blocks
    return max(float(torch.linalg.eigvalsh(gram)[..., -1].max()), 0.0)


def padding_amounts(padding: str | tuple[int, ...], kernel_extent: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` padding per spatial axis for a conv's ``padding`` setting."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        return tuple((((k - 1) // 2), (k - 1) - (k - 1) // 2) for k in kernel_extent)
    return tuple((int(p), int(p)) for p in padding)


def padding_copies(size: int, before: int, after: int, mode: str) -> int:
    """The most times one input position appears in a 1-D signal padded by ``mode``
    (``zeros``: 1; ``reflect`` and ``replicate`` copy edge positions)."""
    if mode == "zeros" or before == after == 0:
        return 1
    index = torch.arange(size, dtype=torch.float64).view(1, 1, size)
    padded = F.pad(index, (before, after), mode=mode).long().view(-1)
    return int(torch.bincount(padded, minlength=size).max())


def conv2d_norm(
    weight: torch.Tensor,
    input_size: tuple[int, int],
    stride: tuple[int, int],
    padding: str | tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    padding_mode: str = "zeros",
) -> tuple[float, str]:
    """An upper bound on the operator norm of ``nn.Conv2d``'s linear part at ``input_size``.

    With ``padding_mode="circular"``, a kernel of extent ``2·padding + 1`` and strides dividing
    the input size, the layer *is* the strided circular convolution on the input's torus and the
    bound is exact. With zero padding the layer is a restriction of the circular convolution on
    a torus of at least the padded size (the input embedded with zeros, some outputs dropped),
    and restricting never increases a norm, so the circular norm is an upper bound; reflect and
    replicate padding copy edge pixels, which multiplies the bound by ``sqrt`` of the most copies.

    Returns:
        the bound and a note saying when it is exact or how it was loosened.
    """
    kernel = dense_kernel(weight, groups, dilation)
    extent = (kernel.shape[2], kernel.shape[3])
    pads = padding_amounts(padding, extent)
    if padding_mode == "circular":
        if all(n % s == 0 for n, s in zip(input_size, stride)):
            exact = all(b + a == k - 1 for (b, a), k in zip(pads, extent))
            note = "exact (circular)" if exact else "circular, output cropped: upper bound"
            return circular_conv_norm(kernel, input_size, stride), note
        return circular_conv_norm(kernel, input_size, (1, 1)), "circular, stride does not divide the input: stride-1 bound"
    grid = tuple(math.ceil((n + b + a) / s) * s for n, (b, a), s in zip(input_size, pads, stride))
    bound = circular_conv_norm(kernel, grid, stride)
    copies = math.prod(padding_copies(n, b, a, padding_mode) for n, (b, a) in zip(input_size, pads))
    note = f"upper bound ({padding_mode} padding, {grid[0]}×{grid[1]} torus)"
    return bound * math.sqrt(copies), note


def windows_per_position(size: int, out_size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    """The most pooling windows (of ``out_size`` along one axis) that share one input position."""
    counts = [0] * size
    for o in range(out_size):
        for j in range(kernel):
            i = o * stride - padding + j * dilation
            if 0 <= i < size:
                counts[i] += 1
    return max(counts) if counts else 0


def adaptive_windows_per_position(size: int, out_size: int) -> int:
    """As :func:`windows_per_position` for adaptive pooling's bins ``[⌊o·n/m⌋, ⌈(o+1)·n/m⌉)``."""
    counts = [0] * size
    for o in range(out_size):
        for i in range((o * size) // out_size, -((-(o + 1) * size) // out_size)):
            counts[i] += 1
    return max(counts) if counts else 0


def nonnegative_linear_norm_bound(linear_map, input_shape: tuple[int, ...]) -> float:
    """Schur's bound ``sqrt(max row sum · max column sum)`` on a linear map with non-negative
    coefficients (average pooling), from one forward (row sums) and one backward (column sums)."""
    ones = torch.ones((1, *input_shape), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = linear_map(ones)
        (column_sums,) = torch.autograd.grad(out.sum(), ones)
    return math.sqrt(float(out.detach().max()) * float(column_sums.max()))
