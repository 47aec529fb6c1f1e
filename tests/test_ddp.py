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
