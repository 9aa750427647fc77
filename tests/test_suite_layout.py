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


def test_a_forked_run_reports_as_a_subprocess_would():
    """tests.forked.run_module, which the CLI tests run through: its status, its output
    streams, its stdin, an uncaught error's traceback, and a timeout that stops it."""
    import subprocess

    import pytest

    from tests.forked import run_module

    p = run_module("json.tool", [], input='{"a": [1]}')
    assert p.returncode == 0 and p.stdout == '{\n    "a": [\n        1\n    ]\n}\n', p
    p = run_module("json.tool", ["/nonexistent/in.json"])
    assert p.returncode == 2 and "/nonexistent/in.json" in p.stderr and p.stdout == ""
    p = run_module("tests.no_such_module", [])
    assert p.returncode == 1 and "No module named tests.no_such_module" in p.stderr
    with pytest.raises(subprocess.TimeoutExpired):
        run_module("http.server", ["0", "--bind", "127.0.0.1"], timeout=2)
