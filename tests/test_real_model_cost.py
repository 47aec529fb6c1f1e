"""The resnet18 cost benchmark (benchmarks/real_model_cost.py): each setting's run is measured
against the plain runs just before and after it, so that a drift of the machine cancels."""

from __future__ import annotations

import pytest
from script_modules import REPO, load_script


def load_cost(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the script imports its neighbour callback_cost
    return load_script("benchmarks/real_model_cost.py", "real_model_cost")


def test_each_run_is_measured_against_its_plain_neighbours_so_a_steady_drift_cancels(monkeypatch: pytest.MonkeyPatch) -> None:
    cost = load_cost(monkeypatch)
    clock = {"runs": 0}
    truth = {None: 1.0, "slow": 1.5, "slower": 2.0}  # true cost against plain training

    class Marker:
        def __init__(self, name: str) -> None:
            self.name = name

    def run(callback) -> list[float]:
        """Three epochs whose seconds grow by 10% every run (a machine slowing down), the first
        (warm-up) epoch twice as long."""
        drift = 1.0 + 0.1 * clock["runs"]
        clock["runs"] += 1
        seconds = truth[None if callback is None else callback.name] * drift
        return [2 * seconds, seconds, seconds]

    settings = {"slow": lambda: Marker("slow"), "slower": lambda: Marker("slower")}
    measured = cost.bracketed(settings, repeats=3, run=run)
    assert clock["runs"] == 1 + 3 * 2 * 2  # plain first, then each setting followed by plain
    assert len(measured["plain"]["epoch_seconds"]) == 7
    assert measured["slow"]["plain_runs"] == [[0, 1], [2, 3], [4, 5]]
    assert measured["slower"]["plain_runs"] == [[1, 2], [3, 4], [5, 6]]
    # a linear drift cancels exactly against the mean of the two neighbours
    assert measured["slow"]["ratios_to_plain"] == pytest.approx([1.5] * 3)
    assert measured["slower"]["ratios_to_plain"] == pytest.approx([2.0] * 3)
    assert measured["slower"]["ratio_to_plain"] == pytest.approx(2.0)
    assert measured["plain"]["ratio_to_plain"] == 1.0
    # the warm-up epoch is left out of a run's mean
    assert measured["slow"]["run_means_after_warmup"][0] == pytest.approx(1.5 * 1.1)


def test_a_setting_run_once_is_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    cost = load_cost(monkeypatch)
    name = cost.RUN_ONCE[0]
    runs = []
    measured = cost.bracketed({name: lambda: None}, repeats=3, run=lambda callback: runs.append(callback) or [1.0, 1.0, 1.0])
    assert len(measured[name]["epoch_seconds"]) == 1
    assert len(runs) == 3  # plain, the setting, plain
