"""``AdversarialPool``: a fixed-capacity store of adversarial activations of one layer.

The paper keeps "a pool of adversarial examples a random subset of which is continuously replaced
by newly generated adversarial examples" (Section 4.2). A pool fills up to its capacity; once full,
each batch of fresh examples overwrites randomly chosen entries. Its tensors and its random state
live in ``state_dict``, so a checkpoint restores the same pool and the same future draws.
"""

from __future__ import annotations

from typing import Any

import torch

from advtrain.checks import check_count


class AdversarialPool:
    """Adversarial activations of one layer with their true labels.

    Args:
        capacity: the most examples it holds.
        device: where the examples live (``"cpu"`` keeps device memory free).
        seed: seeds the choice of entries to replace and to sample.

    Raises:
        ValueError: a capacity below 1; examples whose shape, count or labels do not fit.

    Example::

        pool = AdversarialPool(capacity=1000)
        pool.add(adversarial_activations, true_labels)
        activations, labels = pool.sample(32)
    """

    def __init__(self, capacity: int, *, device: torch.device | str = "cpu", seed: int = 0) -> None:
        check_count("capacity", capacity)
        self.capacity = capacity
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)
        self.examples: torch.Tensor | None = None  # (capacity, ...) once the first batch arrives
        self.labels = torch.zeros(capacity, dtype=torch.long, device=self.device)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, examples: torch.Tensor, labels: torch.Tensor) -> int:
        """Store ``examples`` ``(n, ...)``: into free slots first, then over random entries.

        Returns:
            How many entries were overwritten.
        """
        if examples.shape[0] != labels.shape[0]:
            raise ValueError(f"{examples.shape[0]} examples but {labels.shape[0]} labels")
        if self.examples is None:
            self.examples = torch.zeros(self.capacity, *examples.shape[1:], dtype=examples.dtype, device=self.device)
        elif examples.shape[1:] != self.examples.shape[1:]:
            raise ValueError(f"examples of shape {tuple(examples.shape[1:])} do not fit a pool of "
                             f"{tuple(self.examples.shape[1:])}")
        examples, labels = examples[: self.capacity], labels[: self.capacity]
        free = min(self.capacity - self.size, examples.shape[0])
        slots = torch.arange(self.size, self.size + free)
        replaced = examples.shape[0] - free
        if replaced:
            slots = torch.cat([slots, torch.randperm(self.size, generator=self.generator)[:replaced]])
        slots = slots.to(self.device)
        self.examples[slots] = examples.detach().to(self.device, self.examples.dtype)
        self.labels[slots] = labels.to(self.device)
        self.size += free
        return replaced

    def sample(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` entries drawn without replacement (with it, where the pool is smaller)."""
        if self.size == 0 or self.examples is None:
            raise RuntimeError("the pool is empty; add examples before sampling")
        if count <= self.size:
            index = torch.randperm(self.size, generator=self.generator)[:count]
        else:
            index = torch.randint(self.size, (count,), generator=self.generator)
        index = index.to(self.device)
        return self.examples[index], self.labels[index]

    def state_dict(self) -> dict[str, Any]:
        """Examples, labels, size and the random state."""
        return {
            "capacity": self.capacity,
            "size": self.size,
            "examples": None if self.examples is None else self.examples[: self.size].cpu(),
            "labels": self.labels[: self.size].cpu(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if state["capacity"] != self.capacity:
            raise ValueError(f"a pool of capacity {state['capacity']} cannot be loaded into one of {self.capacity}")
        self.size = int(state["size"])
        self.generator.set_state(state["generator"])
        self.labels = torch.zeros(self.capacity, dtype=torch.long, device=self.device)
        self.labels[: self.size] = state["labels"].to(self.device)
        if state["examples"] is None:
            self.examples = None
            return
        examples = state["examples"]
        self.examples = torch.zeros(self.capacity, *examples.shape[1:], dtype=examples.dtype, device=self.device)
        self.examples[: self.size] = examples.to(self.device)
