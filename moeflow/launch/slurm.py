"""Render an sbatch file that runs `moeflow train` on N nodes: `srun` starts one `torchrun` per
node, and the torchruns meet by c10d rendezvous on the job's first node.

Shell safety: `#SBATCH` lines are read by sbatch, not by a shell, and cannot be quoted, so their
values (job name, partition, account, time, log path) must match a conservative pattern or are
rejected. Everything that reaches the shell (config path, overrides, venv) goes through
`shlex.quote`.

Example:
    >>> script = render_sbatch(SlurmJob(nodes=2, gpus_per_node=8), "cfg.toml", [])
    >>> "--rdzv-backend=c10d" in script and "#SBATCH --nodes=2" in script
    True
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

_SAFE = {
    "job_name": re.compile(r"^[A-Za-z0-9._-]{1,64}$"),
    "partition": re.compile(r"^[A-Za-z0-9._,-]{1,64}$"),
    "account": re.compile(r"^[A-Za-z0-9._-]{1,64}$"),
    "time": re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$"),
    "output": re.compile(r"^[A-Za-z0-9._/%-]{1,255}$"),
}


@dataclass(kw_only=True, frozen=True)
class SlurmJob:
    """One sbatch job. `port`: the c10d rendezvous port on the first node. `signal_s`: Slurm sends
    SIGTERM this long before the time limit, so the trainer can checkpoint and exit 0."""

    nodes: int
    gpus_per_node: int
    job_name: str = "moeflow"
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    cpus_per_task: int | None = None
    output: str = "moeflow-%j.out"
    port: int = 29500
    signal_s: int = 120
    venv: str | None = None

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"slurm --{name.replace('_', '-')} ({value!r}) must be >= 1")
        for name, pattern in _SAFE.items():
            value = getattr(self, name)
            if value is not None and not pattern.match(value):
                raise ValueError(
                    f"slurm --{name.replace('_', '-')} ({value!r}) contains characters sbatch "
                    f"or the shell would misread; allowed: {pattern.pattern}"
                )
        if not 1024 <= self.port <= 65535:
            raise ValueError(f"slurm --port ({self.port}) must be in 1024..65535")
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise ValueError(f"slurm --cpus-per-task ({self.cpus_per_task}) must be >= 1")


def render_sbatch(job: SlurmJob, config_path: str, train_args: list[str]) -> str:
    """The sbatch script (a string); `train_args` go after `moeflow train CONFIG`."""
    sbatch = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={job.gpus_per_node}",
        f"--output={job.output}",
        f"--signal=TERM@{job.signal_s}",
    ]
    for name in ("partition", "account", "time", "cpus_per_task"):
        value = getattr(job, name)
        if value is not None:
            sbatch.append(f"--{name.replace('_', '-')}={value}")
    train = " ".join(shlex.quote(a) for a in ["-m", "moeflow", "train", config_path, *train_args])
    lines = [
        "#!/bin/bash",
        "# Rendered by `moeflow slurm`. Submit with: sbatch <this file>",
        *(f"#SBATCH {opt}" for opt in sbatch),
        "set -euo pipefail",
    ]
    if job.venv is not None:
        lines.append(f"source {shlex.quote(job.venv.rstrip('/') + '/bin/activate')}")
    lines += [
        'head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        "# One torchrun per node; they rendezvous (c10d) on the first node. On Slurm's SIGTERM",
        "# the ranks finish the step, checkpoint and exit 0 (torchrun waits 30 s, then kills).",
        "srun --kill-on-bad-exit=1 torchrun \\",
        '  --nnodes="$SLURM_NNODES" \\',
        f"  --nproc-per-node={job.gpus_per_node} \\",
        '  --rdzv-id="$SLURM_JOB_ID" \\',
        "  --rdzv-backend=c10d \\",
        f'  --rdzv-endpoint="$head_node:{job.port}" \\',
        f"  {train}",
    ]
    return "\n".join(lines) + "\n"
