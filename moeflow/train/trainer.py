"""The training loop of `moeflow train`: an MoE decoder on one process, under torchrun, or on Slurm.

Per optimizer step, on every rank:
1. set the learning rate for the step (warmup + cosine);
2. `grad_accum_steps` micro-batches from this rank's data shard: forward (under autocast, with
   activation checkpointing if asked), backward of `loss / grad_accum_steps` (the balancing losses
   ride on the MoE outputs, scaled the same way by `set_aux_loss_scale`);
3. `GradSync`: dense gradients averaged over the world, expert gradients over the
   expert-data-parallel group; with `parallel.overlap_grad_sync` (the default) each bucket is sent
   from the last micro-batch's backward as soon as it is ready, and the step waits for them (a
   sharded model, `parallel.dp_shard`: FSDP reduce-scatters them in that backward instead);
4. clip by the global gradient norm (expert parts summed over the `ep` group; shards over a
   replica's ranks);
5. one all-reduce and host sync of the step's flags: a stop flag (SIGTERM or a first Ctrl-C,
   SIGINT, on any rank: checkpoint after this step and exit, 0 after SIGTERM, 130 after SIGINT; a
   second Ctrl-C stops at once) and the non-finite guard's (`moeflow.train.nonfinite`: a NaN or
   infinite loss or gradient norm stops the run or skips the update, `train.on_nonfinite`);
   then the AdamW step; every `log_every` steps one all-reduce of the metrics; expert
   re-placement (`moeflow.train.replacement`), validation and checkpoints when due.

Example (one process, a few steps on the embedded corpus):
    >>> import tempfile
    >>> cfg = RunConfig.from_dict({"model": {"dim": 32, "n_layers": 1, "n_heads": 2,
    ...     "max_seq_len": 16, "moe": {"num_experts": 2}}, "data": {"max_bytes": 20000},
    ...     "train": {"steps": 2, "seq_len": 16, "micro_batch_size": 2,
    ...               "out_dir": tempfile.mkdtemp()},
    ...     "metrics": {"progress": False, "plot": False}})
    >>> train(cfg, quiet=True).last_step
    2
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import torch

from moeflow.moe.walk import finish_optimizer_step, moe_layers, set_aux_loss_scale, split_parameters
from moeflow.parallel.dims import ParallelDims
from moeflow.parallel.fsdp import is_sharded
from moeflow.parallel.grad_sync import GradSync
from moeflow.parallel.replace import replica_row_weights
from moeflow.train import checkpoint as ckpt
from moeflow.train.build import build_model, checkpoint_meta, layout_record, saved_slots
from moeflow.train.config import RunConfig
from moeflow.train.distributed import Runtime, init_distributed, shutdown
from moeflow.train.expert_keys import init_optimizer_state
from moeflow.train.loss import autocast, model_loss
from moeflow.train.memory import SavedBytes, start_record
from moeflow.train.metrics import IntervalMetrics, MetricsLogger, plot_run, train_record
from moeflow.train.nonfinite import NonFiniteError, NonFiniteGuard, check_validation
from moeflow.train.optim import build_optimizer, clip_grad_norm_, lr_at, set_lr
from moeflow.train.replacement import Replacer, describe_placement
from moeflow.train.result import TrainResult, describe_run, describe_validation, summary_lines
from moeflow.train.resume_config import GivenModel
from moeflow.train.run_data import RunData
from moeflow.train.run_dir import check_steps_left, lock_output, release_output, resolve_output
from moeflow.train.stop_signals import StopSignals
from moeflow.train.throughput import Throughput, rate_text
from moeflow.train.tuning import build_tuner, describe_decision, tuning_summary
from moeflow.train.watchdog import HangError, Watchdog, is_hang, lost_peer
from moeflow.utils.cpu_alloc import apply_once


class Trainer:
    """Builds everything a run needs from a `RunConfig`, then `run()`s it. See the module doc.
    `dtype`: the parameters' and AdamW state's dtype (default fp32); float64 runs check that two
    ways of training compute the same math, free of fp32 rounding that differs between CPUs."""

    def __init__(
        self,
        cfg: RunConfig,
        runtime: Runtime,
        resume: str | None,
        overwrite: bool,
        dtype: torch.dtype | None = None,
        given: GivenModel | None = None,
    ):
        self.cfg, self.runtime, self.dtype, self.given = cfg, runtime, dtype, given
        self._autocast = functools.partial(autocast, cfg.train.autocast, runtime.device)
        p, dp = cfg.parallel, cfg.parallel.dp_for(runtime.world_size)
        dims = ParallelDims(dp=dp, ep=p.ep, dp_shard=p.dp_shard_for(dp, runtime.device),
                            timeout_s=p.startup_timeout_s)  # fmt: skip
        self.ctx = dims.build(runtime.device.type)
        # Heartbeats often enough to tell a stopped rank within a step's timeout.
        self.watchdog = Watchdog(self.ctx.rank, runtime.world_size, p.timeout_s).start()
        self.watchdog.setting, self.watchdog.timeout_s = "startup_timeout_s", p.startup_timeout_s
        self.out_dir = Path(cfg.train.out_dir)
        existed, self.lock = self.out_dir.exists(), None
        try:
            self.lock = lock_output(cfg, self.ctx)  # one run per directory, before it is read
            self._setup(resume, overwrite)
        except BaseException:
            self._release(remove_if_unused=not existed)
            self.watchdog.close()
            raise

    def _setup(self, resume: str | None, overwrite: bool) -> None:
        self.resume_path, self.cfg, self.resume_note = resolve_output(  # a resume: its [model]
            self.cfg, self.ctx, resume, overwrite, self.given
        )
        cfg, runtime = self.cfg, self.runtime
        slots = saved_slots(cfg, self.ctx, self.resume_path)  # a re-placed run keeps its own
        self.model = build_model(cfg, self.ctx, runtime.device, slots, dtype=self.dtype)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        init_optimizer_state(self.optimizer)
        self.grad_sync = GradSync(self.model, self.ctx, overlap=cfg.parallel.overlap_grad_sync)
        dense, experts = split_parameters(self.model)
        self.dense_params, self.expert_params = [q for _, q in dense], [q for _, q in experts]
        self.moe_layers = [m for _, m in moe_layers(self.model)]
        # Sharded (FSDP): the gradient norm sums the local shards over a replica's ranks.
        self.norm_group = self.ctx.data_groups()["dense_shard"] if is_sharded(self.model) else None
        self.replacer = Replacer(cfg, self.ctx, self.model, runtime.device)
        self.tuner = build_tuner(cfg, self.ctx, self.model, self.out_dir, runtime.device)
        self.data = RunData(cfg, self.ctx.rank, runtime.world_size)
        self.data.check(self.ctx.world_group)
        t = cfg.train
        self.step = 0
        self.throughput = Throughput(cfg, runtime.device, runtime.world_size)
        self.stop = StopSignals()  # SIGTERM or Ctrl-C seen by this rank
        self.save_due = False  # a periodic checkpoint waits while updates are being skipped
        self.start_record: dict | None = None  # measured in this run's first step
        self.stop_agreed = False  # ... by any rank, as of the last step's flag exchange
        self.guard = NonFiniteGuard(t.on_nonfinite, t.max_nonfinite_skips, self.ctx.rank,
                                    runtime.world_size)  # fmt: skip
        if runtime.device.type == "cpu":
            apply_once()  # reuse freed activations instead of page-faulting them back

    def close(self) -> None:
        """Give the output directory up without running (`run` does it when it ends); also the
        end of a `with Trainer(...) as trainer:` block."""
        self._release()
        self.watchdog.close()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _release(self, remove_if_unused: bool = False) -> None:
        """Give up the directory (see `release_output`)."""
        release_output(self.lock, self.out_dir, remove_if_unused and self.ctx.rank == 0)
        self.lock = None

    # -- setup -------------------------------------------------------------------------------
    def _load(self) -> dict:
        meta, rank_state = ckpt.load_checkpoint(self.resume_path, self.model, self.optimizer,
                                                self.ctx.world_group)  # fmt: skip
        self.step = int(meta["step"])
        same_layout = meta.get("parallel") == layout_record(self.ctx.dims)
        if self.tuner is not None and isinstance(meta.get("tuner"), dict) and same_layout:
            self.tuner.load_state_dict(meta["tuner"])  # another layout is tuned afresh
        self.data.check_resume(meta, self.resume_path)
        if rank_state is not None:
            self.data.load_state_dict(rank_state["data"])
            ckpt.set_rng_state(rank_state["rng"])
        else:  # written by another world size: its ranks' data positions do not map onto ours
            self.data.skip(self.step * self.cfg.train.grad_accum_steps)
            torch.manual_seed(self.cfg.train.seed + self.ctx.rank + self.step)
        return meta

    # -- one step ----------------------------------------------------------------------------
    def train_step(self, metrics: IntervalMetrics) -> torch.Tensor:
        """One optimizer step (steps 1-5 of the module doc); statistics are added to `metrics`.
        Returns the gradient norm before clipping (on the device)."""
        cfg, device = self.cfg, self.runtime.device
        accum = cfg.train.grad_accum_steps
        set_lr(self.optimizer, lr_at(self.step, cfg.optim, cfg.train.steps))
        step_loss = torch.zeros((), device=device, dtype=torch.float64)
        measure = self.start_record is None  # the first step of the run: what a rank holds
        saved = []
        for micro in range(accum):
            self.watchdog.at(self.step + 1, "forward and backward")
            x, y, docs = self.data.next_batch_on(device)
            with self._autocast(), SavedBytes() if measure else contextlib.nullcontext() as kept:
                loss = model_loss(self.model, x, y, cfg.train.loss_chunk_tokens, docs)
            saved.append(kept.bytes if measure else 0)
            # Gradients are sent from the last micro-batch's backward only (when overlapped).
            last = micro == accum - 1
            with contextlib.nullcontext() if last else self.grad_sync.no_sync():
                (loss / accum).backward()
            metrics.add(loss, self.moe_layers)
            step_loss += loss.detach()
            self.replacer.observe()
        self.watchdog.at(self.step + 1, "gradient sync and clipping")
        self.grad_sync.sync()
        grad_norm = clip_grad_norm_(
            self.dense_params, self.expert_params, cfg.optim.grad_clip, self.ctx.ep_group,
            replica_row_weights(self.model), self.norm_group,
        )  # fmt: skip
        # Step 5's one all-reduce and host sync, before the update: stop flags and the guard.
        flags = self.guard.exchange(step_loss, grad_norm, self.stop.requested, self.ctx.world_group)
        self.stop_agreed = bool(flags[0])
        if self.guard.decide(self.step + 1, flags, step_loss.item(), grad_norm.item()):
            self.optimizer.step()
        if measure:  # before zero_grad: the gradients are still held
            self.start_record = start_record(
                self.model, self.optimizer, max(saved), self.step + 1, self.ctx.world_group
            )
        self.optimizer.zero_grad(set_to_none=True)
        finish_optimizer_step(self.model)  # global-batch counts reset, aux-free bias update
        self.replacer.end_step()
        self.step += 1
        return grad_norm

    def new_metrics(self) -> IntervalMetrics:
        return IntervalMetrics(self.moe_layers, self.runtime.device)

    # -- validation --------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """The `val` record: mean validation loss (nats per token) over the fixed windows, bits
        per byte, and for a mixture each source's."""
        self.watchdog.at(self.step, "validation")
        loss, bpb, per_source = self.data.evaluate(
            self.model, self.ctx.world_group, self.runtime.device, self._autocast
        )
        record = {"kind": "val", "step": self.step, "val_loss": loss, "val_bpb": bpb}
        return record if per_source is None else {**record, "sources": per_source}

    # -- checkpoints -------------------------------------------------------------------------
    def save(self) -> Path:
        meta = checkpoint_meta(self.cfg, self.ctx.dims, self.runtime.world_size, self.step,
                               self.optimizer, self.model, self.tuner, self.given)  # fmt: skip
        meta["tokenizer"] = self.data.tokenizer_record()
        self.watchdog.at(self.step, "checkpoint")
        setting = self.watchdog.setting
        self._timeout("startup_timeout_s")  # writes may take long
        self.replacer.write()
        rank_state = {"data": self.data.state_dict()}
        path = ckpt.save_checkpoint(
            self.out_dir / "checkpoints", self.step, self.model, self.optimizer, meta,
            rank_state, group=self.ctx.world_group, keep=self.cfg.checkpoint.keep,
        )  # fmt: skip
        self._timeout(setting)
        return path

    def _timeout(self, setting: str) -> None:
        """Every group's collective timeout from `parallel.<setting>` (and the watchdog's)."""
        seconds = getattr(self.cfg.parallel, setting)
        self.ctx.set_timeout(seconds)
        self.watchdog.setting, self.watchdog.timeout_s = setting, seconds

    # -- the loop ----------------------------------------------------------------------------
    def run(self, quiet: bool = False) -> TrainResult:
        """Train to `train.steps` (or a stop), then give the output directory up."""
        try:
            return self._run(quiet)
        finally:
            self._release()

    def _run(self, quiet: bool) -> TrainResult:
        cfg, rank0 = self.cfg, self.ctx.rank == 0
        if self.resume_path is not None:
            self._load()
            check_steps_left(self.resume_path, self.step, cfg.train.steps)
        first = self.step
        log = MetricsLogger.for_run(cfg, self.out_dir, rank0, first, quiet)
        result = TrainResult(self.out_dir, first, first, metrics_path=log.path,
                             world_size=self.runtime.world_size)  # fmt: skip
        result.unigram_loss, result.unigram_bpb = self.data.baseline()
        say = (lambda text: None) if quiet else log.message
        say(describe_run(self.model, self.ctx.dims, self.runtime, self.data.corpus, first,
                         cfg.train.steps, self.resume_path))  # fmt: skip
        say(self.data.describe())
        say(self.resume_note)  # model keys taken from the checkpoint, if any
        say(self.throughput.about)
        set_aux_loss_scale(self.model, 1.0 / cfg.train.grad_accum_steps)
        self.stop.install()
        started = time.perf_counter()
        try:
            self._timeout("timeout_s")  # start-up is over
            self._loop(log, result, say)
            loop_s = time.perf_counter() - started
            if not result.stopped_by_signal:
                record = self.evaluate()
                result.val_loss, result.val_bpb = record["val_loss"], record["val_bpb"]
                log.log(record)
                check_validation(self.step, result.val_loss)
            result.checkpoint = self.save()
        except (NonFiniteError, RuntimeError) as exc:  # the metrics file says why, then the CLI
            if not isinstance(exc, NonFiniteError) and not is_hang(exc):
                raise
            if not isinstance(exc, NonFiniteError):
                exc = HangError(*self.watchdog.diagnose(lost_peer=lost_peer(exc)))
            log.log({"kind": "error", "step": getattr(exc, "step", self.step), "error": str(exc)})
            log.close()
            raise exc from None
        finally:
            self.stop.restore()
            self.watchdog.close()
        result.last_step = self.step
        result.throughput = self.throughput.run()
        end = {"kind": "end", "step": self.step, "signal": result.stopped_by_signal,
               **result.throughput, **self.data.drawn(self.ctx.world_group)}  # fmt: skip
        if self.tuner is not None:
            fields, line = tuning_summary(self.tuner, loop_s)
            end.update(fields)
            say(line)
        log.log(end)
        log.close()
        if rank0 and cfg.metrics.plot:
            result.plot_path = plot_run(log.records, self.out_dir / "training.png",
                                        result.unigram_loss)  # fmt: skip
        say(summary_lines(result))
        return result

    def _loop(self, log: MetricsLogger, result: TrainResult, say) -> None:
        cfg = self.cfg
        metrics, world = self.new_metrics(), self.runtime.world_size
        while self.step < cfg.train.steps:
            first = self.start_record is None
            with self.throughput.step():
                grad_norm = self.train_step(metrics)
            if first:
                log.log(self.start_record)
            stop = self.stop_agreed
            last = self.step == cfg.train.steps or stop
            if self.step % cfg.metrics.log_every == 0 or last:
                record = train_record(  # one all-reduce, one host sync
                    metrics.reduce(self.ctx.world_group, world), step=self.step,
                    optimizer=self.optimizer, grad_norm=float(grad_norm),
                    skipped=self.guard.skipped, throughput=self.throughput.interval(),
                )  # fmt: skip
                log.log(record)
                log.advance(self.step, f"loss {record['loss']:.3f}, {rate_text(record, world)}")
                result.losses.append(record["loss"])
                result.loss_steps.append(self.step)
                metrics = self.new_metrics()
            if not stop and self.step < cfg.train.steps:
                self._replace_and_tune(log, say)
            if stop:
                result.stopped_by_signal = True
                result.stop_signal = self.stop.signal
                say(self.stop.describe(self.step))
                return
            every = cfg.train.eval_every
            if every and self.step % every == 0 and self.step < cfg.train.steps:
                record = self.evaluate()
                log.log(record)
                check_validation(self.step, record["val_loss"])
                say(describe_validation(record))
            every = cfg.checkpoint.every
            if every and self.step % every == 0 and self.step < cfg.train.steps:
                self.save_due = True
            if self.save_due and self.guard.in_a_row == 0:
                self.save()
                self.save_due = False
            elif self.save_due and self.step % every == 0:  # skipping: keep the last good one
                say(f"step {self.step}: non-finite steps in a row, checkpoint deferred")

    def _replace_and_tune(self, log: MetricsLogger, say) -> None:
        """When due: re-place the experts, then check (and tune) the layers' parallel modes;
        every decision is logged, with a line."""
        placed = self.replacer.maybe_replace(self.step, self.optimizer)
        if placed is not None:
            log.log(placed)
            say(f"step {self.step}: {describe_placement(placed)}")
        for record in [] if self.tuner is None else self.tuner.after_step(self.step):
            log.log(record)
            say(f"step {self.step}: {describe_decision(record)}")


def train(
    cfg: RunConfig,
    resume: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    given: GivenModel | None = None,
) -> TrainResult:
    """Run `cfg` in this process (one rank of a torchrun job, or a world of one). `given`: the
    `[model]` the user wrote (`moeflow train` passes it): a resume refuses only what it changed;
    without it every `[model]` key of `cfg` counts as asked for."""
    runtime = init_distributed(cfg.parallel.startup_timeout_s)
    try:
        return Trainer(cfg, runtime, resume, overwrite, given=given).run(quiet=quiet)
    finally:
        shutdown(runtime)
