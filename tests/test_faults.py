"""Faults and hostile input (issue 15): a diverged, corrupted or full run never costs a good
checkpoint and says why in one line."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moeflow.launch.cli import main
from moeflow.launch.local import STOPPED_GRACE_S, rank_pids
from moeflow.train import checkpoint as ckpt
from moeflow.train.config import RunConfig
from moeflow.train.distributed import init_distributed, shutdown
from moeflow.train.nonfinite import NonFiniteError, NonFiniteGuard
from moeflow.train.trainer import Trainer, train
from tests.distributed import run_on_ranks
from tests.test_cli import ROOT, write_config


def tiny(out: Path, steps: int = 4, ep: int = 1, **train_kw) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"dim": 32, "n_layers": 1, "n_heads": 2, "max_seq_len": 32,
                      "moe": {"num_experts": 4, "ffn_hidden_size": 32}},
            "data": {"max_bytes": 100_000},
            "train": {"steps": steps, "seq_len": 32, "micro_batch_size": 2, "out_dir": str(out),
                      "eval_windows": 8, "eval_every": 0, **train_kw},
            "optim": {"warmup_steps": 1},
            "parallel": {"ep": ep},
            "checkpoint": {"every": 2, "keep": 2},
            "metrics": {"progress": False, "plot": False, "log_every": 1},
        }
    )  # fmt: skip


def read_only_folders(monkeypatch) -> None:
    """Every folder refuses moeflow's write probe as a read-only mount does (root passes
    `os.access` and chmod alike, so the probe itself is made to fail)."""
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".moeflow_write_probe_"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def all_finite(cfg: RunConfig, path: Path) -> bool:
    runtime = init_distributed(60)
    try:
        with Trainer(cfg, runtime, resume=str(path), overwrite=False) as trainer:
            trainer._load()
            tensors = [*trainer.model.parameters()]
            tensors += [v for s in trainer.optimizer.state.values() for v in s.values()]
            return all(bool(torch.isfinite(t).all()) for t in tensors)
    finally:
        shutdown(runtime)


@pytest.mark.parametrize(
    "override",
    [["--optim.lr", "inf"], ["--optim.weight_decay", "inf"], ["--parallel.timeout_s", "inf"],
     ["--optim.betas", "[0.9, nan]"], ["--model.moe.router.capacity_factor", "nan"],
     ["--optim.grad_clip", "-inf"]],
)  # fmt: skip
def test_every_float_field_must_be_finite(override):
    field = override[0][2:]
    with pytest.raises(ValueError, match=rf"^{field} \(.*\) must be a finite number"):
        RunConfig.from_dict({}, override)


def test_diverged_resume_stops_nonzero_and_keeps_a_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=4, every=2)
    assert main(["train", str(cfg), "--quiet"]) == 0
    root = out / "checkpoints"
    good = ckpt.list_checkpoints(root)
    assert [p.name for p in good] == ["step_00000002", "step_00000004"]
    capsys.readouterr()
    # lr 1000 from step 4: NaN within a few steps (this small model takes lr 50 finitely);
    # keep = 2 would rotate both good checkpoints away.
    args = ["train", str(cfg), "--resume", "--quiet", "--train.steps", "40", "--optim.lr", "1000",
            "--checkpoint.keep", "2"]  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 1
    line = one_line_error(capsys)
    assert re.search(r"error: step \d+: .*(not finite|is nan|is inf)", line)
    assert 'train.on_nonfinite = "stop" stopped the run before the update' in line
    newest = ckpt.latest_checkpoint(root)
    assert newest is not None and all_finite(RunConfig.from_toml(cfg), newest)
    records = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "error" and records[-1]["error"] == line.split("error: ", 1)[1]
    assert f"step {records[-1]['step']}:" in line  # the step that failed, as the message says
    # The run resumes from what was kept (at a sane learning rate).
    assert main(["train", str(cfg), "--resume", "--quiet", "--train.steps", "8"]) == 0


def test_skip_drops_the_update_and_stops_after_n_in_a_row(tmp_path):
    cfg = tiny(tmp_path / "a", steps=6, on_nonfinite="skip", max_nonfinite_skips=2)
    runtime = init_distributed(60)
    try:
        trainer = Trainer(cfg, runtime, resume=None, overwrite=False)
        weight = trainer.model.blocks[0].ffn.router.weight
        poison = {3}  # the steps (1-based) whose gradient is NaN
        weight.register_hook(lambda g: g * math.nan if trainer.step + 1 in poison else g)
        metrics = trainer.new_metrics()
        snapshots = []
        for _ in range(4):
            trainer.train_step(metrics)
            snapshots.append([p.detach().clone() for p in trainer.model.parameters()])
        assert trainer.guard.skipped == 1 and trainer.step == 4
        unchanged = [torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2], strict=True)]
        assert all(unchanged)  # step 3 was skipped: no parameter moved
        assert not all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3], strict=True))
        poison.update({5, 6})
        trainer.train_step(metrics)
        with pytest.raises(NonFiniteError, match=r"step 6: .*2th step in a row"):
            trainer.train_step(metrics)
    finally:
        shutdown(runtime)


def test_guard_counts_skips_in_a_row_and_names_the_ranks():
    guard = NonFiniteGuard("skip", max_skips=3, rank=1, world_size=4)
    flags = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 1.0])  # loss NaN on ranks 1 and 3
    assert not guard.decide(5, flags, loss=math.nan, grad_norm=2.0)
    assert guard.decide(6, torch.zeros(6), loss=1.0, grad_norm=1.0) and guard.in_a_row == 0
    stop = NonFiniteGuard("stop", max_skips=3, rank=1, world_size=4)
    with pytest.raises(NonFiniteError, match=r"step 5: .*rank\(s\) 1, 3; this rank's: nan"):
        stop.decide(5, flags, loss=math.nan, grad_norm=2.0)


def test_a_checkpoint_with_nan_is_never_written(tmp_path):
    runtime = init_distributed(60)
    try:
        trainer = Trainer(tiny(tmp_path / "a"), runtime, resume=None, overwrite=False)
        trainer.train_step(trainer.new_metrics())
        first = trainer.save()
        trainer.train_step(trainer.new_metrics())
        with torch.no_grad():  # as a bug outside the guarded step might leave it
            trainer.model.blocks[0].ffn.experts.w1[1, 0, 0] = math.inf
        with pytest.raises(NonFiniteError, match=r"rank 0: blocks\.0\.ffn\.experts\.1\.w1"):
            trainer.save()
        root = tmp_path / "a" / "checkpoints"
        assert ckpt.list_checkpoints(root) == [first] and not list(root.glob(".*partial"))
    finally:
        shutdown(runtime)


def _flip(path: Path, offset: int, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, min(offset + n, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_damaged_checkpoints_are_named_and_resume_falls_back(tmp_path, caplog):
    out = tmp_path / "run"
    train(tiny(out, steps=4), quiet=True)
    root = out / "checkpoints"
    older, newest = ckpt.list_checkpoints(root)
    cfg = tiny(out, steps=6)

    def resume(which):
        runtime = init_distributed(60)
        try:
            with Trainer(cfg, runtime, resume=which, overwrite=False) as trainer:
                trainer._load()
                return trainer.resume_path
        finally:
            shutdown(runtime)

    data = next(newest.glob("*.distcp"))
    pristine = data.read_bytes()
    _flip(data, len(pristine) // 2)  # 4 KiB of flipped bytes inside the tensors
    with pytest.raises(ValueError, match=rf"is corrupt: {data.name}: its SHA-256 is not"):
        resume(str(newest))  # an explicit path never falls back
    with caplog.at_level("WARNING"):
        assert resume("latest") == older
    assert f"skipping the damaged checkpoint {newest}" in caplog.text
    data.write_bytes(pristine[:-100])
    with pytest.raises(ValueError, match=rf"{data.name}: {len(pristine) - 100} bytes, "):
        resume(str(newest))
    data.unlink()
    with pytest.raises(ValueError, match=rf"{data.name}: the file is missing"):
        resume(str(newest))
    next(older.glob("*.distcp")).unlink()
    with pytest.raises(ValueError, match=r"no intact checkpoint .*2 damaged"):
        resume("latest")


@pytest.mark.parametrize("escape", ["../../elsewhere/__0_0.distcp", "/etc/passwd"])
def test_metadata_paths_are_confined_to_the_checkpoint(tmp_path, escape):
    out = tmp_path / "run"
    path = train(tiny(out, steps=2), quiet=True).checkpoint
    metadata = pickle.loads((path / ".metadata").read_bytes())
    for info in metadata.storage_data.values():
        info.relative_path = escape
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    meta = json.loads((path / "moeflow.json").read_text())
    meta["files"][".metadata"] = ckpt.digest(path / ".metadata")  # a consistent forgery
    (path / "moeflow.json").write_text(json.dumps(meta))
    runtime = init_distributed(60)
    try:
        with (
            pytest.raises(ValueError, match=rf"names the file '{escape}', which is not a plain"),
            Trainer(tiny(out), runtime, resume=str(path), overwrite=False) as trainer,
        ):
            trainer._load()
    finally:
        shutdown(runtime)


def _full_disk_on_rank_1(rank, world_size, out):
    """Two ranks save twice; the second save's rank-1 write fails as a full disk does."""
    cfg = tiny(Path(out), steps=2, ep=2)
    trainer = Trainer(cfg, init_distributed(60), resume=None, overwrite=False)
    trainer.train_step(trainer.new_metrics())
    first = trainer.save()
    trainer.train_step(trainer.new_metrics())
    real = ckpt._write_json

    def full(path, data):
        if rank == 1 and path.name.startswith("rank_"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    ckpt._write_json = full
    try:
        trainer.save()
    except ckpt.CheckpointError as exc:
        message = str(exc)
    finally:
        ckpt._write_json = real
    root = Path(out) / "checkpoints"
    return message, str(first), [p.name for p in root.iterdir()]


def test_a_full_disk_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    results = run_on_ranks(_full_disk_on_rank_1, 2, args=(str(tmp_path / "run"),))
    (m0, first, left), (m1, _, _) = results
    assert m0 == m1 and "\n" not in m0
    assert "rank 1: no space left on device in" in m0 and f"'{first}' is intact" in m0
    assert left == ["step_00000001"]  # the .partial directory is gone


def test_parallelize_takes_parallel_dims_or_says_what_to_pass():
    from torch import nn

    from moeflow import MoEConfig, MoELayer
    from moeflow.parallel import ParallelDims, parallelize

    runtime = init_distributed(60)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(MoELayer(MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8)))
        x = torch.randn(5, 8)
        before = model(x)
        assert parallelize(model, ParallelDims()) is model
        assert model[0].layout.group_size == 1 and torch.equal(model(x), before)
        with pytest.raises(TypeError, match=r"ctx must be a ParallelContext .* not dict"):
            parallelize(model, {"ep": 1})
    finally:
        shutdown(runtime)


