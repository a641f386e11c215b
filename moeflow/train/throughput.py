"""How fast a run trains: tokens per second for the job and per rank, and MFU (model FLOP/s per
rank over the device's peak), timed over the training steps only (validation, checkpoints,
re-placement and tuning excluded).

MFU needs the device's peak: `metrics.peak_flops` when set, else the dense peak of a known
accelerator (`KNOWN_PEAKS`, by the name `torch.cuda.get_device_name` gives) in the run's compute
dtype; on a CPU or an unknown device there is none, and the run says so once.

Example:
    >>> peak_for(0.0, torch.device("cpu"), "bf16")
    (None, 'no MFU: no known peak FLOP/s for a CPU; set metrics.peak_flops (per device) for one')
    >>> rate_text({"tokens_per_s": 2000.0, "tokens_per_s_per_rank": 1000.0, "mfu": 0.4123}, 2)
    '2,000 tokens/s (1,000 per rank x 2 ranks), MFU 41.2%'
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from moeflow.train.config import RunConfig
from moeflow.train.metrics import flops_per_token

TFLOPS = 1e12
# Dense (no 2:4 sparsity) peak FLOP/s per GPU: (a substring of torch.cuda.get_device_name, bf16/fp16
# tensor cores, fp32). The first match wins, so a variant comes before its family. fp32 is the
# CUDA-core figure, what torch's default fp32 matmul precision ("highest", no TF32) can reach.
KNOWN_PEAKS = (
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): PCIe BF16 1,513 TFLOPS with
    # sparsity (half of it dense), FP32 51 TFLOPS.
    ("H100 PCIe", 756.5 * TFLOPS, 51 * TFLOPS),
    # Same datasheet, H100 NVL: BF16 1,671 with sparsity, FP32 60.
    ("H100 NVL", 835.5 * TFLOPS, 60 * TFLOPS),
    # Same datasheet, H100 SXM ("NVIDIA H100 80GB HBM3"): BF16 1,979 with sparsity, FP32 67.
    ("H100", 989.5 * TFLOPS, 67 * TFLOPS),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): H200 NVL BF16 1,671 with
    # sparsity, FP32 60.
    ("H200 NVL", 835.5 * TFLOPS, 60 * TFLOPS),
    # Same datasheet, H200 SXM: BF16 1,979 with sparsity, FP32 67 (GH200's GPU has the same).
    ("H200", 989.5 * TFLOPS, 67 * TFLOPS),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 312 TFLOPS dense (624 with
    # sparsity), FP32 19.5, for the SXM4 and PCIe cards alike.
    ("A100", 312 * TFLOPS, 19.5 * TFLOPS),
)


def compute_dtype(cfg: RunConfig, device: torch.device) -> str:
    """ "bf16" where the matrix products run in 16 bits (bf16 parameters, or bf16/fp16 autocast),
    else "fp32": which of a device's peaks MFU divides by."""
    t = cfg.train
    autocast = t.autocast if t.autocast != "auto" else ("bf16" if device.type == "cuda" else "none")
    half = t.param_dtype_for(device) == "bf16" or autocast in ("bf16", "fp16")
    return "bf16" if half else "fp32"


def peak_for(configured: float, device: torch.device, dtype: str) -> tuple[float | None, str]:
    """The peak FLOP/s per device MFU divides by, and a line that says which (or why none):
    `configured` (`metrics.peak_flops`) when set, else `KNOWN_PEAKS` for a CUDA device."""
    if configured:
        return configured, f"MFU against metrics.peak_flops ({configured / TFLOPS:,.1f} TFLOP/s)"
    if device.type != "cuda":
        return None, (
            f"no MFU: no known peak FLOP/s for a {device.type.upper()}; set metrics.peak_flops "
            "(per device) for one"
        )
    name = torch.cuda.get_device_name(device)
    for key, half, single in KNOWN_PEAKS:
        if key in name:
            peak = half if dtype == "bf16" else single
            return peak, (
                f"MFU against the {name}'s dense {dtype} peak, {peak / TFLOPS:,.1f} TFLOP/s "
                "(metrics.peak_flops overrides it)"
            )
    return None, (
        f"no MFU: no known peak FLOP/s for {name}; set metrics.peak_flops (per device) for one"
    )


def rate_text(fields: dict, world_size: int) -> str:
    """`12,345 tokens/s (6,172 per rank x 2 ranks), MFU 3.1%` from a record's throughput fields."""
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    text = (
        f"{fields['tokens_per_s']:,.0f} tokens/s ({fields['tokens_per_s_per_rank']:,.0f} per "
        f"rank x {ranks})"
    )
    if fields.get("mfu") is not None:
        text += f", MFU {fields['mfu']:.1%}"
    return text


class Throughput:
    """Times a run's training steps (`with throughput.step():`) and turns them into the
    throughput fields of a log interval's `train` record (`interval`) and of the whole run
    (`run`): `tokens_per_s` (the job's: every rank's tokens), `tokens_per_s_per_rank`, and `mfu`
    where a peak is known."""

    def __init__(self, cfg: RunConfig, device: torch.device, world_size: int) -> None:
        t = cfg.train
        self.world_size = world_size
        self.tokens_per_step = t.grad_accum_steps * t.micro_batch_size * t.seq_len  # per rank
        self.flops_per_token = flops_per_token(cfg.model, t.seq_len)
        self.peak, self.about = peak_for(cfg.metrics.peak_flops, device, compute_dtype(cfg, device))
        self.seconds = self.steps = 0  # the whole run (this process's part of it)
        self._seconds = self._steps = 0  # the current log interval

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Time one training step (a step that raises is not counted)."""
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
        self.seconds += seconds
        self._seconds += seconds
        self.steps += 1
        self._steps += 1

    def fields(self, steps: int, seconds: float) -> dict:
        """The throughput fields of `steps` steps that took `seconds`."""
        per_rank = steps * self.tokens_per_step / max(seconds, 1e-9)
        out = {"tokens_per_s": per_rank * self.world_size, "tokens_per_s_per_rank": per_rank}
        if self.peak is not None:
            out["mfu"] = self.flops_per_token * per_rank / self.peak
        return out

    def interval(self) -> dict:
        """The fields of the steps since the last call (a log interval), then start a new one."""
        out = self.fields(self._steps, self._seconds)
        self._seconds = self._steps = 0
        return out

    def run(self) -> dict:
        """The fields of every step of this run (the `end` record and the summary)."""
        return {**self.fields(self.steps, self.seconds), "train_s": round(self.seconds, 3)}
