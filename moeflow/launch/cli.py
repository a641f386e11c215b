"""The `moeflow` command line.

    moeflow train CONFIG.toml [--resume [CKPT]] [--overwrite] [--section.key VALUE ...]
    moeflow train CONFIG.toml --dry-run [--world-size N] [--gpu-memory 80GB]  # what fits
    moeflow launch --nproc N -- train CONFIG.toml ...          # N local ranks (torchrun)
    moeflow slurm --nodes N --gpus-per-node G [--partition P --time T ...] CONFIG.toml [...]
    moeflow plan STATS.json --ranks R [--ranks-per-node G]   # expert placement from routing
    moeflow simulate CONFIG.toml [--world-size 8 64 512 2048]  # predicted modes past this machine
    moeflow data prepare INPUT [...] --out DIR [--tokenizer PATH]  # corpora -> token shards

`train` runs as a plain process (a world of one) or as every rank of a torchrun job. Errors in the
config or the command line exit with status 2 and one line that says what to fix; a run stopped
on a NaN or infinite loss (`train.on_nonfinite`) or by a collective that timed out
(`parallel.timeout_s`) exits with status 1 and one line naming the step or the ranks that did not
answer; a run stopped by SIGTERM finishes its step, writes a checkpoint and exits 0; Ctrl-C
(SIGINT) does the same and exits 130, and a second Ctrl-C stops at once (exit 130, no checkpoint
since the last one).

Example:
    >>> main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--job-name", "a;b", "c.toml"])
    Traceback (most recent call last):
    ...
    SystemExit: 2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moeflow.launch.arguments import OneLineParser, UsageError, dry_run_world_size, memory_bytes
from moeflow.launch.local import LAUNCHER_PID_ENV, die_with_launcher, record_error, run_local
from moeflow.launch.slurm import SlurmJob, render_sbatch
from moeflow.train.config import RunConfig
from moeflow.train.nonfinite import NonFiniteError
from moeflow.train.watchdog import HangError
from moeflow.utils.validate import check_path, readable

EXIT_INTERRUPTED = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


def _train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="moeflow train", allow_abbrev=False,
        description="Train the MoE decoder from a TOML config; --section.key VALUE overrides.",
    )  # fmt: skip
    p.add_argument("config", help="TOML config, e.g. examples/configs/tiny_cpu.toml")
    p.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="CKPT",
        help="continue from the latest complete checkpoint of train.out_dir (or from CKPT)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in out_dir")
    p.add_argument("--dry-run", action="store_true", help="validate and build, do not train")
    p.add_argument(
        "--world-size", default=None, metavar="N",
        help="with --dry-run: check the layout for this many ranks on a fake process group",
    )  # fmt: skip
    p.add_argument(
        "--gpu-memory", default=None, metavar="SIZE",
        help="with --dry-run: memory per device (80GB, 80GiB): says whether a rank's peak fits",
    )  # fmt: skip
    p.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda",
        help="with --dry-run: the devices the run is planned for (auto settings resolve for them)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p


def cmd_train(argv: list[str]) -> int:
    args, overrides = _train_parser().parse_known_args(argv)
    for given, flag in ((args.world_size, "--world-size"), (args.gpu_memory, "--gpu-memory")):
        if given is not None and not args.dry_run:
            raise UsageError(f"{flag} only applies to --dry-run")
    if args.resume not in (None, "latest"):
        check_path("--resume", args.resume)
    world = None if args.world_size is None else dry_run_world_size(args.world_size)
    memory = None if args.gpu_memory is None else memory_bytes(args.gpu_memory)
    cfg = RunConfig.from_toml(args.config, overrides)
    if args.dry_run:
        from moeflow.train.dry_run import dry_run, format_report

        report = dry_run(cfg, world, device=args.device, gpu_memory=memory)
        print(format_report(report))
        return 0
    from moeflow.train.resume_config import GivenModel
    from moeflow.train.trainer import train

    given = GivenModel.read(args.config, overrides)  # a resume refuses only what it changed
    result = train(cfg, args.resume, args.overwrite, args.quiet, given)
    if result.stop_signal == "SIGINT":
        # Under `moeflow launch` the launcher reports the interruption: a rank's non-zero status
        # would make torchrun tear down the ranks still writing their part of the checkpoint.
        return 0 if os.environ.get(LAUNCHER_PID_ENV) else EXIT_INTERRUPTED
    return 0 if result.last_step >= result.first_step else 1


def _launch_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="moeflow launch", allow_abbrev=False,
        description="Run `moeflow ...` on N local processes (torch.distributed.run, standalone).",
    )  # fmt: skip
    p.add_argument("--nproc", type=int, required=True, help="processes on this machine")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- train CONFIG.toml [...]")
    return p


def cmd_launch(argv: list[str]) -> int:
    args = _launch_parser().parse_args(argv)
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.nproc < 1:
        raise UsageError(f"--nproc ({args.nproc}) must be >= 1")
    if not rest or rest[0] != "train":
        raise UsageError(
            "moeflow launch runs a train command: moeflow launch --nproc N -- train ..."
        )
    targs, overrides = _train_parser().parse_known_args(rest[1:])
    cfg = RunConfig.from_toml(targs.config, overrides)  # fail here, not in N ranks
    if not targs.dry_run:
        dp = cfg.parallel.dp_for(args.nproc)
        if cfg.parallel.dp_shard != "auto":
            cfg.parallel.dp_shard_for(dp, None)
    return run_local(args.nproc, rest)


def _slurm_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="moeflow slurm", allow_abbrev=False,
        description="Print (or write) an sbatch file that runs `moeflow train` under torchrun.",
    )  # fmt: skip
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    for name in ("--partition", "--account", "--time", "--venv"):
        p.add_argument(name, default=None)
    p.add_argument("--job-name", default="moeflow")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--log", dest="output", default="moeflow-%j.out", help="Slurm's output file")
    p.add_argument("--port", type=int, default=29500, help="c10d rendezvous port")
    p.add_argument("-o", "--out", default=None, help="write the script here instead of stdout")
    p.add_argument("--force", action="store_true", help="with -o: replace an existing file")
    p.add_argument("config")
    return p


def cmd_slurm(argv: list[str]) -> int:
    args, train_args = _slurm_parser().parse_known_args(argv)
    job = SlurmJob(
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, job_name=args.job_name,
        partition=args.partition, account=args.account, time=args.time,
        cpus_per_task=args.cpus_per_task, output=args.output, port=args.port, venv=args.venv,
    )  # fmt: skip
    _, overrides = _train_parser().parse_known_args([args.config, *train_args])
    cfg = RunConfig.from_toml(args.config, overrides)
    cfg.parallel.dp_for(job.nodes * job.gpus_per_node)  # raises if ep does not divide the world
    script = render_sbatch(job, args.config, train_args)
    if args.out is None:
        sys.stdout.write(script)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        raise UsageError(f"-o {args.out}: the file exists; pass --force to replace it")
    out.write_text(script, encoding="utf-8")
    print(f"wrote {out}; submit with: sbatch {out}")
    return 0


def cmd_plan(argv: list[str]) -> int:
    from moeflow.launch.plan import cmd_plan as run_plan

    return run_plan(argv)


def cmd_simulate(argv: list[str]) -> int:
    from moeflow.launch.simulate import cmd_simulate as run_simulate

    return run_simulate(argv)


def cmd_data(argv: list[str]) -> int:
    from moeflow.launch.data_cli import cmd_data as run_data

    return run_data(argv)


def parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser, by name (the CLI reference, docs/cli.md, is checked against them)."""
    from moeflow.launch.data_cli import prepare_parser
    from moeflow.launch.plan import _parser as plan_parser
    from moeflow.launch.simulate import _parser as simulate_parser

    return {
        "train": _train_parser(),
        "launch": _launch_parser(),
        "slurm": _slurm_parser(),
        "plan": plan_parser(),
        "simulate": simulate_parser(),
        "data prepare": prepare_parser(),
    }


