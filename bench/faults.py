"""Fault probe: the scenarios of a user, an operator and a hostile user run end to end against the
`moeflow` command, one row each (what was done, what came back, whether it is what the docs say).

    .venv/bin/python bench/faults.py            # every scenario, about 2-3 minutes on 2 cores
    .venv/bin/python bench/faults.py --only 4,5 # some of them, by number

Each scenario runs in a fresh temporary directory on a tiny config (2 layers, dim 32, 4 experts),
with 1 thread per rank. Linux only (it finds ranks in `/proc`). Exit status 1 if any row fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow.launch.local import rank_pids

ROOT = Path(__file__).resolve().parent.parent
TINY = """
[model]
dim = 32
n_layers = 2
n_heads = 2
max_seq_len = 32
[model.moe]
num_experts = 4
ffn_hidden_size = 32
[data]
max_bytes = 200000
[train]
steps = {steps}
seq_len = 32
micro_batch_size = 4
eval_every = 0
eval_windows = 16
out_dir = "{out}"
[parallel]
ep = {ep}
[metrics]
log_every = 1
progress = false
plot = false
[checkpoint]
every = {every}
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def config(folder: Path, steps=2000, ep=2, every=0) -> tuple[Path, Path]:
    out = folder / "run"
    path = folder / "c.toml"
    path.write_text(TINY.format(steps=steps, out=out, ep=ep, every=every))
    return path, out


def moeflow(*args: str, nproc: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moeflow"]
    cmd += ["launch", "--nproc", str(nproc), "--"] if nproc else []
    return subprocess.Popen(
        [*cmd, *args], cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip


def run(*args: str, nproc: int = 0) -> tuple[int, str]:
    proc = moeflow(*args, nproc=nproc)
    return proc.wait(timeout=300), proc.communicate()[0]


def records(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def wait_records(proc: subprocess.Popen, out: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    while len(records(out)) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the run ended early: {proc.communicate()[0][-500:]}")
        time.sleep(0.05)


def last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] not in "ZX"
    except OSError:
        return False


# -- the scenarios: each returns (ok, what came back) ---------------------------------------------
def copy_model(tmp: Path) -> tuple[bool, str]:
    import torch

    from moeflow.models.decoder import DecoderConfig, MoEDecoder
    from moeflow.moe.config import MoEConfig

    moe = MoEConfig(hidden_size=32, num_experts=4, ffn_hidden_size=32)
    cfg = DecoderConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=16, moe=moe)
    model = MoEDecoder(cfg)
    ids = torch.zeros(2, 16, dtype=torch.long)
    model(ids).sum().backward()
    clone = copy.deepcopy(model)
    torch.save(model, tmp / "model.pt")
    same = torch.equal(clone(ids), model(ids))
    return same, "deepcopy and torch.save after backward; the copy's logits equal the original's"


def second_run(tmp: Path) -> tuple[bool, str]:
    cfg, out = config(tmp)
    first = moeflow("train", str(cfg), nproc=2)
    try:
        wait_records(first, out, 3)
        code, text = run("train", str(cfg), "--resume", "--parallel.ep", "1")
        return code == 2 and "in use by another run" in text, f"exit {code}: {last_line(text)}"
    finally:
        os.killpg(first.pid, signal.SIGTERM)
        first.wait(timeout=120)


def ctrl_c(tmp: Path) -> tuple[bool, str]:
    cfg, out = config(tmp)
    launcher = moeflow("train", str(cfg), nproc=2)
    wait_records(launcher, out, 30)
    t0 = time.monotonic()
    os.killpg(launcher.pid, signal.SIGINT)
    text = launcher.communicate(timeout=120)[0]
    end = records(out)[-1]
    saved = (out / "checkpoints" / f"step_{end['step']:08d}" / "moeflow.json").is_file()
    ok = launcher.returncode == 130 and saved and "Traceback" not in text
    return ok, (
        f"exit {launcher.returncode} after {time.monotonic() - t0:.1f} s, "
        f"{len(text.strip().splitlines())} lines, checkpoint at step {end['step']}: {saved}"
    )


def kill_launcher(tmp: Path) -> tuple[bool, str]:
    cfg, out = config(tmp)
    launcher = moeflow("train", str(cfg), nproc=2)
    wait_records(launcher, out, 3)
    ranks = list(rank_pids(launcher.pid).values())
    launcher.kill()
    launcher.wait()
    t0 = time.monotonic()
    while any(alive(p) for p in ranks) and time.monotonic() - t0 < 15:
        time.sleep(0.05)
    gone = not any(alive(p) for p in ranks)
    return gone, f"{len(ranks)} ranks {'gone' if gone else 'STILL RUNNING'} after " \
        f"{time.monotonic() - t0:.2f} s"  # fmt: skip


def replay(tmp: Path) -> tuple[bool, str]:
    cfg, _ = config(tmp, steps=30)
    auto = ["--parallel.mode", "auto", "--parallel.overlap_degree", "auto",
            "--tuner.first_check", "5", "--tuner.check_every", "5"]  # fmt: skip
    losses = []
    for name, extra in (("a", []), ("b", ["--tuner.replay", str(tmp / "a")])):
        code, text = run("train", str(cfg), "--train.out_dir", str(tmp / name), *auto, *extra,
                         nproc=2)  # fmt: skip
        if code:
            return False, f"run {name}: exit {code}: {last_line(text)}"
        losses.append([r["loss"] for r in records(tmp / name) if r["kind"] == "train"])
    decisions = sum(r["kind"] == "runtime" for r in records(tmp / "a"))
    same = losses[0] == losses[1]
    return same, f"{decisions} decisions replayed; 30 losses bitwise equal: {same}"


def dead_peer(tmp: Path) -> tuple[bool, str]:
    cfg, out = config(tmp)
    launcher = moeflow("train", str(cfg), nproc=2)
    wait_records(launcher, out, 20)
    os.kill(rank_pids(launcher.pid)[1], signal.SIGKILL)
    text = launcher.communicate(timeout=120)[0]
    line = next((x for x in text.splitlines() if "rank 0 failed" in x), last_line(text))
    return "rank 1 closed its connection" in line and "timeout" not in line, line[-160:]


def one_line(tmp: Path, *args: str) -> tuple[bool, str]:
    cfg, out = config(tmp, ep=1)
    code, text = run("train", str(cfg), "--quiet", *args)
    lines = text.strip().splitlines()
    ok = code == 2 and len(lines) == 1 and not out.exists()
    return ok, f"exit {code}, {len(lines)} line(s), out_dir left: {out.exists()}: {lines[-1][:120]}"


def linked_shard(tmp: Path) -> tuple[bool, str]:
    cfg, out = config(tmp, steps=2, ep=1, every=2)
    code, text = run("train", str(cfg), "--quiet")
    shard = next((out / "checkpoints" / "step_00000002").glob("*.distcp"))
    outside = tmp / "elsewhere.distcp"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)
    code, text = run("train", str(cfg), "--quiet", "--resume", "--train.steps", "4")
    return code == 2 and "is a link to" in text, f"exit {code}: {last_line(text)[-120:]}"


def launcher_status(tmp: Path) -> tuple[bool, str]:
    cfg, out = config(tmp, steps=2)
    code, _ = run("train", str(cfg), "--resume", str(tmp / "nothing"), nproc=2)
    return code == 2 and not out.exists(), f"exit {code}; out_dir left: {out.exists()}"


def upcycle_gpt2(tmp: Path) -> tuple[bool, str]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from moeflow.integrations.hf import upcycle

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64))
    layers = upcycle(model, num_experts=4, top_k=2)
    moe = model.transformer.h[0].mlp[0].config
    return layers == [0, 1], f"GPT-2 as built: {moe.activation}, ffn_bias {moe.ffn_bias}"


