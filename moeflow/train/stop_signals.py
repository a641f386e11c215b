"""How a run is asked to stop: SIGTERM (Slurm's warning before the time limit, `kill`) and a first
Ctrl-C (SIGINT) ask it to finish the step, write a checkpoint and exit; a second Ctrl-C stops it at
once (`KeyboardInterrupt`). The request is only recorded here; the trainer shares it with the other
ranks in the step's flag all-reduce, so every rank stops after the same step.

Example:
    >>> import os
    >>> stop = StopSignals()
    >>> with stop:
    ...     os.kill(os.getpid(), signal.SIGTERM)
    >>> stop.requested, stop.signal, stop.describe(7)
    (True, 'SIGTERM', 'SIGTERM: stopping after step 7, writing a checkpoint')
"""

from __future__ import annotations

import signal


class StopSignals:
    """Handlers for SIGTERM and SIGINT while a run trains (a context manager: the previous
    handlers come back when it ends). `requested`: a stop was asked for on this rank; `signal`:
    the first signal's name."""

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._previous: dict = {}

    def install(self) -> None:
        self._previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
        }

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == "SIGINT":
            raise KeyboardInterrupt  # the second Ctrl-C
        self.requested = True
        self.signal = self.signal or signal.Signals(signum).name

    def describe(self, step: int) -> str:
        """The line a stopping run prints (this rank's signal, or another rank's)."""
        why = {"SIGINT": "Ctrl-C (SIGINT)", None: "another rank's stop signal"}
        again = " (Ctrl-C again stops at once)" if self.signal == "SIGINT" else ""
        name = why.get(self.signal, self.signal)
        return f"{name}: stopping after step {step}, writing a checkpoint{again}"
