"""Random translation of image batches, the one augmentation the MNIST recipes offer."""

from __future__ import annotations

import torch


def random_shift(images: torch.Tensor, max_pixels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image of ``images`` ``(N, C, H, W)`` moved by its own random whole-pixel offset.

    The offsets, up and down and left and right, are drawn uniformly from ``-max_pixels`` to
    ``max_pixels`` (on the CPU, from ``generator`` where given, so a seeded generator repeats them);
    pixels moved in from outside the image are 0. A new tensor on ``images``' device; the
    input is not changed. ``max_pixels=0`` returns a copy.

    Raises:
        ValueError: ``images`` is not 4-dimensional, ``max_pixels`` is negative or not below the
            image's height and width.
    """
    if images.dim() != 4:
        raise ValueError(f"random_shift takes images of shape (N, C, H, W), got shape {tuple(images.shape)}")
    count, channels, height, width = images.shape
    if not 0 <= max_pixels < min(height, width):
        raise ValueError(f"max_pixels must be in [0, {min(height, width)}) for {height}×{width} images, got {max_pixels}")
    if max_pixels == 0:
        return images.clone()
    offsets = torch.randint(0, 2 * max_pixels + 1, (2, count), generator=generator).to(images.device)
    padded = torch.nn.functional.pad(images, (max_pixels,) * 4)
    rows = offsets[0, :, None] + torch.arange(height, device=images.device)  # (N, H) into the padded image
    columns = offsets[1, :, None] + torch.arange(width, device=images.device)  # (N, W)
    batch = torch.arange(count, device=images.device)[:, None, None, None]
    channel = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], columns[:, None, None, :]]
