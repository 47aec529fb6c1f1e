"""Unit analysis, the paper's Section 3: which inputs most activate a unit, or a random direction.

The paper finds the held-out images ``x`` maximising ``⟨φ(x), v⟩`` for ``v`` a unit's basis vector
(``v = e_i``) and for a random ``v``, and sees semantically coherent images either way: the space of
activations, not the individual units, carries the semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advtrain.checks import check_count, check_finite
from advtrain.layers import INPUT, check_layer
from advtrain.model_state import untouched


@dataclass
class TopActivating:
    """The ``k`` images with the largest projection on one direction, best first."""

    indices: torch.Tensor  # (k,) into the images given
    scores: torch.Tensor  # (k,) ⟨φ(x), v⟩
    images: torch.Tensor  # (k, ...) the images themselves

    def label_purity(self, labels: torch.Tensor) -> float:
        """The share of the top images that carry their most common label (1.0: all one digit)."""
        top = labels[self.indices.to(labels.device)]
        return float(torch.bincount(top).max()) / len(top)


@torch.no_grad()
def layer_activations(model: nn.Module, layer: str, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """``φ(x)`` of every image at ``layer`` (a name from ``named_modules()``, or ``"input"``),
    flattened per image: ``(N, D)``, computed in eval mode in batches, on the model's device."""
    check_layer(model, layer)
    check_finite("images", images)
    if layer == INPUT:
        return images.flatten(1)
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else images.device
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda module, inputs, output: captured.append(output.flatten(1).cpu()))
    try:
        with untouched(model):
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size].to(device))
    finally:
        handle.remove()
    return torch.cat(captured)


def top_activating(model: nn.Module, layer: str, direction: int | torch.Tensor, images: torch.Tensor, k: int = 8,
                   *, activations: torch.Tensor | None = None) -> TopActivating:
    """The ``k`` images of ``images`` that maximise ``⟨φ(x), v⟩`` at ``layer``.

    Args:
        model: the network (evaluated in eval mode, restored afterwards).
        layer: where ``φ`` is read: a module name or ``"input"``.
        direction: a unit's index into the flattened activation (``v = e_i``) or a vector ``v`` of the
            activation's size (any shape with that many entries).
        images: the held-out images to search, ``(N, ...)``.
        k: how many to return.
        activations: ``layer_activations(model, layer, images)`` where already computed (many directions).

    Raises:
        ValueError: an unknown layer, ``k`` out of range, a unit index out of range, a direction of the
            wrong size or with non-finite entries.

    Reference: Szegedy et al. (2013), Section 3.
    """
    check_count("k", k)
    if k > len(images):
        raise ValueError(f"k={k} is more than the {len(images)} images given")
    phi = activations if activations is not None else layer_activations(model, layer, images)
    if isinstance(direction, int):
        if not 0 <= direction < phi.shape[1]:
            raise ValueError(f"unit {direction} is out of range: layer {layer!r} has {phi.shape[1]} units")
        scores = phi[:, direction]
    else:
        if direction.numel() != phi.shape[1]:
            raise ValueError(f"direction has {direction.numel()} entries but layer {layer!r} has {phi.shape[1]} units")
        check_finite("direction", direction)
        scores = phi @ direction.reshape(-1).to(phi)
    best = scores.topk(k)
    return TopActivating(best.indices, best.values, images[best.indices.to(images.device)])


def random_directions(dim: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random unit vectors of size ``dim`` (Gaussian, normalised): ``(count, dim)``."""
    vectors = torch.randn(count, dim, generator=torch.Generator().manual_seed(seed))
    return vectors / vectors.norm(dim=1, keepdim=True)
