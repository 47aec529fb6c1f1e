"""Target policies: which wrong label each example is pushed to."""

from __future__ import annotations

from typing import Literal

import torch

from advtrain.checks import check_labels

TargetPolicy = Literal["random", "least_likely", "runner_up", "nearest", "untargeted"]
POLICIES: tuple[str, ...] = ("random", "least_likely", "runner_up", "nearest", "untargeted")


def choose_targets(
    target: str | torch.Tensor,
    labels: torch.Tensor,
    clean_logits: torch.Tensor,
    num_classes: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Target labels ``(N,)`` from a tensor or a policy, each different from its true label.

    ``"random"`` draws a wrong label uniformly with ``generator`` (default: one seeded with 0);
    ``"least_likely"`` takes the class with the lowest clean logit; ``"runner_up"`` the wrong class
    with the highest, a one-search stand-in for ``"nearest"``, which the attack itself searches
    over every wrong class. ``"untargeted"`` has no target label; the attack handles it too.

    Raises:
        ValueError: an unknown policy, or targets of the wrong shape, out of range, or equal to a label.
    """
    if isinstance(target, torch.Tensor):
        targets = target.to(labels.device)
        check_labels("target", targets, num_classes, count=labels.shape[0])
        same = targets == labels
        if same.any():
            raise ValueError(f"target equals the true label for {int(same.sum())} examples (first at index "
                             f"{int(same.nonzero()[0])}); an adversarial target must be a wrong class")
        return targets.long()
    if target == "random":
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        offsets = torch.randint(1, num_classes, labels.shape, generator=generator).to(labels.device)
        return (labels + offsets) % num_classes
    if target == "least_likely":
        return clean_logits.scatter(1, labels[:, None], float("inf")).argmin(1)
    if target == "runner_up":
        return clean_logits.scatter(1, labels[:, None], float("-inf")).argmax(1)
    raise ValueError(f"target must be a LongTensor of labels or one of {POLICIES}, got {target!r}")


def ranked_wrong_classes(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N, C-1)`` the wrong classes of each row, most likely first by its clean ``logits``."""
    order = logits.scatter(1, labels[:, None], float("-inf")).argsort(1, descending=True)
    return order[:, :-1]
