"""`moeflow simulate CONFIG`: predict each MoE layer's candidates past the machines we have.

    moeflow simulate examples/configs/olmoe_1b7b_64gpu.toml --world-size 8 64 512 2048
    moeflow simulate CONFIG --hardware a100 --inter-gbps 12.5 --imbalance 1.3 --ep 64
    moeflow simulate CONFIG --hardware-file runs/x/calibration.json --world-size 2 4

For every world size, the expert group is the whole world (Tutel's setting; `--ep` fixes it) on
nodes of `--gpus-per-node` ranks, with the config's layer shapes and `micro_batch_size * seq_len`
tokens per rank (`--tokens-per-rank`). The cost model (`moeflow.parallel.cost_model`) predicts one
forward + backward of each candidate (mode, overlap degree, two-level all-to-all) from the hardware
preset's figures (stated and sourced in the code; each can be overridden by a flag), and the
fastest is the choice. Every MoE layer of the reference decoder has the same shape, so one table
serves them all.

Example:
    >>> cmd_simulate(["examples/configs/tiny_cpu.toml", "--world-size", "8", "--quiet"])
    0
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moeflow.launch.arguments import OneLineParser
from moeflow.parallel.calibrate import hardware_from_dict
from moeflow.parallel.cost_model import (
    PRESETS,
    Hardware,
    LayerShape,
    Prediction,
    predict_all,
    scaled,
)
from moeflow.train.config import RunConfig


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="moeflow simulate", allow_abbrev=False,
        description="Predict every MoE layer candidate's time at other world sizes.",
    )  # fmt: skip
    p.add_argument("config", help="TOML run config (its [model] and [train] shapes)")
    p.add_argument("--world-size", type=int, nargs="+", default=[8, 64, 512, 2048])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--hardware", choices=sorted(PRESETS), default="h100")
    p.add_argument(
        "--hardware-file", default=None,
        help="a run's calibration.json (this machine's measured figures) instead of a preset",
    )  # fmt: skip
    p.add_argument("--ep", type=int, default=None, help="expert group size (default: the world)")
    p.add_argument("--tokens-per-rank", type=int, default=None)
    p.add_argument("--imbalance", type=float, default=1.0, help="max/mean expert-rank load")
    p.add_argument("--gemm-tflops", type=float, default=None)
    p.add_argument("--intra-gbps", type=float, default=None, help="GB/s per rank and direction")
    p.add_argument("--intra-latency-us", type=float, default=None)
    p.add_argument("--inter-gbps", type=float, default=None, help="GB/s per rank and direction")
    p.add_argument("--inter-latency-us", type=float, default=None)
    p.add_argument("--quiet", action="store_true", help="compute, print nothing")
    return p


def hardware(args: argparse.Namespace) -> Hardware:
    """The preset, or the calibrated figures of `--hardware-file`, with the flags' overrides."""
    if args.hardware_file:
        path = Path(args.hardware_file)
        try:
            base = hardware_from_dict(json.loads(path.read_text(encoding="utf-8"))["hardware"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"--hardware-file {str(path)!r} is not a calibration.json written by moeflow "
                f"train ({type(exc).__name__}: {exc})"
            ) from None
    else:
        base = PRESETS[args.hardware]
    return scaled(
        base,
        gemm_flops=None if args.gemm_tflops is None else args.gemm_tflops * 1e12,
        intra_bandwidth=None if args.intra_gbps is None else args.intra_gbps * 1e9,
        intra_alpha=None if args.intra_latency_us is None else args.intra_latency_us * 1e-6,
        inter_bandwidth=None if args.inter_gbps is None else args.inter_gbps * 1e9,
        inter_alpha=None if args.inter_latency_us is None else args.inter_latency_us * 1e-6,
    )


def simulate(args: argparse.Namespace, cfg: RunConfig) -> list[tuple[int, object]]:
    """Per world size: the predictions sorted fastest first, or the reason there are none."""
    hw = hardware(args)
    moe = cfg.model.moe
    tokens = args.tokens_per_rank or cfg.train.micro_batch_size * cfg.train.seq_len
    out = []
    for world in args.world_size:
        ep = args.ep or world
        try:
            if world < 1 or world % ep:
                raise ValueError(f"--ep ({ep}) must divide the world size ({world})")
            shape = LayerShape(
                tokens=tokens, hidden=moe.hidden_size, ffn=moe.ffn_hidden_size,
                experts=moe.num_experts, top_k=moe.router.top_k, group=ep,
                gate_blocks=2 if moe.activation == "swiglu" else 1, imbalance=args.imbalance,
            )  # fmt: skip
        except ValueError as exc:
            out.append((world, str(exc).split(":")[0] if "laid out" in str(exc) else str(exc)))
            continue
        preds = predict_all(shape, hw, args.gpus_per_node)
        out.append((world, sorted(preds, key=lambda p: p.seconds)))
    return out


def format_table(results: list[tuple[int, object]], args, cfg: RunConfig) -> str:
    hw = hardware(args)
    moe = cfg.model.moe
    tokens = args.tokens_per_rank or cfg.train.micro_batch_size * cfg.train.seq_len
    lines = [
        f"moeflow simulate: {args.config}: every MoE layer is D={moe.hidden_size} "
        f"F={moe.ffn_hidden_size} E={moe.num_experts} top-{moe.router.top_k} {moe.activation}, "
        f"{tokens} tokens per rank, imbalance {args.imbalance:g}; {hw.name} ({hw.source}), "
        f"{args.gpus_per_node} GPUs per node; ms per forward + backward of one layer",
    ]
    labels: list[str] = []
    for _, preds in results:
        if isinstance(preds, list):
            labels += [p.candidate.label() for p in preds if p.candidate.label() not in labels]
    head = f"{'candidate':<16}" + "".join(f"{f'{w} GPUs':>14}" for w, _ in results)
    lines.append(head)
    for label in labels:
        row = f"{label:<16}"
        for _, preds in results:
            if not isinstance(preds, list):
                row += f"{'-':>14}"
                continue
            found = [p for p in preds if p.candidate.label() == label]
            mark = "*" if found and found[0] is preds[0] else " "
            row += f"{found[0].seconds * 1e3:>13.3f}{mark}" if found else f"{'-':>14}"
        lines.append(row)
    choice = f"{'choice':<16}"
    for _, preds in results:
        choice += f"{preds[0].candidate.label() if isinstance(preds, list) else 'n/a':>14}"
    lines.append(choice)
    for world, preds in results:
        if isinstance(preds, list):
            lines.append(f"  {world} GPUs: {_why(preds)}")
        else:
            lines.append(f"  {world} GPUs: n/a: {preds}")
    return "\n".join(lines)


def _why(preds: list[Prediction]) -> str:
    best = preds[0]
    runner = preds[1] if len(preds) > 1 else None
    text = (
        f"{best.candidate.label()}: compute {best.compute_s * 1e3:.3f} ms, token all-to-alls "
        f"{best.tokens_s * 1e3:.3f} ms, weight gathers {best.weights_s * 1e3:.3f} ms"
    )
    if runner is not None:
        text += f"; {runner.seconds / best.seconds:.2f}x faster than {runner.candidate.label()}"
    return text


def cmd_simulate(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node ({args.gpus_per_node}) must be >= 1")
    bad = [w for w in args.world_size if w < 1]
    if bad:
        raise ValueError(f"--world-size ({bad[0]}) must be >= 1: the number of GPUs to predict for")
    if not args.imbalance >= 1.0:
        raise ValueError(f"--imbalance ({args.imbalance}) is a max/mean load: >= 1")
    cfg = RunConfig.from_toml(args.config)
    results = simulate(args, cfg)
    if not args.quiet:
        print(format_table(results, args, cfg))
    return 0
