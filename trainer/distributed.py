"""Multi-process training plumbing: torchrun launch, process group, rank helpers.

One process is the same code with world size 1: every helper here degrades to a no-op, so the
training loop calls them unconditionally. ``recsys train --nproc N`` re-launches itself under
``torch.distributed.run`` (torchrun) with ``--standalone``; multi-node runs use torchrun directly
with ``--nnodes``/``--rdzv-endpoint`` (docs/scaling.md). Ranks read the same events, build the same
dataset, and shard every global batch between them; after each backward ``average_gradients``
averages the gradients (sparse embedding rows gathered, dense ones all-reduced) with gloo (CPU) or
nccl (GPU), on the main thread, so every rank applies the same update.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from typing import Any

import torch
import torch.distributed as dist


def in_torchrun() -> bool:
    """True inside a process started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str = "cpu") -> None:
    """Join the process group torchrun describes in the environment (idempotent; no-op for one rank)."""
    if not in_torchrun() or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_world_size() -> int:
    """Processes on this machine: they share its cores, so each takes its share of the threads."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.is_initialized() else 1


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. validation metrics, so that all ranks stop together)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def same_parameters(model: torch.nn.Module) -> None:
    """Rank 0's parameters on every rank (a start that does not depend on every rank's seeding agreeing)."""
    if dist.is_initialized():
        for p in model.parameters():
            dist.broadcast(p.data, src=0)


def average_gradients(params: list[torch.nn.Parameter], sparse: bool) -> None:
    """Replace every rank's gradients by their mean over the ranks, in place; no-op for one rank.

    Synchronous, after the backward, with plain collectives: DistributedDataParallel's asynchronous
    sparse all-reduce (gloo threads coalescing while the backward goes on) was the prime suspect of a
    rare heap corruption in two-process runs (docs/scaling.md). ``sparse``: the gradients are sparse
    (embedding rows); each rank's (row, value) entries are gathered, uncoalesced, as the row-wise
    optimiser groups them anyway. A parameter without a gradient on a rank counts as zero there
    (every rank must join every collective, in the same order).
    """
    world = world_size()
    if world == 1:
        return
    if sparse:
        _average_sparse(params, world)
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def _average_sparse(params: list[torch.nn.Parameter], world: int) -> None:
    """Three collectives per step whatever the number of tables (each costs a round trip): the row
    counts, every table's rows in one vector, every table's values flattened into another."""
    mine = [_entries(p) for p in params]
    counts = torch.tensor([rows.numel() for rows, _ in mine], dtype=torch.int64, device=params[0].device)
    every = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    nnz = [c.tolist() for c in every]  # [rank][table]
    widths = [math.prod(p.shape[1:]) for p in params]
    floats = [[c * w for c, w in zip(n, widths, strict=True)] for n in nnz]
    rows = _gather(torch.cat([r for r, _ in mine]), [sum(n) for n in nnz])
    values = _gather(torch.cat([v for _, v in mine]), [sum(f) for f in floats])
    row_parts = [r.split(n) for r, n in zip(rows, nnz, strict=True)]
    value_parts = [v.split(f) for v, f in zip(values, floats, strict=True)]
    for k, p in enumerate(params):
        idx = torch.cat([part[k] for part in row_parts])
        val = torch.cat([part[k] for part in value_parts]).view(-1, *p.shape[1:]).div_(world)
        p.grad = torch.sparse_coo_tensor(idx[None], val, p.shape)


def _entries(p: torch.nn.Parameter) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse gradient's rows and its values flattened (none without a gradient)."""
    if p.grad is None:
        return torch.zeros(0, dtype=torch.int64, device=p.device), p.new_zeros(0)
    return p.grad._indices()[0], p.grad._values().reshape(-1)


def _gather(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Every rank's ``t`` (of length ``sizes[rank]``), in rank order."""
    longest = max(sizes)
    if longest == 0:  # every rank knows the sizes: all skip the collective together
        return [t[:0] for _ in sizes]
    padded = t.new_zeros(longest)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return [part[:n] for part, n in zip(parts, sizes, strict=True)]


def shutdown() -> None:
    """Leave the process group together: a rank that tore its connections down while rank 0 was still
    writing the checkpoint sometimes died at exit (gloo: "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def launch(nproc: int, module: str, argv: list[str]) -> int:
    """Run ``python -m <module> <argv>`` as ``nproc`` ranks on this machine; return the exit code.

    ``argv`` must not contain the option that asked for the launch (the children would launch again).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the launcher's own default; stated here so it is visible
    return subprocess.call(cmd, env=env)


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out