def _tokens(folder: Path, train: list[int], val: list[int]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in (("train", train), ("val", val)):
        np.asarray(ids, dtype=np.uint16).tofile(folder / f"{name}.bin")
    return folder


@pytest.mark.parametrize(
    "case",
    ["out_dir is a file", "out_dir under a file", "read-only out_dir", "token id >= vocab",
     "empty .bin", "config is a directory", "validation shorter than a window", "lr past fp32",
     "max_seq_len past memory", "negative dim", "hf hidden_size a string", "hf heads not dividing",
     "nothing to resume"],
)  # fmt: skip
def test_bad_input_gives_one_line_before_the_first_step(tmp_path, capsys, monkeypatch, case):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=2)
    args = ["train", str(cfg), "--quiet"]
    ok_train = list(range(256)) * 40
    if case == "out_dir is a file":
        (tmp_path / "afile").write_text("x")
        args += ["--train.out_dir", str(tmp_path / "afile")]
        want = r"train\.out_dir \('.*afile'\) is a file, not a directory"
    elif case == "out_dir under a file":
        (tmp_path / "afile").write_text("x")
        args += ["--train.out_dir", str(tmp_path / "afile" / "run")]
        want = r"train\.out_dir \('.*afile/run'\) cannot be created: Not a directory"
    elif case == "read-only out_dir":
        read_only_folders(monkeypatch)
        want = r"train\.out_dir \('.*run'\) is not writable: Read-only file system"
    elif case == "token id >= vocab":
        data = _tokens(tmp_path / "tok", [*ok_train[:5000], 300, *ok_train], ok_train[:600])
        args += ["--data.kind", "tokens", "--data.path", str(data)]
        want = (
            r"data: train\.bin holds token id 300 at position 5000, outside "
            r"0\.\.model\.vocab_size - 1 \(255\)"
        )
    elif case == "empty .bin":
        data = _tokens(tmp_path / "tok", ok_train, [])
        args += ["--data.kind", "tokens", "--data.path", str(data)]
        want = r"data\.path: .*val\.bin is empty \(0 bytes\)"
    elif case == "config is a directory":
        args[1] = str(tmp_path)
        want = r"config file '.*' is a directory; pass a \.toml file"
    elif case == "lr past fp32":
        args += ["--optim.lr", "1e40"]
        want = r"optim\.lr \(1e\+40\) must be > 0 and at most 3\.4e\+38, the largest fp32"
    elif case == "max_seq_len past memory":
        args += ["--model.max_seq_len", "100000000000"]
        want = r"the model needs [\d,.]+ GiB on this rank .* rope_cos \(100000000000, 8\), sized "
        want += r"by model\.max_seq_len: lower it"
    elif case == "negative dim":
        args += ["--model.dim", "-128"]
        want = r"^moeflow: error: model\.dim \(-128\) must be an integer >= 1$"
    elif case.startswith("hf "):
        shape = {"hidden_size": "big"} if "string" in case else {"num_attention_heads": 5}
        hf = {"model_type": "llama", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 1,
              "intermediate_size": 48, "num_attention_heads": 4, **shape}  # fmt: skip
        table = ", ".join(f"{k} = {json.dumps(v)}" for k, v in hf.items())
        text = cfg.read_text().replace("[model]\n", f"[model]\nhf_config = {{ {table} }}\n")
        for key in ("dim", "n_layers", "n_heads", "max_seq_len"):
            text = re.sub(rf"^{key} = .*\n", "", text, flags=re.M)
        cfg.write_text(text)
        want = r"model\.hf_config: LlamaConfig refused it: .*" + (
            "expected int, got str" if "string" in case else "not a multiple of the number"
        )
    elif case == "nothing to resume":
        args += ["--resume"]
        want = r"--resume: no checkpoint under '.*checkpoints'; run without --resume to start"
    else:
        data = _tokens(tmp_path / "tok", ok_train, list(range(20)))
        args += ["--data.kind", "tokens", "--data.path", str(data)]
        want = r"data: the validation split has 20 tokens, fewer than one window of 33"
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    assert re.search(want, one_line_error(capsys))
    assert not out.exists()  # nothing ran, and no empty out_dir is left behind


