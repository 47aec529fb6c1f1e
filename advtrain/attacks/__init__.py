"""Adversarial attacks: the paper's box-constrained L-BFGS (Section 4.1) and a fast-gradient step."""

from advtrain.attacks.box_lbfgs import BoxLBFGS
from advtrain.attacks.fast_gradient import FastGradient, FastGradientResult
from advtrain.attacks.result import AttackResult
from advtrain.attacks.targets import choose_targets

__all__ = ["AttackResult", "BoxLBFGS", "FastGradient", "FastGradientResult", "choose_targets"]
