"""Shared fixtures: where MNIST is, tiny models and tiny data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mutation_aliases import install_if_mutating, under_mutmut

install_if_mutating()  # before anything imports advtrain.callbacks or advtrain.recipes

from advtrain.data.sources import has_mnist  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Inside mutmut's copy only: ``ADVTRAIN_MUTATION_TESTS`` (test files, comma-separated) keeps
    those files' tests and deselects the rest, so that one module's mutants are checked by its own
    tests (the search's by the attack tests, not by every training test that happens to run it;
    docs/mutation-testing.md). A mutant left with no test reports "no tests"."""
    wanted = os.environ.get("ADVTRAIN_MUTATION_TESTS")
    if not wanted or not under_mutmut():
        return
    files = {name.strip() for name in wanted.split(",") if name.strip()}
    kept = [item for item in items if item.nodeid.split("::")[0] in files]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def mnist_root_or_none() -> Path | None:
    """``$ADVTRAIN_DATA_DIR`` if it holds MNIST, else ``../shared/data`` beside the repository; an
    absolute path (tests link to the files from other folders, where a relative one would dangle)."""
    for candidate in (os.environ.get("ADVTRAIN_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and has_mnist(candidate):
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """A data root that holds MNIST; the test is skipped where there is none."""
    root = mnist_root_or_none()
    if root is None:
        pytest.skip("MNIST not found: set ADVTRAIN_DATA_DIR or put it at ../shared/data/MNIST/raw")
    return root


@pytest.fixture
def tiny_data() -> tuple[torch.Tensor, torch.Tensor]:
    """64 random 'images' (N, 1, 28, 28) in [0, 1] whose label is the brightest of 10 pixel bands."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(64, 1, 28, 28, generator=generator)
    labels = images.flatten(1)[:, :780].reshape(64, 10, 78).mean(2).argmax(1)
    return images, labels
