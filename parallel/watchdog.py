"""Heartbeats through the rendezvous store, so that a dead rank is named, not waited on."""

from __future__ import annotations

import os
import sys
import threading
import time

import torch.distributed as dist

EXIT_CODE = 17


class Watchdog:
    """Each rank bumps a counter in the store; a rank whose counter stalls past the timeout
    (by the watcher's own clock, so node clocks need not agree) is reported as failed."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float):
        self.store = dist.PrefixStore("moe-watchdog/", store)
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = max(0.2, min(2.0, timeout_s / 10))
        self._beats = 0
        self._seen: dict[int, tuple[int, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moe-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Mark this rank finished (never reported as failed) and stop the thread."""
        self._stop.set()
        try:
            self.store.set(f"done/{self.rank}", "1")
        except Exception:  # noqa: BLE001 - the store may already be gone at shutdown
            pass

    def _beat(self) -> None:
        self._beats += 1
        self.store.set(f"beat/{self.rank}", str(self._beats))

    def culprit(self) -> list[int]:
        """The failed rank(s) another rank already identified and published, if any."""
        if self.store.check(["culprit"]):
            return [int(r) for r in self.store.get("culprit").decode().split(",")]
        return []

    def fail(self, failed: list[int], message: str) -> None:
        """Publish the failed ranks, print, and exit. Rank 0 hosts the store: it stays a
        little so that the other ranks can read the culprit instead of losing the store."""
        try:
            self.store.set("culprit", ",".join(str(r) for r in failed))
        except Exception:  # noqa: BLE001
            pass
        if self.rank == 0:
            print(f"[moe.parallel] ERROR {message}", file=sys.stderr, flush=True)
            time.sleep(self.timeout_s + 2 * self.interval)
            os._exit(EXIT_CODE)
        die(message)

    def failed_ranks(self) -> list[int]:
        """Ranks whose heartbeat has not moved for timeout_s (and that did not finish), or the
        ones another rank already named."""
        published = self.culprit()
        if published:
            return published
        now = time.monotonic()
        failed = []
        for r in range(self.world_size):
            if r == self.rank:
                continue
            if self.store.check([f"done/{r}"]):
                continue
            beat = int(self.store.get(f"beat/{r}")) if self.store.check([f"beat/{r}"]) else 0
            last = self._seen.get(r)
            if last is None or last[0] != beat:
                self._seen[r] = (beat, now)
            elif now - last[1] > self.timeout_s:
                failed.append(r)
        return failed

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                failed = self.failed_ranks()
            except Exception as e:  # noqa: BLE001 - losing the store is itself the failure
                if self._stop.is_set():
                    return
                die(f"rank {self.rank}: lost the rendezvous store hosted by rank 0 "
                    f"({os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')})"
                    f": rank 0 failed ({type(e).__name__}: {e})")
            if failed:
                self.fail(failed, f"rank {self.rank}: rank(s) {failed} stopped responding for "
                          f"more than {self.timeout_s:g} s (process died or hung); ending this "
                          "rank")

    def wait_for_failure(self) -> list[int]:
        """After a collective raised: poll up to timeout_s for the rank(s) that went silent."""
        deadline = time.monotonic() + self.timeout_s + 2 * self.interval
        while time.monotonic() < deadline:
            try:
                failed = self.failed_ranks()
            except Exception:  # noqa: BLE001
                return [0]  # the store lives on rank 0
            if failed:
                return failed
            time.sleep(self.interval / 2)
        return []


def die(message: str) -> None:
    """Print and leave at once: a collective a dead peer never joins would block shutdown."""
    print(f"[moe.parallel] ERROR {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_CODE)
