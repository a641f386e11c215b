"""`moeflow launch`: N ranks on this machine under torchrun (standalone rendezvous), with a one-line
account of a failure and SIGTERM handled as a single `moeflow train` handles it.

- Each rank's error (the one line `moeflow` prints) is also written to torchrun's per-rank error
  file (`record_error`), so when ranks fail the launcher prints which rank failed first, its exit
  code and that line (torchrun's own summary is an exception's text, which `launch` catches).
- SIGTERM and SIGINT (Ctrl-C) to the launcher are forwarded to the ranks (its child processes)
  instead of torchrun tearing them down: they finish their step, write a checkpoint and exit (0
  after SIGTERM, 130 after Ctrl-C), and so does the launcher, with one line; a second Ctrl-C is
  forwarded too and stops the ranks at once. This needs `/proc` to find the children (Linux);
  elsewhere torchrun handles both.
- The ranks die with the launcher: each asks the kernel for SIGKILL when the launcher process
  ends (`die_with_launcher`, Linux), so a launcher killed with SIGKILL leaves no rank training on
  (and holding its output directory) behind it.
- Once a rank has exited, a rank that stays stopped (SIGSTOP, Ctrl-Z: it cannot act on torchrun's
  SIGTERM, which would wait 30 s for it) for `STOPPED_GRACE_S` is killed (`_reap_stopped`), so a
  job with a stopped rank ends within `parallel.timeout_s` and a few seconds. Linux only too.

Example:
    >>> class Failure:  # what torchrun reports per rank
    ...     def __init__(self, code, message, timestamp):
    ...         self.exitcode, self.message, self.timestamp = code, message, timestamp
    >>> class Failed:
    ...     failures = {0: Failure(-15, "Signal 15 (SIGTERM) received by PID 7", 11),
    ...                 1: Failure(2, "data: val.bin is empty", 10)}
    ...     def get_first_failure(self):
    ...         return 1, self.failures[1]
    >>> print(summarize(Failed()))
    moeflow launch: rank 1 failed first (exit code 2): data: val.bin is empty
    moeflow launch: also failed: rank 0 (stopped by SIGTERM)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

ERROR_HANDLER = "torch.distributed.elastic.multiprocessing.errors.error_handler"
STOPPED_GRACE_S = 2.0


def record_error(line: str, blamed: list[int] | None = None) -> None:
    """Write this rank's one-line error where torchrun collects it (nothing outside torchrun);
    `blamed`: the ranks this rank found at fault (a hang: the ranks that did not answer)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    info = {"py_callstack": "", "timestamp": int(time.time()), "blamed": blamed or []}
    data = {"message": {"message": line, "extraInfo": info}}
    with contextlib.suppress(OSError):  # the error is printed on stderr anyway
        Path(path).write_text(json.dumps(data))


def summarize(failed) -> str:
    """Which rank failed first, its exit code and its first error line; then the others. A rank
    that reported others as not answering (a hang) puts those first: they are the cause."""
    rank, first = failed.get_first_failure()
    lines = []
    for r, f in sorted(failed.failures.items()):
        blamed = _blamed(f.message)
        if blamed:
            rank, first = r, f
            names = ", ".join(map(str, blamed))
            lines.append(f"moeflow launch: rank {names} did not answer (stopped, hung or dead)")
            break
    lines.append(
        f"moeflow launch: rank {rank} failed{'' if lines else ' first'} (exit code "
        f"{first.exitcode}): {_first_line(first.message)}"
    )
    others = [
        f"rank {r} ({f'exit code {f.exitcode}' if f.exitcode >= 0 else _signal(f.exitcode)})"
        for r, f in sorted(failed.failures.items())
        if r != rank
    ]
    if others:
        lines.append(f"moeflow launch: also failed: {', '.join(others)}")
    return "\n".join(lines)


def _blamed(message) -> list[int]:
    if isinstance(message, dict):
        return list(message.get("extraInfo", {}).get("blamed") or [])
    return []


def _signal(exitcode: int) -> str:
    try:
        return f"stopped by {signal.Signals(-exitcode).name}"
    except ValueError:
        return f"stopped by signal {-exitcode}"


def _first_line(message) -> str:
    if isinstance(message, dict):  # torchrun's error-file layout (as `record_error` writes it)
        message = message.get("message", message)
    text = message if isinstance(message, str) else json.dumps(message)
    lines = text.strip().splitlines()
    return lines[0] if lines else "(no message)"


