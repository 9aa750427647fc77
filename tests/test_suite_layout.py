"""The suite's own layout: every test module that starts ranks on free ports is in the one
xdist work unit that runs such modules in turn (tests/conftest.py)."""

from __future__ import annotations

import re
from pathlib import Path

from tests.conftest import _RANKS_MODULES, _unit

# what starts ranks: tests.dist_utils, torchrun, or train_helpers.train(..., nproc=N > 1)
_STARTS_RANKS = re.compile(r"run_ranks\(|free_port\(|torch\.distributed\.run|torchrun|nproc=[2-9]")


def test_every_module_that_starts_ranks_is_in_the_ranks_unit():
    here = Path(__file__).parent
    starting = {p.name for p in here.glob("test_*.py") if _STARTS_RANKS.search(p.read_text())}
    starting.discard(Path(__file__).name)  # this file names the patterns
    assert starting, "no module starts ranks: the pattern above no longer finds them"
    assert starting <= _RANKS_MODULES, sorted(starting - _RANKS_MODULES)
    assert all(_unit(f"tests/{name}") == "ranks" for name in starting)
    assert _unit("tests/test_serve.py") == "tests/test_serve.py"  # the others: one a module
