"""The lines a user reads when something goes wrong say what happened and a fix that works: a
resumed run names the changed field, a run with nothing left to train says so, damaged checkpoints
point at --overwrite, a linked-out shard is refused, a dead peer is named as dead (not as a
timeout), non-finite stops advise what applies, a full disk advises what can help, a pickled HF
weights file is refused in our words, `plan` and `simulate` refuse what they cannot use, the
launcher passes its ranks' bad-input status on, and skip mode writes no checkpoint mid-streak."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moeflow.launch.cli import main
from moeflow.train import checkpoint as ckpt
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.nonfinite import NonFiniteError, NonFiniteGuard
from moeflow.train.trainer import Trainer
from moeflow.train.watchdog import Watchdog, lost_peer
from tests.test_cli import ROOT, write_config
from tests.test_faults import _stats, one_line_error, read_only_folders, tiny


def _fails(capsys, args: list[str], code: int = 2) -> str:
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == code
    return one_line_error(capsys)


def test_resume_names_what_changed_and_what_to_do(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=4, every=2)
    assert main(["train", str(cfg), "--quiet"]) == 0
    args = ["train", str(cfg), "--quiet", "--resume"]
    line = _fails(capsys, [*args, "--model.moe.num_experts", "8"])
    assert line.endswith(
        "was written for another model: model.moe.num_experts is 4 there, 8 here "
        "(--model.moe.num_experts); drop it to resume with the checkpoint's [model]"
    )
    assert len(line) < 300
    line = _fails(capsys, [*args, "--train.steps", "3"])
    assert re.search(r"is at step 4, past train\.steps \(3\): nothing left to train; pass a", line)
    for path in ckpt.list_checkpoints(out / "checkpoints"):
        next(path.glob("*.distcp")).write_bytes(b"damaged")
    with pytest.raises(SystemExit):
        main(["train", str(cfg), "--quiet", "--resume", "--train.steps", "8"])
    line = capsys.readouterr().err.strip().splitlines()[-1]  # after a warning per damaged one
    assert "2 damaged" in line and "pass --overwrite instead of --resume to start afresh" in line
    assert main(["train", str(cfg), "--quiet", "--overwrite"]) == 0  # that advice works


def test_a_shard_replaced_by_a_link_out_of_the_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=2, every=2)
    assert main(["train", str(cfg), "--quiet"]) == 0
    path = ckpt.latest_checkpoint(out / "checkpoints")
    shard = next(path.glob("*.distcp"))
    outside = tmp_path / "elsewhere.distcp"
    shutil.copy(shard, outside)  # the same bytes: the manifest's digest alone would pass it
    shard.unlink()
    shard.symlink_to(outside)
    line = _fails(capsys, ["train", str(cfg), "--quiet", "--resume", str(path),
                           "--train.steps", "4"])  # fmt: skip
    assert f"{shard.name} in checkpoint {str(path)!r} is a link to {str(outside)!r}, out" in line


def test_a_dead_peer_is_named_as_dead_not_as_a_timeout():
    store = dist.HashStore()
    dog = Watchdog(0, 3, timeout_s=180.0, store=store, interval_s=0.1)
    dog.at(41, "forward and backward")
    dog.beat()
    for rank, step in ((1, 41), (2, 40)):
        store.set(f"moeflow/alive/{rank}", json.dumps({"t": time.time(), "step": step,
                                                        "phase": "backward"}))  # fmt: skip
    alive = Watchdog(1, 3, timeout_s=180.0, store=store, interval_s=0.1)
    alive.at(41, "backward")
    alive.start()  # rank 1 keeps beating; rank 2 never beats again (killed)
    try:
        line, blamed = dog.diagnose(lost_peer=True)
    finally:
        alive.close()
    assert blamed == [2]
    assert line == (
        "rank 2 closed its connection and stopped: its last heartbeat was in step 40 (backward), "
        "so it died or was killed; rank 0 was in step 41 (forward and backward)"
    )
    assert "timeout" not in line
    assert lost_peer(RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500"))
    assert not lost_peer(RuntimeError("Timed out waiting 180000ms for recv operation"))


def test_nonfinite_stops_advise_what_applies():
    grad_only = torch.tensor([0.0, 1.0, 0.0, 0.0])  # finite losses, a NaN gradient norm
    stop = NonFiniteGuard("stop", max_skips=3, rank=0, world_size=2)
    with pytest.raises(NonFiniteError) as err:
        stop.decide(7, grad_only, loss=2.0, grad_norm=math.nan)
    assert "the gradient norm is nan (gradients are summed over all ranks; every rank's loss " in (
        str(err.value)
    )
    skip = NonFiniteGuard("skip", max_skips=2, rank=0, world_size=2)
    assert not skip.decide(7, grad_only, loss=2.0, grad_norm=math.nan)
    with pytest.raises(NonFiniteError) as err:
        skip.decide(8, grad_only, loss=2.0, grad_norm=math.nan)
    assert "on_nonfinite" not in str(err.value)  # it is already "skip"
    assert "raise train.max_nonfinite_skips" in str(err.value)


@pytest.mark.parametrize("kept", [1, 2])
def test_a_full_disk_advises_what_can_help(tmp_path, kept):
    root = tmp_path / "checkpoints"
    for step in range(1, kept + 1):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "moeflow.json").write_text("{}")
    line = ckpt._describe(OSError(errno.ENOSPC, "No space left on device"), root)
    if kept == 1:
        assert "checkpoint.keep" not in line and "a larger disk" in line
    else:
        assert "lower checkpoint.keep (the 2 kept checkpoints take room)" in line


def test_skip_mode_defers_a_checkpoint_due_mid_streak(tmp_path):
    cfg = tiny(tmp_path / "a", steps=6, on_nonfinite="skip", max_nonfinite_skips=3)
    cfg = type(cfg).from_dict({**cfg.to_dict(), "checkpoint": {"every": 2, "keep": 5}})
    runtime = init_distributed(60)
    try:
        with Trainer(cfg, runtime, resume=None, overwrite=False) as trainer:
            weight = trainer.model.blocks[0].ffn.router.weight
            weight.register_hook(lambda g: g * math.nan if trainer.step + 1 == 4 else g)
            trainer.run(quiet=True)
    finally:
        shutdown(runtime)
    saved = [p.name for p in ckpt.list_checkpoints(tmp_path / "a" / "checkpoints")]
    assert saved == ["step_00000002", "step_00000005", "step_00000006"]


def test_a_pickled_hf_weights_file_is_refused_in_one_line(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "weights"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=4))  # fmt: skip
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    state = {**model.state_dict(), "extra": shutil.rmtree}  # a pickled object, not a tensor
    torch.save(state, folder / "pytorch_model.bin")
    config = tmp_path / "c.toml"
    config.write_text(
        f'[model.moe]\nnum_experts = 2\n[upcycle]\nweights = "{folder}"\n[train]\nsteps = 1\n'
        f'seq_len = 16\nout_dir = "{tmp_path / "run"}"\n[metrics]\nprogress = false\n'
    )
    capsys.readouterr()  # save_pretrained's progress bar
    line = _fails(capsys, ["train", str(config), "--quiet"])
    assert "holds pickled objects besides tensors, which moeflow does not unpickle" in line
    assert "weights_only" not in line


@pytest.mark.parametrize(
    "text, want",
    [('"loads": [[1e308, 2.0]], "co_routing": []', r"'loads' holds 1e\+308 at \(0, 0\), more than"),
     ('"num_experts": 3, "loads": [[1.0, 2.0]], "co_routing": []',
      r"the header's num_experts \(3\) disagrees with 'loads' \(shape \(1, 2\)\)")],
)  # fmt: skip
def test_plan_refuses_corrupt_counts_and_headers(tmp_path, capsys, text, want):
    stats = _stats(tmp_path, '{"format": "moeflow.routing_stats", "version": 1, ' + text + "}")
    assert re.search(want, _fails(capsys, ["plan", stats, "--ranks", "2"]))


def test_plan_json_and_simulate_world_size_are_checked_before_work(tmp_path, capsys, monkeypatch):
    stats = _stats(tmp_path, '{"format": "moeflow.routing_stats", "version": 1, '
                             '"loads": [[1.0, 2.0]], "co_routing": []}')  # fmt: skip
    read_only_folders(monkeypatch)
    line = _fails(capsys, ["plan", stats, "--ranks", "2", "--json", str(tmp_path / "p.json")])
    assert "is not writable (Read-only file system); choose another path" in line
    config = write_config(tmp_path / "c.toml", tmp_path / "run")
    line = _fails(capsys, ["simulate", str(config), "--world-size", "8", "0"])
    assert line.endswith("error: --world-size (0) must be >= 1: the number of GPUs to predict for")


def test_the_launcher_passes_its_ranks_bad_input_status_on(tmp_path):
    cfg = write_config(tmp_path / "c.toml", tmp_path / "run", steps=2, ep=2)
    proc = subprocess.run(
        [sys.executable, "-m", "moeflow", "launch", "--nproc", "2", "--", "train", str(cfg),
         "--resume", str(tmp_path / "no" / "step_00000002")],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_rank_beats_on_each_new_step_so_its_last_step_is_current():
    store = dist.HashStore()
    dog = Watchdog(0, 2, timeout_s=600.0, store=store, interval_s=100.0).start()
    try:
        for step in (1, 2, 3):
            dog.at(step, "forward and backward")
            deadline = time.monotonic() + 5
            while json.loads(store.get("moeflow/alive/0"))["step"] != step:
                assert time.monotonic() < deadline, "no heartbeat for the new step"
                time.sleep(0.01)
    finally:
        dog.close()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the ranks in /proc")
def test_a_killed_rank_is_named_as_dead_by_the_launcher(tmp_path):
    from moeflow.launch.local import rank_pids
    from tests.test_cli import start
    from tests.test_run_ownership import wait_for_records

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=5000, ep=2)
    launcher = start("train", str(cfg), "--parallel.timeout_s", "6", nproc=2)
    wait_for_records(launcher, out, 5)
    os.kill(rank_pids(launcher.pid)[1], signal.SIGKILL)
    log = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 1
    line = next(x for x in log.splitlines() if x.startswith("moeflow launch: rank 0 failed"))
    assert re.search(
        r"rank 1 closed its connection and stopped: its last heartbeat was in step \d+ \(.*\), so "
        r"it died or was killed; rank 0 was in step \d+",
        line,
    ), line
    assert "timeout" not in line and "alive" not in line