def _children(parent: int | None = None) -> dict[int, str]:
    """{pid: state letter} of the children of `parent` (default: this process), from `/proc`."""
    me = os.getpid() if parent is None else parent
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == me:
            found[int(entry)] = fields[0]
    return found


class _Forwarder:
    """The launcher's SIGTERM / SIGINT handler: passes the signal on to the ranks and remembers
    the first one (how the launcher then exits)."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __call__(self, signum, frame) -> None:
        self.received = self.received or signum
        for pid in _children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


LAUNCHER_PID_ENV = "MOEFLOW_LAUNCHER_PID"


def die_with_launcher() -> None:
    """In a rank started by `moeflow launch` (Linux): have the kernel SIGKILL this process when the
    launcher ends (`PR_SET_PDEATHSIG`), and exit now if it has already ended. Nothing elsewhere."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): torchrun's own teardown still applies
    if os.getppid() != int(launcher):  # it ended before the request took effect
        os._exit(1)


def _rank_of(pid: int) -> int | None:
    """The global rank torchrun gave process `pid` (its `RANK` variable), None if not a rank."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def rank_pids(parent: int | None = None) -> dict[int, int]:
    """{rank: pid} of the ranks a launcher process (`parent`, default: this one) runs; Linux
    (`/proc`). For tools that watch a job from outside (`bench/soak.py`, the fault tests)."""
    ranks = {pid: _rank_of(pid) for pid in _children(parent)}
    return {rank: pid for pid, rank in sorted(ranks.items()) if rank is not None}


def _reap_stopped(nproc: int, done: threading.Event) -> None:
    """Polls the ranks until `done`: once fewer than `nproc` are left (one has exited), a rank
    stopped for `STOPPED_GRACE_S` gets SIGKILL (torchrun then reports it as killed)."""
    seen_all, stopped_since = False, {}
    while not done.wait(0.2):
        ranks = {pid: s for pid, s in _children().items() if _rank_of(pid) is not None}
        seen_all = seen_all or len(ranks) >= nproc
        if not seen_all or len(ranks) >= nproc:
            continue
        now = time.monotonic()
        stopped_since = {pid: stopped_since.get(pid, now) for pid, s in ranks.items() if s == "T"}
        for pid, since in stopped_since.items():
            if now - since >= STOPPED_GRACE_S:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def run_local(nproc: int, argv: list[str]) -> int:
    """Run `moeflow *argv` on `nproc` local ranks; the launcher's exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # torchrun logs that it has no error file of its own to copy the ranks' into: `summarize`
    # says what failed instead.
    logging.getLogger(ERROR_HANDLER).setLevel(logging.CRITICAL)
    flags = ["--standalone", f"--nproc-per-node={nproc}"]
    previous, done, forward = {}, threading.Event(), _Forwarder()
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the ranks inherit it: die_with_launcher
    if Path("/proc/self/stat").is_file():
        flags.append("--signals-to-handle=SIGHUP,SIGQUIT")
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        threading.Thread(target=_reap_stopped, args=(nproc, done), daemon=True).start()
    try:
        torchrun([*flags, "-m", "moeflow", *argv])
    except ChildFailedError as exc:
        codes = {f.exitcode for f in exc.failures.values()}
        if forward.received == signal.SIGINT and codes <= {130, -signal.SIGINT}:
            print("moeflow launch: stopped by Ctrl-C (SIGINT)", file=sys.stderr)
            return 130
        print(summarize(exc), file=sys.stderr)
        return launcher_status(codes)
    finally:
        done.set()
        os.environ.pop(LAUNCHER_PID_ENV, None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if forward.received == signal.SIGINT:
        print("moeflow launch: stopped by Ctrl-C (SIGINT) after a checkpoint", file=sys.stderr)
        return 130
    return 0


def launcher_status(codes: set[int]) -> int:
    """The launcher's exit status from its failed ranks' exit codes: 2 where every rank that
    exited reported bad input (status 2; the others were stopped by a signal), else 1.

    Example:
        >>> launcher_status({2, -15}), launcher_status({2, 1}), launcher_status({-9})
        (2, 1, 1)
    """
    exited = {c for c in codes if c >= 0}
    return 2 if exited == {2} else 1