COMMANDS = {
    "train": cmd_train,
    "launch": cmd_launch,
    "slurm": cmd_slurm,
    "plan": cmd_plan,
    "simulate": cmd_simulate,
    "data": cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.split("Example:")[0].rstrip(), file=sys.stderr)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmoeflow: error: unknown command {argv[0]!r}", file=sys.stderr)
            raise SystemExit(2)
        return 0
    die_with_launcher()
    try:
        return COMMANDS[argv[0]](argv[1:])
    except KeyboardInterrupt:  # a second Ctrl-C (the first one checkpoints and stops)
        _say_error("interrupted (Ctrl-C): stopped at once, nothing saved since the last checkpoint")
        raise SystemExit(EXIT_INTERRUPTED) from None
    except ValueError as exc:  # config and usage errors: one line, no traceback
        _say_error(exc)
        raise SystemExit(2) from None
    except (NonFiniteError, HangError) as exc:  # a diverged or hung run: one line, status 1
        _say_error(exc)
        raise SystemExit(1) from None
    except Exception as exc:  # a bug: the traceback, and its last line for `moeflow launch`
        record_error(f"{type(exc).__name__}: {exc}")
        raise


def _say_error(exc: BaseException | str) -> None:
    """One line on stderr (and for `moeflow launch`), what the user wrote cut to a readable
    length (a 10 MB value is named by its start, its end and its size)."""
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    line = readable(str(exc))
    print(f"{prefix}moeflow: error: {line}", file=sys.stderr)
    record_error(line, getattr(exc, "blamed", None))


if __name__ == "__main__":
    sys.exit(main())
