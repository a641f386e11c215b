"""End-to-end runs of the `moeflow` command in subprocesses: resume after a kill or SIGTERM gives
the uninterrupted run's losses; bad input fails before any work; dry runs; Slurm scripts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moeflow.launch.slurm import SlurmJob, render_sbatch
from moeflow.moe.layout import ExpertLayout
from moeflow.parallel import MODES
from moeflow.train.memory_plan import human_bytes as _bytes

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
[optim]
warmup_steps = 3
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
plot = {plot}
[checkpoint]
every = {every}
"""


def write_config(path: Path, out: Path, steps=40, ep=1, every=0, plot="false") -> Path:
    path.write_text(TINY.format(steps=steps, out=out, ep=ep, every=every, plot=plot))
    return path


def moeflow(*args: str, nproc: int = 0, **kw) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moeflow"]
    if nproc:
        cmd += ["launch", "--nproc", str(nproc), "--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw
    )


def start(*args: str, nproc: int = 0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "moeflow"]
    if nproc:
        cmd += ["launch", "--nproc", str(nproc), "--"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*cmd, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip


def train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            pytest.fail(f"run ended before the interruption:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not get far enough in time")
        time.sleep(0.01)


def test_resume_after_kill_gives_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    done = moeflow("train", str(write_config(tmp_path / "a.toml", straight)), "--quiet")
    assert done.returncode == 0, done.stderr
    expected = train_losses(straight)
    assert sorted(expected) == list(range(1, 41))

    out = tmp_path / "killed"
    cfg = write_config(tmp_path / "b.toml", out, every=5)
    proc = start("train", str(cfg), "--quiet")
    wait_for(lambda: (out / "checkpoints" / "step_00000005").is_dir(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    latest = max(p.name for p in (out / "checkpoints").glob("step_*"))
    assert latest < "step_00000040", "the run finished before the kill; nothing was tested"
    resumed = moeflow("train", str(cfg), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(out) == expected  # bitwise: same floats, every step, no duplicates


def prepared_mixture(tmp_path: Path, config: Path, out: Path) -> Path:
    """TINY on a 0.7 / 0.3 mixture of two prepared folders (the test BPE tokenizer over two
    halves of the embedded corpus's documents), windows at documents, attention masked."""
    from moeflow.data.prepare import prepare
    from tests.data_corpus import documents, tokenizer_folder, write_jsonl

    texts = documents(600_000)
    halves = {"code": texts[::2], "web": texts[1::2]}
    for name, part in halves.items():
        if not (tmp_path / name / "manifest.json").is_file():
            jsonl = write_jsonl(tmp_path / f"{name}.jsonl", part)
            prepare([str(jsonl)], tmp_path / name, str(tokenizer_folder()), workers=1,
                    val_percent=25, progress=False)  # fmt: skip
    text = TINY.format(steps=40, out=out, ep=2, every=0, plot="false")
    text = text.replace(
        "[data]\nmax_bytes = 200000\n",
        f"""[data]
kind = "prepared"
window_start = "document"
document_mask = true
[[data.sources]]
path = "{tmp_path / "code"}"
weight = 0.7
[[data.sources]]
path = "{tmp_path / "web"}"
weight = 0.3
""",
    )
    text = text.replace("[model]\n", "[model]\nvocab_size = 2048\n")
    text = text.replace("micro_batch_size = 4", "micro_batch_size = 16")  # 1,280 windows
    config.write_text(text)
    return config


def test_sigterm_on_two_ranks_checkpoints_exits_and_resumes_exactly(tmp_path):
    """On a 0.7 / 0.3 mixture of prepared folders: SIGTERM checkpoints; the resumed run gives
    the uninterrupted losses exactly; validation reports each source."""
    straight = tmp_path / "straight"
    done = moeflow("train", str(prepared_mixture(tmp_path, tmp_path / "a.toml", straight)), nproc=2)
    assert done.returncode == 0, done.stderr
    expected = train_losses(straight)
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in records if r["kind"] == "val"]
    assert set(val["sources"]) == {"code", "web"} and val["val_bpb"] is not None
    # 40 steps x 16 windows x 2 ranks, counted as drawn: each source's share within 1%
    drawn = records[-1]["windows_by_source"]
    assert sum(drawn.values()) == 1280 and abs(drawn["web"] / 1280 - 0.3) <= 0.01

    out = tmp_path / "preempted"
    cfg = prepared_mixture(tmp_path, tmp_path / "b.toml", out)
    proc = start("train", str(cfg), nproc=2)
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.is_file() and metrics.read_text().count("\n") >= 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm signals every process of the job step
    log = proc.communicate(timeout=120)[0]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert records[-1]["kind"] == "end" and records[-1]["signal"] is True, log
    stopped = records[-1]["step"]
    assert 3 <= stopped < 40
    assert (out / "checkpoints" / f"step_{stopped:08d}" / "moeflow.json").is_file()
    resumed = moeflow("train", str(cfg), "--resume", nproc=2)
    assert resumed.returncode == 0, resumed.stderr
    assert train_losses(out) == expected


def test_main_job_writes_metrics_plot_and_checkpoint(tmp_path):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=6, plot="true")
    done = moeflow("train", str(cfg))
    assert done.returncode == 0, done.stderr
    assert (out / "training.png").stat().st_size > 10_000
    assert (out / "checkpoints" / "step_00000006" / "moeflow.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 6 and len(train[-1]["tokens_per_expert"]) == 2
    assert sum(train[-1]["tokens_per_expert"][0]) == 4 * 32 * 2  # every (token, top-2) pair
    assert {"aux_loss", "z_loss", "tokens_per_s", "dropped_fraction", "max_load_violation"} <= set(
        train[-1]
    )
    assert records[-2]["kind"] == "val" and records[-2]["val_bpb"] > 0
    assert "bits/byte vs unigram baseline" in done.stderr + done.stdout


def in_process(capsys, *args: str) -> tuple[int, str]:
    """`moeflow *args` in this process (no interpreter start-up): (exit code, stderr)."""
    from moeflow.launch.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_bad_input_fails_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=2)
    code, err = in_process(capsys, "train", str(cfg), "--resume")
    assert code == 2 and "no checkpoint under" in err
    assert in_process(capsys, "train", str(cfg), "--quiet")[0] == 0
    before = (out / "metrics.jsonl").read_bytes()
    code, err = in_process(capsys, "train", str(cfg))
    assert code == 2 and "already holds 1 checkpoint(s) of another run" in err
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing touched
    code, err = in_process(capsys, "train", str(cfg), "--train.stpes", "3")
    assert code == 2 and "did you mean train.steps" in err
    code, err = in_process(
        capsys, "train", str(cfg), "--resume", "--model.dim", "64", "--model.n_heads", "4"
    )
    assert code == 2 and "written for another model" in err
    code, err = in_process(capsys, "train", str(cfg), "--placement.replica_slots", "1")
    assert code == 2 and "placement.replica_slots (1) needs parallel.ep > 1" in err
    assert (out / "metrics.jsonl").read_bytes() == before
    # Through the launcher, as a user runs it: one subprocess.
    r = moeflow("train", str(write_config(tmp_path / "d.toml", out, ep=2)), nproc=3)
    assert r.returncode == 2 and "world size (3) is not divisible by parallel.ep (2)" in r.stderr
    assert in_process(capsys, "train", str(cfg), "--overwrite", "--quiet")[0] == 0


def test_dry_run_of_the_gpu_recipe_on_a_fake_world():
    r = moeflow(
        "train", "examples/configs/olmoe_1b7b_64gpu.toml", "--dry-run", "--world-size", "64"
    )
    assert r.returncode == 0, r.stderr
    assert "world 64 = dp 8 x ep 8" in r.stdout and "6.919B total" in r.stdout
    r = moeflow(
        "train", "examples/configs/olmoe_1b7b_64gpu.toml", "--dry-run", "--world-size", "60"
    )
    assert r.returncode == 2 and "not divisible by parallel.ep (8)" in r.stderr


def test_dry_run_prints_expert_memory_per_layer_and_mode_at_more_ranks_than_experts():
    # 64 experts over ep = 128: every rank holds half of one expert's FFN columns.
    r = moeflow(
        "train", "examples/configs/olmoe_1b7b_64gpu.toml", "--dry-run", "--world-size", "128",
        "--parallel.ep", "128", "--parallel.dp_shard", "1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "1 expert per rank as 1/2 F-slice" in r.stdout
    layout = ExpertLayout.canonical(64, 1024, 128)
    held = 4 * layout.rank_elements(2048, 2)  # fp32, SwiGLU
    assert held == 4 * 3 * 512 * 2048  # one half expert: 12 MiB
    peaks = {m: held + 4 * layout.gather_peak_elements(m, 2048, 2) for m in MODES}
    line = (
        f"16 MoE layers (blocks.0.ffn ... blocks.15.ffn): experts {_bytes(held)} per rank of "
        f"{_bytes(128 * held)}; peak in a "
        f"call: ep {_bytes(peaks['ep'])}, sharded {_bytes(peaks['sharded'])}, dp "
        f"{_bytes(peaks['dp'])}"
    )
    assert line in r.stdout, r.stdout
    assert r.stdout.count(": experts ") == 1  # identical layers: one line with their count
    assert peaks["sharded"] == held < peaks["ep"] < peaks["dp"]


@pytest.mark.parametrize("nodes", [1, 4])
def test_slurm_script_is_valid_bash_with_rendezvous(tmp_path, nodes):
    job = SlurmJob(nodes=nodes, gpus_per_node=8, partition="gpu", time="12:00:00", venv="/x y/v")
    script = render_sbatch(job, "my configs/run.toml", ["--train.out_dir", "/runs/a b;rm -rf ~"])
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert f"#SBATCH --nodes={nodes}" in script and "#SBATCH --signal=TERM@120" in script
    assert "--rdzv-backend=c10d" in script and '--rdzv-endpoint="$head_node:29500"' in script
    assert "'my configs/run.toml'" in script and "'/runs/a b;rm -rf ~'" in script
    assert "source '/x y/v/bin/activate'" in script


@pytest.mark.parametrize(
    "field", [{"job_name": "a;b"}, {"job_name": "two words"}, {"partition": "gpu'"},
              {"time": "1h; ls"}, {"output": "$(x).out"}, {"nodes": 0}],
)  # fmt: skip
def test_slurm_rejects_values_that_would_break_the_shell(field):
    kwargs = {"nodes": 1, "gpus_per_node": 8, **field}
    with pytest.raises(ValueError, match=next(iter(field)).replace("_", "-")):
        SlurmJob(**kwargs)


def test_slurm_cli_validates_the_config_and_never_overwrites(tmp_path, capsys):
    cfg = str(ROOT / "examples" / "configs" / "olmoe_1b7b_64gpu.toml")
    r = moeflow("slurm", "--nodes", "4", "--gpus-per-node", "8", cfg)
    assert r.returncode == 0 and '--nnodes="$SLURM_NNODES"' in r.stdout
    # The refusals in this process (the command's code path, no interpreter start-up each).
    code, err = in_process(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "4", cfg)
    assert code == 2 and "world size (4) is not divisible by parallel.ep (8)" in err
    target = tmp_path / "job.sbatch"
    target.write_text("mine")
    code, _ = in_process(capsys, "slurm", "--nodes", "1", "--gpus-per-node", "8", "-o",
                         str(target), cfg)  # fmt: skip
    assert code == 2 and target.read_text() == "mine"


def test_plan_reads_the_trainers_statistics_and_compares_methods(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.toml", out, steps=3)
    assert moeflow("train", str(cfg)).returncode == 0
    stats = out / "routing_stats.json"
    data = json.loads(stats.read_text())
    assert data["layer_names"] == ["blocks.0.ffn", "blocks.1.ffn"]
    assert len(data["co_routing"]) == 1 and len(data["co_routing"][0]) == 4
    result = tmp_path / "plan.json"
    r = moeflow("plan", str(stats), "--ranks", "2", "--json", str(result))
    assert r.returncode == 0, r.stderr
    for method in ("contiguous", "round_robin", "greedy", "ilp"):
        assert method in r.stdout
    assert "placement (" in r.stdout and "rank 1:" in r.stdout
    plans = {p["method"]: p for p in json.loads(result.read_text())["results"]}
    assert plans["ilp"]["objective"] <= plans["greedy"]["objective"]
    assert plans["ilp"]["status"] in ("optimal", "time_limit")
    assert sorted(e for ids in plans["ilp"]["placement"][0] for e in ids) == [0, 1, 2, 3]
    # Never overwrite what the user has; bad problems and bad statistics: one clear line (in
    # this process: the command's code path without an interpreter's start-up each).
    code, err = in_process(capsys, "plan", str(stats), "--ranks", "2", "--json", str(result))
    assert code == 2 and "pass --force" in err
    code, err = in_process(capsys, "plan", str(stats), "--ranks", "2", "--slots-per-rank", "1")
    assert code == 2 and "more experts than slots" in err
    code, err = in_process(capsys, "plan", str(stats), "--ranks", "2", "--num-slots", "3")
    assert code == 2 and "num_slots (3) is below the expert count (4)" in err
    data["loads"][0][1] = -1.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    code, err = in_process(capsys, "plan", str(bad), "--ranks", "2")
    assert code == 2 and "negative count (-1.0) at (0, 1)" in err
