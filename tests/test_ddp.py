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
