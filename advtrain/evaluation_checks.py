"""Checks that flag a broken robustness evaluation instead of reporting a masked model as robust
(Carlini et al., 2019, "On Evaluating Adversarial Robustness", Section 5; AutoAttack's ``checks.py``;
Athalye et al., 2018).

Six checks; each failed one is a :class:`FailedCheck` naming what was seen and what to do:

- ``randomness``: two forward passes on the same inputs disagree, so an attack chases noise
  (evaluate the expectation over the randomness, Athalye et al.'s EOT);
- ``probabilities``: the model returns probabilities, not logits, so the cross-entropy of the
  attacks saturates;
- ``gradients``: the input gradient of the logit margin is zero or not finite on a share of the
  examples (quantisation, a non-differentiable step, ``sqrt`` at zero);
- ``gradient-free``: Square, which reads no gradient, breaks more examples than every gradient
  attack left, by more than a small margin;
- ``budget``: the error APGD reaches on its own falls as the budget grows;
- ``whole box``: a budget covering the whole box leaves the error far from 100%.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from advtrain.robustness import RobustnessResult

#: every check, in the order they run
CHECK_NAMES = ("randomness", "probabilities", "gradients", "gradient-free", "budget", "whole box")
#: share of the examples with zero or non-finite input gradients that fails the ``gradients`` check
GRADIENT_SHARE = 0.05
#: share of the examples (and at least two) by which Square may beat the gradient attacks, or the
#: error may fall with a larger budget, before the check fails
MARGIN_SHARE = 0.03
#: the error a budget covering the whole box must reach
WHOLE_BOX_ERROR = 0.95


class EvaluationCheckWarning(UserWarning):
    """A check of the robustness evaluation failed: its figures may flatter the model."""


@dataclass
class FailedCheck:
    """One failed check: its name and a message saying what was seen and what to do."""

    name: str
    message: str


def output_checks(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> list[FailedCheck]:
    """The checks on the model's outputs and gradients at the clean inputs (model as the caller
    left it, in eval mode)."""
    failed = []
    with torch.no_grad():
        first, second = model(inputs), model(inputs)
    scale = 1.0 + float(first.abs().max()) if first.numel() else 1.0
    if bool((first.argmax(1) != second.argmax(1)).any()) or float((first - second).abs().max()) > 1e-3 * scale:
        failed.append(FailedCheck("randomness", "two forward passes on the same inputs gave different outputs (max "
                                  f"difference {float((first - second).abs().max()):.3g}): the attacks chase noise. Evaluate "
                                  "the expected output over the randomness (EOT), or fix the randomness, before trusting "
                                  "the robust error"))
    if bool(((first >= 0) & (first <= 1)).all()) and bool(torch.allclose(first.sum(1), torch.ones_like(first[:, 0]), atol=1e-3)):
        failed.append(FailedCheck("probabilities", "the model returns probabilities (outputs in [0, 1] summing to 1), not "
                                  "logits: the attacks' cross-entropy saturates. Evaluate the model without its final "
                                  "softmax"))
    points = inputs.detach().clone().requires_grad_(True)
    logits = model(points)
    # the margin, not the cross-entropy: a confident model's cross-entropy gradient underflows to
    # zero in float32 without any masking, while its margin still moves with the input
    others = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    (gradient,) = torch.autograd.grad((logits.gather(1, labels[:, None])[:, 0] - others).sum(), points)
    flat = gradient.flatten(1)
    bad = ~torch.isfinite(flat).all(1) | (flat == 0).all(1)
    share = float(bad.float().mean()) if bad.numel() else 0.0
    if share > GRADIENT_SHARE:
        failed.append(FailedCheck("gradients", f"the input gradient of the logit margin is zero or not finite on {share:.0%} of "
                                  "the examples: gradient attacks cannot move there (gradient masking by quantisation, a "
                                  "step function or a square root at zero). Replace the non-differentiable part by a "
                                  "smooth approximation in the backward pass (BPDA) before trusting the robust error"))
    return failed


def result_checks(result: RobustnessResult) -> list[FailedCheck]:
    """The checks on what the ensemble found."""
    failed = []
    margin = max(2, math.ceil(MARGIN_SHARE * result.examples))
    for norm, budgets in result.broken_by.items():
        for epsilon, tally in budgets.items():
            if tally.get("square", 0) >= margin:
                failed.append(FailedCheck("gradient-free", f"at {norm} ε={epsilon:g}, Square, which reads no gradient, broke "
                                          f"{tally['square']} of {result.examples} examples every gradient attack failed on: "
                                          "the gradients mislead the attacks (gradient masking). Distrust the robust error "
                                          "and look for the masking"))
                break
    for norm, errors in result.first_attack_error.items():
        values = [errors[epsilon] for epsilon in sorted(errors)]
        drops = [earlier - later for earlier, later in zip(values, values[1:])]
        if drops and max(drops) * result.examples >= margin:
            failed.append(FailedCheck("budget", f"in {norm}, APGD's error fell from one budget to a larger one (errors "
                                      f"{', '.join(f'{v:.3f}' for v in values)} at ε {', '.join(f'{e:g}' for e in sorted(errors))}): "
                                      "a larger budget can only help an attack that works. The gradients or the step sizes "
                                      "are misleading it"))
    if not math.isnan(result.whole_box_error) and result.whole_box_error < WHOLE_BOX_ERROR:
        failed.append(FailedCheck("whole box", f"with the whole box as its budget, APGD reached only {result.whole_box_error:.1%} "
                                  "error, where any classifier that uses its input errs on nearly every example: the "
                                  "attack is not working on this model (masked or saturated gradients)"))
    return failed


def warn_failed(checks: list[FailedCheck], where: str) -> None:
    """One :class:`EvaluationCheckWarning` per failed check, naming it."""
    for check in checks:
        warnings.warn(f"{where}: evaluation check '{check.name}' failed: {check.message}", EvaluationCheckWarning, stacklevel=3)


__all__ = ["CHECK_NAMES", "EvaluationCheckWarning", "FailedCheck", "output_checks", "result_checks", "warn_failed"]
