"""The record of one tuner decision (`moeflow.parallel.tuner`'s step 5): the candidate chosen, what
every candidate measured and was predicted to take, the cost model's error, and why; it is logged
as a `kind: "runtime"` record, cached, saved with checkpoints and replayed (`tuner.replay`).

A record also keeps what a replay must meet again: the layer's sizes (`shape`), the situation it
was decided in (`situation`: tokens per rank, load, off-group share) and the run it was made in
(`run`: seed, world size, layout); `moeflow.parallel.tuner_replay` checks them."""

from __future__ import annotations

from moeflow.parallel.cost_model import Candidate, LayerShape


def decision_record(name, step, shape, runnable, measured, predicted, skipped) -> dict:
    """Rank 0's step 5: the fastest measured candidate, with what was measured and why.

    Example:
        >>> from moeflow.parallel.cost_model import LayerShape
        >>> shape = LayerShape(tokens=64, hidden=8, ffn=16, experts=4, top_k=2, group=2)
        >>> cands = [Candidate("ep"), Candidate("dp")]
        >>> r = decision_record("blocks.0.ffn", 50, shape, cands, [2e-3, 1e-3],
        ...                     {cands[0]: 2e-3, cands[1]: 1.5e-3}, {})
        >>> r["choice"], r["reason"], r["measured_ms"]
        ('dp', 'fastest of 2 measured, 2.00x the next', {'ep': 2.0, 'dp': 1.0})
    """
    if not runnable:
        choice = Candidate("ep")
        reason = "no candidate could run on every rank; kept ep"
    else:
        best = min(range(len(runnable)), key=lambda i: measured[i])
        choice = runnable[best]
        others = sorted(m for i, m in enumerate(measured) if i != best)
        margin = f", {others[0] / measured[best]:.2f}x the next" if others else ""
        reason = f"fastest of {len(runnable)} measured{margin}"
    times = {k.label(): round(m * 1e3, 3) for k, m in zip(runnable, measured, strict=True)}
    errors = {
        k.label(): round(predicted[k] / m - 1.0, 3)
        for k, m in zip(runnable, measured, strict=True)
        if m > 0
    }
    return {
        "kind": "runtime",
        "step": step,
        "layer": name,
        "tokens_per_rank": int(shape.tokens),
        "imbalance": round(shape.imbalance, 3),
        "mode": choice.mode,
        "overlap": choice.overlap,
        "two_level": choice.two_level,
        "choice": choice.label(),
        "reason": reason,
        "measured_ms": times,
        "predicted_ms": {k.label(): round(v * 1e3, 3) for k, v in predicted.items()},
        "prediction_error": errors,
        "skipped": skipped,
        "shape": shape_fields(shape),
    }


SHAPE_FIELDS = ("hidden", "ffn", "experts", "top_k", "group")


def shape_fields(shape: LayerShape) -> dict[str, int]:
    """The layer's sizes a decision record keeps (`shape` in it), without the call's tokens."""
    return {k: getattr(shape, k) for k in SHAPE_FIELDS}
