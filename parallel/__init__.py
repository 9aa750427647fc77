"""Device mesh, expert parallelism (EP) and fully sharded sparse data parallelism (FSSDP)
around a model built by `moe/`. Model code never imports this package."""

from parallel.api import Parallelized, parallelize
from parallel.comm import CommCounters
from parallel.config import ParallelConfig
from parallel.mesh import Mesh, init_distributed

__all__ = ["CommCounters", "Mesh", "ParallelConfig", "Parallelized", "init_distributed",
           "parallelize"]
