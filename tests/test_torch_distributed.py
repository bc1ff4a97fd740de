"""Context parallelism and DistributedDataParallel on PyTorch: gloo process groups spawned on
this CPU (`tests/torch_distributed.py`, in a subprocess) against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    require("torch")
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.torch_distributed", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_equals_one_process(measured, world):
    for rank in range(world):
        result = measured[f"context-{world}-{rank}"]
        assert set(result) == {"mamba1-linear", "mamba1-cumulative", "mamba2-cumulative"}
        for name, errors in result.items():
            # outputs, final states, input and parameter gradients, decode after prefill
            assert len(errors) == 6 and max(errors.values()) < 1e-12, (world, rank, name, errors)


def test_ddp_gradients_equal_one_process(measured):
    for rank in range(2):
        result = measured[f"ddp-2-{rank}"]
        assert result["grad"] < 1e-12 and result["param"] < 1e-12, (rank, result)


def test_context_group_rejects_mask_and_packing():
    require("torch")
    import torch

    from mamba_core.backends.torch import MambaTorch

    module = MambaTorch({"hidden_size": 8, "d_state": 4}, seed=0)
    x = torch.zeros(1, 6, 8)
    with pytest.raises(ValueError, match="does not combine with mask"):
        module(x, torch.ones(1, 6), context_group=object())
    with pytest.raises(ValueError, match="does not combine with mask"):
        module(x, cu_seqlens=[0, 2, 6], context_group=object())
