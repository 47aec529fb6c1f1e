"""The contract every attack keeps: one call from a model (or a head above a layer), inputs, labels,
a target policy, a box and a random generator to a verified :class:`AttackResult`.

:class:`Attack` does what every attack needs once: it refuses a target policy the attack cannot
serve, checks and copies the inputs, picks the targets, evaluates the model as in eval mode with
its parameters frozen, puts every parameter, buffer, mode and flag back as it found them, and
verifies what the attack proposes with a fresh forward pass and the exact box. A subclass holds
only its settings and implements :meth:`Attack.propose`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from advtrain.attacks.inputs import CheckedBatch, Head, checked_batch
from advtrain.attacks.result import AttackResult
from advtrain.attacks.targets import POLICIES, TargetPolicy, choose_targets
from advtrain.box import UNIT_BOX, Bounds
from advtrain.model_state import untouched


@dataclass
class Proposal:
    """What an attack found, before verification.

    Attributes:
        points: ``(N, ...)`` the candidate adversarial inputs, one per row (the clean input where
            the attack has none).
        found: ``(N,)`` bool, rows with a candidate; a fixed-budget attack has one for every row.
        c: ``(N,)`` a search's penalty weight of each candidate (``nan`` where none).
        iterations: ``(N,)`` iterations spent on each row.
    """

    points: torch.Tensor
    found: torch.Tensor
    c: torch.Tensor | None = None
    iterations: torch.Tensor | None = None


class Attack(ABC):
    """Base of every attack (see the module docstring).

    Args:
        target: the policy used where a call gives none: ``"untargeted"`` (leave the true class
            for any other), ``"random"`` (a wrong class drawn with the call's generator, the
            paper's practice), ``"runner_up"``, ``"least_likely"``, or ``"nearest"`` where the
            attack can search every wrong class.

    Raises:
        ValueError: a policy the attack cannot serve (:attr:`policies`).
    """

    #: the target policies this attack can serve (a tensor of target labels always works)
    policies: ClassVar[tuple[str, ...]] = ("untargeted", "random", "runner_up", "least_likely")
    #: whether every row gets a perturbation of a fixed size, fooled or not (a fast-gradient or PGD
    #: step), rather than a search's minimal one that exists only where it succeeded
    fixed_budget: ClassVar[bool] = False

    def __init__(self, *, target: TargetPolicy = "untargeted") -> None:
        self.check_target(target)
        self.target = target

    def check_target(self, target: TargetPolicy | torch.Tensor) -> None:
        """Refuse a target policy this attack cannot serve.

        Raises:
            ValueError: an unknown policy, or one outside :attr:`policies`.
        """
        if isinstance(target, torch.Tensor):
            return
        if target not in POLICIES:
            raise ValueError(f"target must be a tensor of labels or one of {POLICIES}, got {target!r}")
        if target not in self.policies:
            raise ValueError(f"{type(self).__name__} cannot serve target={target!r}; it serves {self.policies}")

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={value!r}" for name, value in vars(self).items() if not name.startswith("_"))
        return f"{type(self).__name__}({settings})"

    def __call__(
        self,
        model: Head,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        target: TargetPolicy | torch.Tensor | None = None,
        bounds: Bounds = UNIT_BOX,
        generator: torch.Generator | None = None,
    ) -> AttackResult:
        """Attack every row of ``inputs``.

        Args:
            model: a callable from a batch of inputs (or a layer's activations) to logits ``(N, C)``:
                a model, or the head above a layer (:func:`advtrain.layers.cut_at`).
            inputs: ``(N, ...)`` clean inputs inside ``bounds``.
            labels: ``(N,)`` true labels.
            target: ``(N,)`` target labels or a policy (default: the attack's own ``target``).
            bounds: ``(lower, upper)``, scalars or tensors broadcastable to the inputs; may be infinite.
            generator: draws random targets and random starts (default: torch's global generator, so
                successive calls draw anew and ``torch.manual_seed`` makes a run repeatable).

        Raises:
            ValueError: inputs that are not a finite floating-point batch inside the box, labels
                out of range or not one per row, malformed bounds, targets equal to the labels, or
                a policy the attack cannot serve.
        """
        target = self.target if target is None else target
        self.check_target(target)
        generator = generator if generator is not None else torch.default_generator
        with torch.inference_mode(False), torch.enable_grad(), untouched(model):
            batch = checked_batch(model, inputs, labels, bounds)
            untargeted = isinstance(target, str) and target in ("untargeted", "nearest")
            targets = None if untargeted else choose_targets(target, batch.labels, batch.clean_logits, batch.num_classes,
                                                             generator=generator)
            proposal = self.propose(model, batch, targets, target, generator)
            with torch.no_grad():
                return self._verified(model, batch, proposal, targets)

    @abstractmethod
    def propose(self, model: Head, batch: CheckedBatch, targets: torch.Tensor | None, policy: TargetPolicy | torch.Tensor,
                generator: torch.Generator) -> Proposal:
        """Candidate adversarial inputs for ``batch`` (checked copies, clean logits known), pushed to
        ``targets`` or, where it is None, away from the true labels (``policy`` says which
        untargeted policy: ``"untargeted"`` or ``"nearest"``)."""

    def _verified(self, model: Head, batch: CheckedBatch, proposal: Proposal, targets: torch.Tensor | None) -> AttackResult:
        """The result, with success checked by a fresh forward pass and the exact box."""
        inputs, labels = batch.inputs, batch.labels
        points = proposal.points.detach().view_as(inputs)
        flat = points.flatten(1)
        inside = ((flat >= batch.lower) & (flat <= batch.upper)).all(1)
        reached = model(points).argmax(1)
        fooled = reached != labels if targets is None else reached == targets
        success = proposal.found & inside & fooled
        if targets is None:  # the class reached, or the clean runner-up where it failed
            runner_up = choose_targets("runner_up", labels, batch.clean_logits, batch.num_classes)
            targets = torch.where(success, reached, runner_up)
        rows = success.view(-1, *[1] * (inputs.ndim - 1))
        adversarial = torch.where(rows, points, inputs)
        perturbation = (adversarial - inputs).flatten(1)
        infinite = torch.full_like(success, math.inf, dtype=inputs.dtype)
        l2 = torch.where(success, perturbation.norm(dim=1), infinite)
        linf = torch.where(success, perturbation.abs().amax(1), infinite)
        nothing = torch.full_like(success, math.nan, dtype=inputs.dtype)
        return AttackResult(
            adversarial=adversarial, perturbation=perturbation.view_as(inputs), success=success,
            distortion=l2 / math.sqrt(flat.shape[1]), l2=l2, linf=linf, target=targets,
            c=nothing if proposal.c is None else torch.where(success, proposal.c, nothing),
            iterations=proposal.iterations if proposal.iterations is not None else torch.zeros_like(labels),
            attempt=points if self.fixed_budget else None,
        )
