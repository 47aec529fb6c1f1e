"""strategy="ddp" on two CPU processes: every rank keeps and refreshes its own pools from its shard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_pools.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_each_rank_keeps_its_own_pools(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    # each rank trained on its own shard of the data...
    assert not torch.equal(ranks[0]["seen"], ranks[1]["seen"])
    for layer in ("input", "act1"):
        first, second = (rank["pools"][layer] for rank in ranks)
        assert first["size"] > 0 and second["size"] > 0
        # ...and generated its own pool from it
        assert first["size"] != second["size"] or not torch.equal(first["examples"], second["examples"])


RESUME_SCRIPT = Path(__file__).parent / "scripts" / "ddp_resume.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_each_rank_resumes_its_own_pools_and_random_streams(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for phase in ("first", "resume"):
        result = subprocess.run([sys.executable, str(RESUME_SCRIPT), str(tmp_path), phase], capture_output=True,
                                text=True, env=env, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    first = [torch.load(tmp_path / f"first_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    resumed = [torch.load(tmp_path / f"resumed_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    # before the interruption the ranks drew differently...
    assert not torch.equal(first[0]["generator"], first[1]["generator"])
    for rank in (0, 1):  # ...and after it each rank has its own streams and pools back, not rank 0's
        assert torch.equal(resumed[rank]["generator"], first[rank]["generator"])
        assert resumed[rank]["steps_taken"] == first[rank]["steps_taken"]
        for layer in ("input", "act1"):
            before, after = first[rank]["pools"][layer], resumed[rank]["pools"][layer]
            assert after["size"] == before["size"] > 0
            assert torch.equal(after["examples"], before["examples"]) and torch.equal(after["generator"], before["generator"])
    assert not torch.equal(resumed[0]["pools"]["input"]["examples"], resumed[1]["pools"]["input"]["examples"])


EVALUATION_SCRIPT = Path(__file__).parent / "scripts" / "ddp_evaluation.py"


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_the_evaluation_splits_the_examples_across_ranks_and_reports_them_all(tmp_path: Path) -> None:
    from advtrain.callbacks import AdversarialEvaluation
    from advtrain.robustness import Ensemble

    sys.path.insert(0, str(EVALUATION_SCRIPT.parent))
    from ddp_evaluation import data, model

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(EVALUATION_SCRIPT), str(tmp_path)], capture_output=True, text=True,
                            env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"eval_rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [rank["own_rows"] for rank in ranks] == [20, 20]  # each rank attacked half, not all 40
    assert ranks[0]["metrics"] == ranks[1]["metrics"] and ranks[0]["examples"] == 40
    # the same examples in one process: the same clean error and count attacked, robust errors close
    single = AdversarialEvaluation(examples=40, budgets={"linf": [0.05, 0.2]}, figure_examples=0,
                                   ensemble=Ensemble(steps=10, targets=1, queries=30))
    report, _ = single.evaluate(model().model, *data().tensors)
    assert ranks[0]["clean"] == pytest.approx(report.clean_error) and ranks[0]["attacked"] == report.attacked
    for epsilon, error in report.robust_error["linf"].items():
        assert ranks[0]["robust"]["linf"][epsilon] == pytest.approx(error, abs=2 / 40)
        assert ranks[0]["metrics"][f"adv_test/robust_err@linf={epsilon:g}"] == pytest.approx(ranks[0]["robust"]["linf"][epsilon])
