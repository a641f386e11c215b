"""A run owns its output directory and stops cleanly: a second run on the same `out_dir` is refused
in one line naming the first (host and pid), a lock that a killed run held is free again, Ctrl-C
finishes the step, checkpoints and exits 130 (a second Ctrl-C stops at once), and the ranks of
`moeflow launch` die with their launcher."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeflow.launch.cli import main
from moeflow.launch.local import rank_pids
from moeflow.train import checkpoint as ckpt
from moeflow.train.run_lock import LOCK_NAME, RunLock
from tests.test_cli import start, write_config

LINUX = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds ranks in /proc")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for_records(proc: subprocess.Popen, out: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ((out / "metrics.jsonl").is_file() and len(records(out)) >= n):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_a_second_run_is_refused_and_a_dead_runs_lock_is_free(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=2)
    out.mkdir()
    held = RunLock.acquire(out)
    for args in (["--resume"], [], ["--overwrite"]):
        with pytest.raises(SystemExit) as stop:
            main(["train", str(cfg), "--quiet", *args])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"moeflow: error: train.out_dir ({str(out)!r}) is in use by another run (host "
            f"{socket.gethostname()}, pid {os.getpid()}, started " + err[0].split("started ", 1)[1]
        ]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    held.release()
    # A holder killed with SIGKILL leaves no stale lock: the kernel drops it with the process.
    code = (f"from moeflow.train.run_lock import RunLock; lock = RunLock.acquire({str(out)!r}); "
            "print('held', flush=True); import time; time.sleep(60)")  # fmt: skip
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(SystemExit):
        main(["train", str(cfg), "--quiet"])
    assert f"pid {holder.pid}," in capsys.readouterr().err
    holder.kill()
    holder.wait()
    assert main(["train", str(cfg), "--quiet"]) == 0
    assert [r["kind"] for r in records(out)][-1] == "end"


def test_bad_input_leaves_no_out_dir_behind(tmp_path, capsys):
    out = tmp_path / "fresh"
    cfg = write_config(tmp_path / "c.toml", out, steps=2)
    with pytest.raises(SystemExit) as stop:
        main(["train", str(cfg), "--quiet", "--resume"])  # nothing to resume
    assert stop.value.code == 2 and "no checkpoint under" in capsys.readouterr().err
    assert not out.exists()


@LINUX
def test_ctrl_c_checkpoints_a_second_run_is_refused_and_ranks_die_with_the_launcher(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=2000, ep=2)
    launcher = start("train", str(cfg), nproc=2)
    wait_for_records(launcher, out, 3)
    # 1. A second run on the same directory, while the first writes: one line, nothing written.
    before = (out / "metrics.jsonl").read_text()
    second = subprocess.run(
        [sys.executable, "-m", "moeflow", "train", str(cfg), "--resume", "--parallel.ep", "1"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    rank0 = rank_pids(launcher.pid)[0]
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"is in use by another run (host {socket.gethostname()}, pid " \
        f"{rank0}," in lines[0], lines  # fmt: skip
    assert (out / "metrics.jsonl").read_text().startswith(before)
    assert not list((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else True
    # 2. Ctrl-C (SIGINT to the launcher's process group): the step ends, a checkpoint, exit 130.
    os.killpg(launcher.pid, signal.SIGINT)
    log = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 130, log
    assert "Traceback" not in log and "SignalException" not in log
    tail = log.strip().splitlines()[-5:]
    assert re.fullmatch(r"throughput: [\d,]+ tokens/s \([\d,]+ per rank x 2 ranks\) over \d+ "
                        r"step\(s\), \d+\.\d\d s of training", tail.pop(1)), log  # fmt: skip
    assert tail == [
        f"Ctrl-C (SIGINT): stopping after step {records(out)[-1]['step']}, writing a checkpoint "
        "(Ctrl-C again stops at once)",
        f"checkpoint: {ckpt.latest_checkpoint(out / 'checkpoints')}",
        f"metrics:    {out / 'metrics.jsonl'}",
        "moeflow launch: stopped by Ctrl-C (SIGINT) after a checkpoint",
    ], log
    # The start line of this replicated run (ep 2): the model's parameters, this rank's experts.
    assert re.search(r"(^|\n)moeflow train: 2 rank\(s\) \(dp=1, ep=2\) on cpu; 0\.05M parameters, "
                     r"0\.04M on this rank \(its experts\); data: ", log), log  # fmt: skip
    assert log.count("no MFU: no known peak FLOP/s for a CPU") == 1  # said once, by rank 0
    end = records(out)[-1]
    assert end["kind"] == "end" and end["signal"] is True
    assert end["tokens_per_s"] == 2 * end["tokens_per_s_per_rank"] > 0 and "mfu" not in end
    saved = ckpt.latest_checkpoint(out / "checkpoints")
    assert saved is not None and saved.name == f"step_{end['step']:08d}"
    # 3. The launcher killed with SIGKILL: its ranks die with it, and the directory is free.
    launcher = start("train", str(cfg), "--resume", nproc=2)
    wait_for_records(launcher, out, len(records(out)) + 2)
    ranks = list(rank_pids(launcher.pid).values())
    assert len(ranks) == 2
    launcher.kill()
    launcher.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in ranks), "ranks outlived their launcher"
    last = ckpt.latest_checkpoint(out / "checkpoints")
    resumed = subprocess.run(
        [sys.executable, "-m", "moeflow", "train", str(cfg), "--resume", "--quiet",
         "--train.steps", str(int(last.name.split("_")[1]) + 1), "--parallel.ep", "1"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_checkpoints_and_a_second_one_stops_at_once(tmp_path, capsys, monkeypatch, presses):
    """Ctrl-C at step 3 (the signal to this process, in the step): the step ends, a checkpoint is
    written and the run exits 130. A second Ctrl-C while that checkpoint is written stops at
    once: exit 130, one line, and no checkpoint."""
    from moeflow.train.trainer import Trainer

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=100_000, every=0)
    step, save = Trainer.train_step, Trainer.save

    def train_step(self, metrics):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, metrics)

    def interrupted_save(self):
        os.kill(os.getpid(), signal.SIGINT)
        return save(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    if presses == 2:
        monkeypatch.setattr(Trainer, "save", interrupted_save)
        with pytest.raises(SystemExit) as stop:
            main(["train", str(cfg), "--quiet"])
        assert stop.value.code == 130
        assert capsys.readouterr().err.strip().splitlines() == [
            "moeflow: error: interrupted (Ctrl-C): stopped at once, nothing saved since the last "
            "checkpoint"
        ]
        assert ckpt.latest_checkpoint(out / "checkpoints") is None
    else:
        assert main(["train", str(cfg), "--quiet"]) == 130
        assert ckpt.latest_checkpoint(out / "checkpoints").name == "step_00000003"
        end = records(out)[-1]
        assert (end["kind"], end["step"], end["signal"]) == ("end", 3, True)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_a_file_system_without_locks_warns_and_runs(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        lock = RunLock.acquire(tmp_path)
    assert "cannot be locked (No locks available)" in caplog.text
    lock.release()
