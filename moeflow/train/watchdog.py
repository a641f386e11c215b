"""Which rank stopped answering: each rank's heartbeat in the job's store, read when a collective
times out, so the error names the ranks that did not answer instead of the one that waited.

Every rank runs one daemon thread that writes `{"t": wall time, "step", "phase"}` under
`moeflow/alive/<rank>` in the rendezvous store (its own client connection: `MASTER_ADDR` and
`MASTER_PORT`, as torchrun sets them) every `interval_s`; the training loop only sets `step` and
`phase` (attribute writes, no communication). A stopped or dead process stops writing; a rank that
is alive but slow keeps writing from a step or phase behind the others.

When a collective on this rank times out (`parallel.timeout_s`) or loses its peer, `diagnose`
reads every rank's entry and returns one line: the ranks whose heartbeat is older than three
intervals (stopped, hung in native code, or dead), else the ranks behind in step or phase, with
this rank's own step and phase, the setting to change, and the blamed ranks (for the launcher's
summary, `moeflow.launch.local`). A lost peer (a rank that died closes its connections at once,
long before any timeout) is told apart: `diagnose` then watches the heartbeats for the rank that
stopped beating and names it, with the step it last reported (a rank beats within `MIN_GAP_S` of
each new step, so that step is at most that old).

Example (a store of one process; rank 1's heartbeat is old):
    >>> import json, torch.distributed as dist
    >>> store = dist.HashStore()
    >>> dog = Watchdog(0, 2, timeout_s=20.0, store=store, interval_s=1.0)
    >>> dog.at(12, "forward")
    >>> dog.beat(now=100.0)
    >>> store.set("moeflow/alive/1", json.dumps({"t": 80.0, "step": 12, "phase": "backward"}))
    >>> line, blamed = dog.diagnose(now=100.5)
    >>> blamed, line[:82]
    ([1], 'rank 1 did not answer: its last heartbeat is 20 s old (step 12, backward), so it i')
"""

from __future__ import annotations

import datetime
import json
import os
import re
import threading
import time

import torch.distributed as dist

MIN_GAP_S = 0.1  # heartbeats on new steps are at most 10 a second
TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
PEER_LOST = re.compile(r"connection closed by peer|connection reset|broken pipe", re.IGNORECASE)


class HangError(RuntimeError):
    """A collective timed out or lost its peer; the message names the ranks at fault. `blamed`:
    those ranks."""

    def __init__(self, message: str, blamed: list[int]) -> None:
        super().__init__(message)
        self.blamed = blamed


