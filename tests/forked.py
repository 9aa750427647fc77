"""Fresh processes without a fresh interpreter: multiprocessing's fork server imports torch
and the project once (per test process), and forks each rank (tests.dist_utils) or each
`python -m MODULE ...` run from there. A fork starts in ~0.1 s where a new interpreter takes
2-4 s on 2 cores to import torch again. The server has run nothing, so its children start
clean (no thread pools, no process group, no CUDA); its environment is the test process's
when it started, and run_module gives each run the environment it is asked for."""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback

PRELOAD = ["torch", "moe", "parallel", "routing", "kernels", "train", "serve",
           "tests.dist_utils", "tests.forked"]


def context() -> multiprocessing.context.BaseContext:
    """The fork-server context, its server importing PRELOAD when it starts."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    return multiprocessing.get_context("forkserver")


def _main(module: str, args: list[str], cwd: str | None, env: dict | None,
          paths: tuple[str, str, str]) -> None:
    """In the forked child: stdin, stdout and stderr on the given files, then the module run
    as `python -m` runs it; exits with its status."""
    for fd, (path, mode) in enumerate(zip(paths, "rww", strict=True)):
        f = os.open(path, os.O_RDONLY if mode == "r" else os.O_WRONLY)
        os.dup2(f, fd)
        os.close(f)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    if env is not None:
        os.environ.clear()
        os.environ.update(env)
        if "OMP_NUM_THREADS" in env:  # read by the OpenMP runtime when torch was imported
            import torch
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = [module, *args]
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:  # as the interpreter would: the traceback, status 1
        traceback.print_exc()
        code = 1
    for f in (sys.stdout, sys.stderr):
        if not f.closed:  # a module may close them (json.tool does)
            f.flush()
    os._exit(code)


def run_module(module: str, args: list[str], *, cwd: str | None = None,
               env: dict | None = None, input: str | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m module *args` in a process forked from the fork server, as
    subprocess.run(..., capture_output=True, text=True) returns it. env: the whole
    environment (as subprocess's); raises subprocess.TimeoutExpired after timeout s. An env
    that sets TRITON_INTERPRET otherwise than this process gets a new interpreter: Triton
    reads it when the server's imports decorate the kernels."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    if env is not None and env.get("TRITON_INTERPRET") != os.environ.get("TRITON_INTERPRET"):
        return subprocess.run(cmd, cwd=cwd, env=env, input=input, capture_output=True,
                              text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as tmp:
        paths = tuple(os.path.join(tmp, n) for n in ("stdin", "stdout", "stderr"))
        for p, text in zip(paths, (input or "", "", ""), strict=True):
            with open(p, "w") as f:
                f.write(text)
        proc = context().Process(target=_main, args=(module, [str(a) for a in args],
                                                     None if cwd is None else str(cwd),
                                                     env, paths))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([module, *args], timeout)
        out, err = (open(p).read() for p in paths[1:])
    return subprocess.CompletedProcess(cmd, proc.exitcode, out, err)
