"""One rank of the dead-rank test: trains EP steps; rank KILL_RANK SIGKILLs itself mid-step.

Run by tests/test_parallel_failures.py as `python -m tests.kill_worker` with the torchrun
variables set by the test.
"""

import os
import signal

import torch

from parallel import ParallelConfig, init_distributed, parallelize
from tests.test_parallel import B, S, build_model


def main() -> None:
    torch.set_num_threads(1)
    kill_rank, timeout = int(os.environ["KILL_RANK"]), float(os.environ["TIMEOUT_S"])
    mesh = init_distributed(ParallelConfig(mode="ep", timeout_s=timeout))
    par = parallelize(build_model(False, None, num_experts=6), mesh)
    g = torch.Generator().manual_seed(mesh.rank)
    for step in range(4):
        ids = torch.randint(0, 64, (B, S + 1), generator=g)
        with mesh.guard():
            out = par.module(ids[:, :-1], labels=ids[:, 1:])
            if step == 2 and mesh.rank == kill_rank:
                os.kill(os.getpid(), signal.SIGKILL)  # dies between forward and backward
            out.loss.backward()
            par.after_backward()
        print(f"rank {mesh.rank} step {step} loss {out.loss.item():.4f}", flush=True)
    mesh.close()


if __name__ == "__main__":
    main()
