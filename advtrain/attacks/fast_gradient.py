"""A fast-gradient step of a fixed size: the cheap adversary of adversarial training.

``x′ = clip(x + ε·d)`` with d the steepest direction of the norm for the gradient of the
cross-entropy (its sign in L∞: FGSM; the gradient over its L2 norm in L2 and ``sqrt(mean r²)``),
ascending the true label's loss (untargeted) or descending a target's. ``epsilon=0.036`` in the
default ``"rms"`` norm is an L2 step of about 1.0 on a 28×28 image. With ``random_start`` it is
fast adversarial training's step (Wong et al., 2020): from a uniformly random point of the ε-ball,
one step of ``step_size`` (they use 1.25·ε in L∞), projected back onto the ball. One forward and one
backward pass per batch, against the L-BFGS search's dozens: it finds no minimal perturbation, only
one of a fixed size in the direction that first hurts most.

It is projected gradient descent with one step (:class:`~advtrain.attacks.PGD`).

Reference: Goodfellow et al., "Explaining and harnessing adversarial examples" (2014); its L2 form,
Miyato et al. (2015); Wong et al., "Fast is better than free" (2020).
"""

from __future__ import annotations

from advtrain.attacks.pgd import PGD
from advtrain.attacks.targets import TargetPolicy
from advtrain.budget import Norm


class FastGradient(PGD):
    """One gradient step of a fixed size, projected onto the ε-ball and clipped to the box.

    Every row gets its step, fooled or not (``result.attempt``); ``result.adversarial`` holds it
    where it fooled the model. ``"nearest"`` needs a search per wrong class, which one step cannot
    make, and is refused.

    Args:
        epsilon: the budget in ``norm`` (:mod:`advtrain.budget`).
        norm: ``"rms"`` (the paper's ``sqrt(mean r²)``, default), ``"l2"`` or ``"linf"`` (FGSM).
        random_start: start from a uniformly random point of the ε-ball (fast adversarial training).
        step_size: the step's length in the norm's units (default ``epsilon``).
        target: the default target policy (see :class:`~advtrain.attacks.base.Attack`).

    Raises:
        ValueError: a budget or step that is not positive and finite, an unknown norm,
            ``target="nearest"``.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> result = FastGradient(epsilon=0.1)(model, torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1]))
        >>> result.attempt.shape
        torch.Size([5, 4])

    Reference: Goodfellow et al. (2014); Wong et al. (2020).
    """

    def __init__(self, *, epsilon: float = 0.036, norm: Norm = "rms", random_start: bool = False,
                 step_size: float | None = None, target: TargetPolicy = "untargeted") -> None:
        super().__init__(epsilon=epsilon, norm=norm, steps=1, step_size=epsilon if step_size is None else step_size,
                         random_start=random_start, target=target)

    def __repr__(self) -> str:
        step = "" if self.step_size == self.epsilon else f", step_size={self.step_size!r}"
        start = ", random_start=True" if self.random_start else ""
        return f"FastGradient(target={self.target!r}, epsilon={self.epsilon!r}, norm={self.norm!r}{start}{step})"
