"""Test setup: Triton kernels run under the interpreter on machines without CUDA; the
modules' work units under pytest-xdist; a data cache for the training runs."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    """A folder for the tokenizer and tokens that a module's `python -m train` runs share."""
    return str(tmp_path_factory.mktemp("data_cache"))


# `make test` runs the tests on two pytest-xdist workers (-n 2), a module at a time, so that a
# module's tests run in order with its module-scoped fixtures built once, as without xdist.
# The modules whose tests start ranks on free ports form one unit, run first and in turn, so
# that no two of them race for a port or for the cores.
_RANKS_MODULES = {"test_parallel.py", "test_parallel_failures.py", "test_train_ranks.py",
                  "test_routing_megatron.py", "test_peer_shims.py"}
# Seconds the longest other modules took under -n 2 on 2 cores (2026-11-30, the ranks and
# CLI runs forked: tests/forked.py): they start next, longest first, so that none is left to
# run alone at the end.
_MODULE_SECONDS = {"test_serve.py": 167, "test_kernels_triton.py": 151,
                   "test_kernels_offline.py": 120, "test_train.py": 109,
                   "test_bench_smoke.py": 86, "test_serve_cli.py": 49,
                   "test_serve_speculate.py": 16, "test_serve_grammar.py": 14}


def _unit(module: str) -> str:
    return "ranks" if module.rsplit("/", 1)[-1] in _RANKS_MODULES else module


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """One work unit per module (the multi-rank modules: one unit together)."""
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # hand units out in collection order (see below)

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(nodeid.split("::", 1)[0])

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """On an xdist worker: the multi-rank unit first, then the longest modules (the units are
    handed out in the order their first tests were collected)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return

    def rank(item):
        module = item.nodeid.split("::", 1)[0]
        return (0, 0) if _unit(module) == "ranks" else \
            (1, -_MODULE_SECONDS.get(module.rsplit("/", 1)[-1], 0))

    items.sort(key=rank)  # stable: a module's tests keep their order
