"""Run a function on N real processes over gloo (no mocked collectives)."""

from __future__ import annotations

import multiprocessing
import os
import socket

import torch
import torch.multiprocessing as mp

# What the rank processes' parent imports once: multiprocessing's fork server, started on the
# first run_ranks of a test process, imports these and forks a fresh process per rank, which
# starts in ~0.1 s instead of spawning an interpreter that imports torch again (2-4 s a rank
# on 2 cores). It has run nothing, so its children start clean (no thread pools, no process
# group). Its environment is the test process's when it started.
_PRELOAD = ["torch", "moe", "parallel", "routing", "kernels", "tests.dist_utils"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, port, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    fn(rank, world_size, *args)


def run_ranks(fn, world_size: int, *args) -> None:
    """fn(rank, world_size, *args) on world_size processes; raises if any rank fails."""
    multiprocessing.set_forkserver_preload(_PRELOAD)
    mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                       join=True, start_method="forkserver")
