"""Adversarial attacks behind one contract (:class:`Attack`): the paper's box-constrained L-BFGS
search (Section 4.1), a fast-gradient step, projected gradient descent, and the evaluation's
Auto-PGD, FAB and Square (AutoAttack's members) and DDN (an L2 minimal search)."""

from advtrain.attacks.apgd import APGD
from advtrain.attacks.base import Attack, Proposal
from advtrain.attacks.box_lbfgs import BoxLBFGS, evaluation_search
from advtrain.attacks.ddn import DDN
from advtrain.attacks.fab import FAB
from advtrain.attacks.fast_gradient import FastGradient
from advtrain.attacks.pgd import PGD
from advtrain.attacks.result import AttackResult
from advtrain.attacks.square import Square
from advtrain.attacks.targets import choose_targets

__all__ = ["APGD", "DDN", "FAB", "PGD", "Square", "Attack", "AttackResult", "BoxLBFGS", "FastGradient", "Proposal", "choose_targets", "evaluation_search"]
