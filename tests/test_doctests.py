"""The runnable examples in the public docstrings run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["advtrain.attacks.box_lbfgs", "advtrain.attacks.fast_gradient", "advtrain.attacks.pgd",
           "advtrain.pooling", "advtrain.callbacks.layerwise_adversarial_training", "advtrain.callbacks.lipschitz_monitor"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    failures, tried = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0
