"""Start a group of training workers on this machine (torch.distributed, gloo or NCCL).

Across machines, start one process per worker with the usual MASTER_ADDR / MASTER_PORT / RANK /
WORLD_SIZE environment (torchrun) and call `init_worker()` in each: the rest of tiergnn is the
same code.
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_worker(rank: int | None = None, world_size: int | None = None, backend: str | None = None,
                timeout_s: float = 120.0) -> None:
    """Join the process group (from the environment unless rank and world_size are given)."""
    # The shared cache exchanges ids and host rows (CPU tensors) and DDP may hold a CUDA model:
    # gloo carries the CPU collectives, NCCL the CUDA ones.
    backend = backend or ("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _entry(rank, fn, world_size, port, timeout_s, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    init_worker(rank, world_size, timeout_s=timeout_s)
    try:
        fn(rank, world_size, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world_size: int, *args, timeout_s: float = 120.0) -> None:
    """Run `fn(rank, world_size, *args)` in `world_size` processes; `fn` must be importable."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), timeout_s, args), nprocs=world_size,
             join=True)