def is_hang(exc: BaseException) -> bool:
    """A collective's timeout or a lost peer (gloo and NCCL word them like this)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and bool(TIMEOUT.search(text) or PEER_LOST.search(text))


def lost_peer(exc: BaseException) -> bool:
    """The collective failed because a peer closed its connection (it died), not on a timeout."""
    return bool(PEER_LOST.search(str(exc))) and not TIMEOUT.search(str(exc))


def _client(timeout_s: float):
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(
            host, int(port), is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )  # fmt: skip
    except (RuntimeError, ValueError):
        return None


class Watchdog:
    """See the module doc. `store`: default a new client of the rendezvous store (none in a
    world of one, where there is no one to wait for)."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        timeout_s: float,
        store=None,
        interval_s: float | None = None,
    ) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = interval_s or max(0.5, min(5.0, timeout_s / 6))
        self.step, self.phase = 0, "start-up"
        self.setting = "timeout_s"  # the `parallel.` field `timeout_s` comes from
        self.store = store if store is not None else (_client(10.0) if world_size > 1 else None)
        self._stop = threading.Event()
        self._moved = threading.Event()  # a new step: beat now, so a stopped rank's is current
        self._thread = None

    def start(self) -> Watchdog:
        if self.store is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="moeflow-heartbeat", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def at(self, step: int, phase: str) -> None:
        if step != self.step:
            self._moved.set()
        self.step, self.phase = step, phase

    def beat(self, now: float | None = None) -> None:
        entry = {"t": time.time() if now is None else now, "step": self.step, "phase": self.phase}
        self.store.set(f"moeflow/alive/{self.rank}", json.dumps(entry))

    def _run(self) -> None:
        """Beat every `interval_s`, and soon after each new step (at most `MIN_GAP_S` apart)."""
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception:  # the store is gone (the job is ending): nothing left to report
                return
            self._moved.wait(self.interval_s)
            self._moved.clear()
            self._stop.wait(MIN_GAP_S)

    def _entries(self) -> dict[int, dict] | None:
        keys = [f"moeflow/alive/{r}" for r in range(self.world_size)]
        try:
            found = {}
            for r, key in enumerate(keys):
                if self.store.check([key]):
                    found[r] = json.loads(self.store.get(key))
            return found
        except Exception:
            return None

    def diagnose(self, now: float | None = None, lost_peer: bool = False) -> tuple[str, list[int]]:
        """One line naming the ranks at fault (see the module doc), and those ranks.
        `lost_peer`: the collective failed because a peer closed its connection, not because it
        waited too long."""
        if lost_peer and self.store is not None:
            return self._lost_peer()
        now = time.time() if now is None else now
        here = f"rank {self.rank} waited in step {self.step} ({self.phase})"
        name = f"parallel.{self.setting}"
        fix = f"{name} = {self.timeout_s:g} s; if that rank is only slow, raise {name}"
        entries = None if self.store is None else self._entries()
        if entries is None:
            return f"{here} past {fix} (no heartbeat store to tell which rank is stuck)", []
        stale = 3 * self.interval_s
        silent = [r for r in range(self.world_size) if now - entries.get(r, {}).get("t", 0) > stale]
        if silent:
            parts = []
            for r in silent[:8]:
                e = entries.get(r)
                parts.append(
                    f"rank {r} did not answer: "
                    + ("it never reported" if e is None else
                       f"its last heartbeat is {now - e['t']:.0f} s old (step {e['step']}, "
                       f"{e['phase']})")
                )  # fmt: skip
            more = f" and {len(silent) - 8} more" if len(silent) > 8 else ""
            return (
                f"{'; '.join(parts)}{more}, so it is stopped, hung or dead; {here} past {fix}",
                silent,
            )
        latest = max(e["step"] for e in entries.values())
        behind = sorted(r for r, e in entries.items() if e["step"] < latest)
        if behind:
            names = ", ".join(
                f"rank {r} (step {entries[r]['step']}, {entries[r]['phase']})" for r in behind[:8]
            )
            return f"{names} behind the others (alive but slow or stuck); {here} past {fix}", behind
        return f"every rank is alive at step {latest}; {here} past {fix}", []

    def _lost_peer(self) -> tuple[str, list[int]]:
        """A peer closed its connection a moment ago: its heartbeat has not aged yet, so watch
        the heartbeats for up to three intervals for the rank that stopped beating."""
        here = f"rank {self.rank} was in step {self.step} ({self.phase})"
        deadline = time.time() + 3 * self.interval_s + 0.5
        while True:
            now, entries = time.time(), self._entries() or {}
            gone = [
                r
                for r in range(self.world_size)
                if r != self.rank and now - entries.get(r, {}).get("t", 0) > 2 * self.interval_s
            ]
            if gone or now > deadline:
                break
            time.sleep(min(0.2, self.interval_s / 2))
        if not gone:
            return (
                f"a collective lost its connection to a peer while every rank still answers (a "
                f"network fault?); {here}",
                [],
            )
        parts = []
        for r in gone[:8]:
            e = entries.get(r)
            last = "it never reported" if e is None else (
                f"its last heartbeat was in step {e['step']} ({e['phase']})"
            )  # fmt: skip
            parts.append(f"rank {r} closed its connection and stopped: {last}")
        return f"{'; '.join(parts)}, so it died or was killed; {here}", gone
