"""Worker for tests/test_torch_distributed.py: spawns gloo process groups on this CPU and
writes what each rank measured to JSON (the test asserts on it).

    python -m tests.torch_distributed OUT_DIR

Context parallelism (2 and 4 ranks): each rank runs its stretch with
`MambaTorch.forward(x_local, context_group=pg)`; outputs, final state, the gradient of its
stretch and the all-reduced parameter gradients are compared with one process running the
whole sequence.  DistributedDataParallel (2 ranks): each rank trains on half the batch; the
averaged gradients and the parameters after an SGD step are compared with one process on
the whole batch.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mamba_core.backends.torch import MambaTorch

CONFIGS = {
    "mamba1-linear": dict(hidden_size=16, d_state=4, dt_rank=2, chunk_size=4, scan_type="linear"),
    "mamba1-cumulative": dict(
        hidden_size=16, d_state=4, dt_rank=2, chunk_size=4, scan_type="cumulative"
    ),
    "mamba2-cumulative": dict(
        version="mamba2", hidden_size=16, d_state=4, head_dim=8, chunk_size=4
    ),
}
LENGTH = 24


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b.abs().max() + 1e-30))


def _context(rank: int, world: int, out: Path) -> dict:
    results = {}
    for name, fields in CONFIGS.items():
        module = MambaTorch(fields, seed=0, dtype=torch.float64)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(2, LENGTH, 16, generator=gen, dtype=torch.float64)
        prefix = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)
        token = torch.randn(2, 16, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            _, start = module(prefix, return_state=True)
        # one process, the whole sequence
        x_full = x.clone().requires_grad_(True)
        y1, s1 = module(x_full, state=start, return_state=True)
        ((y1**2).sum() + s1.ssm_state.sum()).backward()
        g1 = {k: p.grad.clone() for k, p in module.named_parameters()}
        module.zero_grad()
        # this rank's stretch
        size = LENGTH // world
        x_local = x[:, rank * size : (rank + 1) * size].clone().requires_grad_(True)
        y, st = module(x_local, state=start, return_state=True, context_group=dist.group.WORLD)
        # the final state is on every rank: count it once in the loss
        ((y**2).sum() + (st.ssm_state.sum() if rank == 0 else 0.0)).backward()
        grads = {}
        for k, p in module.named_parameters():
            dist.all_reduce(p.grad)
            grads[k] = _max_rel(p.grad, g1[k])
        with torch.no_grad():
            d1, _ = module.step(token, s1)
            d, _ = module.step(token, st)
        results[name] = {
            "y": _max_rel(y.detach(), y1.detach()[:, rank * size : (rank + 1) * size]),
            "ssm_state": _max_rel(st.ssm_state.detach(), s1.ssm_state.detach()),
            "conv_state": _max_rel(st.conv_state.detach(), s1.conv_state.detach()),
            "x_grad": _max_rel(x_local.grad, x_full.grad[:, rank * size : (rank + 1) * size]),
            "param_grad": max(grads.values()),
            "decode": _max_rel(d, d1),
        }
    return results


def _ddp(rank: int, world: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    cfg = CONFIGS["mamba1-linear"]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 12, 16, generator=gen, dtype=torch.float64)
    single = MambaTorch(cfg, seed=3, dtype=torch.float64)
    (single(x) ** 2).mean().backward()
    torch.optim.SGD(single.parameters(), lr=0.1).step()

    module = MambaTorch(cfg, seed=3, dtype=torch.float64)
    ddp = DistributedDataParallel(module)
    rows = x.shape[0] // world
    (ddp(x[rank * rows : (rank + 1) * rows]) ** 2).mean().backward()
    grads = {k: p.grad.clone() for k, p in module.named_parameters()}
    torch.optim.SGD(ddp.parameters(), lr=0.1).step()
    return {
        "grad": max(_max_rel(grads[k], p.grad) for k, p in single.named_parameters()),
        "param": max(
            _max_rel(p.detach(), q.detach())
            for (_, p), q in zip(single.named_parameters(), module.parameters(), strict=True)
        ),
    }


def _run(rank: int, world: int, kind: str, out: Path) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/{kind}-{world}.rendezvous",
        rank=rank,
        world_size=world,
    )
    torch.set_num_threads(1)
    try:
        result = {"context": _context, "ddp": _ddp}[kind](rank, world, out)
        (out / f"{kind}-{world}-{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Done, and the group is down: leave without the interpreter's teardown.  On a 2-core
    # AVX-512 EPYC about one run in ten aborted there ("terminate called without an active
    # exception", SIGABRT, after every rank had written its results), with this library's
    # code of before and after the change that first met it alike.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(out: Path) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    for kind, world in (("context", 2), ("context", 4), ("ddp", 2)):
        mp.spawn(_run, args=(world, kind, out), nprocs=world, join=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
