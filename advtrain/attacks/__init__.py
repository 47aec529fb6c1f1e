"""Adversarial search: the paper's box-constrained L-BFGS (Section 4.1)."""

from advtrain.attacks.box_lbfgs import BoxLBFGS
from advtrain.attacks.result import AttackResult
from advtrain.attacks.targets import choose_targets

__all__ = ["AttackResult", "BoxLBFGS", "choose_targets"]
