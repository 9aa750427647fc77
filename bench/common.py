"""Timing, memory and result-recording helpers shared by the benchmarks."""

from __future__ import annotations

import atexit
import datetime
import platform
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


class Stopped(BaseException):  # not an Exception: a failing peer's handler must not eat it
    """SIGTERM (a `timeout` around a benchmark) inside `stop_on_sigterm`."""


@contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block a SIGTERM raises Stopped, so a benchmark can write the rows it has
    measured before it exits (with 128 + SIGTERM)."""
    def handler(signum, frame):
        raise Stopped

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Unavailable(Exception):
    """A peer that cannot run here; the message says why (shown in the table)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], None], device: torch.device, budget_s: float = 1.0,
            max_iters: int = 20, min_iters: int = 3, warmup: bool = True,
            host_times: list[float] | None = None) -> float:
    """Median seconds of fn() after one warm-up call (unless warmup=False: CPU smoke runs,
    whose times mean nothing); fewer repeats for slow functions. host_times: gets each
    call's host seconds, from its start until fn returns (on CUDA, before the device is
    waited for: the time to issue its work; close to the device time, the device waited for
    the host)."""
    if warmup:
        fn()
        sync(device)
    times = []
    t_end = time.perf_counter() + budget_s
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() < t_end):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            fn()
            if host_times is not None:
                host_times.append(time.perf_counter() - t0)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
            if host_times is not None:
                host_times.append(times[-1])
        if times[-1] > budget_s:  # one slow call is enough of a sample
            break
    return statistics.median(times)


def peak_memory(fn: Callable[[], None], device: torch.device) -> float | None:
    """GiB allocated at peak during fn() above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def versions() -> str:
    """torch's and the installed peers' versions, read from their package metadata: importing
    deepspeed to ask it takes seconds (it probes the accelerators), which a benchmark's time
    limit may not leave before its table is written."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"torch {torch.__version__}"]
    for name in ("triton", "transformers", "deepspeed"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:  # optional peers
            pass
    return ", ".join(parts)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_block(title: str, command: str, device: torch.device, body: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"\n## {title}\n\n- date: {now}\n- device: {device_name(device)}\n"
            f"- versions: {versions()}\n- command: `{command}`\n\n{body}\n")


def command_line(module: str, argv: list[str] | None) -> str:
    """The command that ran `module` with argv (None: this process's arguments), quoted as a
    shell would need it."""
    return f"python -m {module} {shlex.join(argv if argv is not None else sys.argv[1:])}".rstrip()


def append_results(path: str | None, title: str, command: str, device: torch.device,
                   body: str) -> None:
    """Append a results_block to the file at path (None: nowhere)."""
    if path:
        with open(path, "a") as fh:
            fh.write(results_block(title, command, device, body))


def scratch_dir(path: str | None, prefix: str) -> Path:
    """`path` (kept), or a new temporary folder that is deleted when the process exits, also
    after an error or a time limit's SIGTERM: a benchmark's random model can take gigabytes."""
    if path:
        return Path(path)
    root = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root