def _moeflow(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "moeflow", *args], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **kw,
    )  # fmt: skip


def test_launch_names_the_failing_rank_and_exits_0_on_sigterm(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=400, ep=2, every=0)
    proc = _moeflow("launch", "--nproc", "2", "--", "train", str(cfg))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher only, as a user's `kill` does
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, log
    end = json.loads(metrics.read_text().splitlines()[-1])
    assert end["kind"] == "end" and end["signal"] is True
    assert (out / "checkpoints" / f"step_{end['step']:08d}" / "moeflow.json").is_file()
    assert "Traceback" not in log and "SignalException" not in log
    # A diverging run on 2 ranks: the launcher's last lines name a rank, its exit code, the step.
    proc = _moeflow("launch", "--nproc", "2", "--", "train", str(cfg), "--resume",
                    "--optim.lr", "1000")  # fmt: skip
    log = proc.communicate(timeout=180)[0]
    assert proc.returncode == 1
    last = log.strip().splitlines()[-2:]
    assert re.match(r"moeflow launch: rank [01] failed first \(exit code 1\): step \d+: ", last[0])
    assert re.match(r"moeflow launch: also failed: rank [01] \(", last[1]), last


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks in /proc")
def test_a_stopped_rank_is_named_and_ends_the_job_within_the_timeout(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=2000, ep=2)
    proc = _moeflow("launch", "--nproc", "2", "--", "train", str(cfg), "--parallel.timeout_s", "5")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    stopped = time.monotonic()
    os.kill(rank_pids(proc.pid)[1], signal.SIGSTOP)
    log = proc.communicate(timeout=120)[0]
    took = time.monotonic() - stopped
    assert proc.returncode == 1
    # the timeout, the launcher's grace for a stopped rank (not torchrun's 30 s), slack
    assert took < 5 + STOPPED_GRACE_S + 10
    last = log.strip().splitlines()[-3:]
    assert last[0] == "moeflow launch: rank 1 did not answer (stopped, hung or dead)", log
    assert re.match(
        r"moeflow launch: rank 0 failed \(exit code 1\): rank 1 did not answer: its "
        r"last heartbeat is \d+ s old \(step \d+, .*parallel\.timeout_s = 5 s",
        last[1],
    )
    record = json.loads(metrics.read_text().splitlines()[-1])
    assert record["kind"] == "error" and "rank 1 did not answer" in record["error"]


