"""Multi-process training plumbing: torchrun launch, process group, rank helpers.

One process is the same code with world size 1: every helper here degrades to a no-op, so the
training loop calls them unconditionally. ``recsys train --nproc N`` re-launches itself under
``torch.distributed.run`` (torchrun) with ``--standalone``; multi-node runs use torchrun directly
with ``--nnodes``/``--rdzv-endpoint`` (docs/scaling.md). Ranks read the same events, build the same
dataset, and shard every global batch between them; DistributedDataParallel averages the sparse
embedding gradients with gloo (CPU) or nccl (GPU).
"""

from __future__ import annotations

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
