"""Run a function on N real processes over gloo (no mocked collectives)."""

from __future__ import annotations

import os
import socket

import torch
import torch.multiprocessing as mp

from tests.forked import context


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
    """fn(rank, world_size, *args) on world_size processes, each forked from the fork server
    (tests.forked); raises if any rank fails."""
    context()  # the server's preload
    mp.start_processes(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                       join=True, start_method="forkserver")