# -- moeflow plan on hostile or huge statistics ----------------------------------------------------
def _stats(tmp_path: Path, text: str) -> str:
    path = tmp_path / "stats.json"
    path.write_text(text)
    return str(path)


BASE = '{"format": "moeflow.routing_stats", "version": 1, "loads": [[1.0, 2.0]], "co_routing": []'


@pytest.mark.parametrize(
    "text, args, want",
    [(BASE.replace("2.0", "9" * 400) + "}", [], r"not numeric arrays \(int too large"),
     (BASE + ', "meta": ' + "[" * 100_000 + "]" * 100_000 + "}", [], r"nests too deeply"),
     (BASE + ', "layer_names": 5}', [], r"'layer_names' must be a list of strings, got 5"),
     (BASE + ', "meta": [1]}', [], r"'meta' must be a table, got list"),
     (BASE + "}", ["--time-limit", "nan"], r"placement\.time_limit_s \(nan\) must be a finite"),
     (BASE + "}", ["--traffic-weight", "nan"], r"placement\.traffic_weight \(nan\) must be a fi"),
     (BASE + "}", ["--node-weight", "inf"], r"placement\.node_weight \(inf\) must be a finite")],
)  # fmt: skip
def test_plan_refuses_hostile_statistics_in_one_line(tmp_path, capsys, text, args, want):
    with pytest.raises(SystemExit) as stop:
        main(["plan", _stats(tmp_path, text), "--ranks", "2", "--method", "greedy", *args])
    assert stop.value.code == 2
    assert re.search(want, one_line_error(capsys))