SCENARIOS = [
    ("2", "deepcopy / pickle after a training step", copy_model),
    ("3", "second run on a live out_dir", second_run),
    ("4", "Ctrl-C to the launcher's process group", ctrl_c),
    ("5", "kill -9 of moeflow launch", kill_launcher),
    ("6", "auto mode replayed: the same losses twice", replay),
    ("7", "SIGKILL of rank 1: the survivor's line", dead_peer),
    ("8", "--optim.lr 1e40", lambda t: one_line(t, "--optim.lr", "1e40")),
    ("8", "--model.max_seq_len 1e11", lambda t: one_line(t, "--model.max_seq_len", "100000000000")),
    ("9", "a shard replaced by a link outside", linked_shard),
    ("10", "launcher, bad --resume path", launcher_status),
    ("10", "--resume with nothing to resume", lambda t: one_line(t, "--resume")),
    ("12", "upcycle(gpt2, num_experts=4, top_k=2)", upcycle_gpt2),
]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated item numbers")
    args = p.parse_args()
    only = None if args.only is None else set(args.only.split(","))
    failed = 0
    print(f"{'item':>4}  {'scenario':<44} {'ok':<4} {'s':>5}  what came back")
    for item, name, scenario in SCENARIOS:
        if only is not None and item not in only:
            continue
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="moeflow-fault-") as tmp:
            try:
                ok, detail = scenario(Path(tmp))
            except Exception as exc:  # a probe that broke is a failed row, and says why
                ok, detail = False, f"{type(exc).__name__}: {exc}"
        failed += not ok
        seconds = time.monotonic() - t0
        print(f"{item:>4}  {name:<44} {'yes' if ok else 'NO':<4} {seconds:5.1f}  {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