def _greedy_by_scanning(trace, cfg):
    """The reference greedy: every copy scans every rank (EPLB's rule as written)."""
    from moeflow.placement.baselines import _copies

    slots = cfg.slots(trace.num_experts)
    layers = []
    for layer in range(trace.num_layers):
        ranks, load = [[] for _ in slots], [0.0] * len(slots)
        for e, w in sorted(_copies(trace, cfg, layer), key=lambda c: (-c[1], c[0])):
            free = [g for g in range(len(slots)) if len(ranks[g]) < slots[g] and e not in ranks[g]]
            g = min(free, key=lambda r: (load[r], r))
            ranks[g].append(e)
            load[g] += w
        layers.append(ranks)
    return layers


def _replicas_by_scanning(load_E, num_slots, num_ranks):
    counts = np.ones(len(load_E), dtype=np.int64)
    for _ in range(num_slots - len(load_E)):
        per_copy = np.where(counts < num_ranks, load_E / counts, -np.inf)
        counts[int(np.argmax(per_copy))] += 1
    return counts


@pytest.mark.parametrize("experts, ranks, extra", [(64, 8, 4), (96, 16, 16), (40, 8, 0)])
def test_fast_baselines_equal_the_scanning_rules(experts, ranks, extra):
    from moeflow.placement.baselines import contiguous, greedy, replica_counts, round_robin
    from moeflow.placement.problem import PlacementConfig
    from moeflow.placement.trace import RoutingTrace

    for seed in range(5):
        rng = np.random.default_rng(seed)
        loads = rng.zipf(1.5, size=(2, experts)).astype(float)
        loads[:, :3] = loads[0, 0]  # ties
        trace = RoutingTrace(loads, np.zeros((1, experts, experts)))
        cfg = PlacementConfig(num_ranks=ranks, num_slots=experts + extra,
                              slots_per_rank=-(-(experts + extra) // ranks))  # fmt: skip
        counts = replica_counts(loads[0], experts + extra, ranks)
        assert counts.tolist() == _replicas_by_scanning(loads[0], experts + extra, ranks).tolist()
        assert greedy(trace, cfg).layers == _greedy_by_scanning(trace, cfg)
        for build in (contiguous, round_robin):  # in-order fills with replicas never dead-end
            build(trace, cfg).validate(trace, cfg)


def test_the_ilp_says_when_it_cannot_and_auto_is_never_worse_than_per_layer(capfd):
    from moeflow.placement.planner import plan
    from moeflow.placement.problem import PlacementConfig
    from moeflow.placement.trace import RoutingTrace, synthetic_trace

    rng = np.random.default_rng(0)
    huge = RoutingTrace(rng.zipf(1.5, size=(1, 4096)).astype(float), np.zeros((0, 4096, 4096)))
    result = plan(huge, PlacementConfig(num_ranks=64), "ilp")
    assert result.status == "too_large" and "max_layer_binaries" in result.notes[0]
    assert (
        result.placement.layers
        == plan(huge, PlacementConfig(num_ranks=64), "greedy").placement.layers
    )
    for seed in range(3):
        trace = synthetic_trace(16, num_layers=3, tokens=4000, seed=seed)
        scores = {
            mode: plan(trace, PlacementConfig(num_ranks=4, decompose=mode, time_limit_s=3), "ilp")
            for mode in ("layer", "auto")
        }
        assert scores["layer"].status == "optimal"  # each layer solved to optimality
        assert scores["auto"].metrics.objective <= scores["layer"].metrics.objective + 1e-6
    assert capfd.readouterr().out == ""  # no solver banner on stdout
