"""DeepSpeed's engine trains a model holding moeflow MoE layers: on 2 gloo ranks at ep = 2,
`deepspeed.initialize` with ZeRO 0, 1 and 2 ends 5 steps with the parameters of moeflow's own loop
(GradSync + AdamW), fp32; without `prepare` it does not. The DeepSpeed-style `MoE` computes what
DeepSpeed's own `MoE` computes (dropless, same weights) and trains in DeepSpeed's usage pattern
(`out, l_aux, counts = moe(x)`, `loss + coeff * l_aux`) under the engine to the parameters the
same model built with DeepSpeed's own `MoE` trains to. The drop-in's engine checkpoints
(`save_checkpoint`, `load_checkpoint`; ZeRO 0, 1, 2; ep 1 and 2) resume exactly and are
interchangeable with DeepSpeed's own `MoE`'s (its per-rank expert files at ep 2). One spawned
world of 2 gloo ranks serves every engine check here (`engine_results`)."""

from __future__ import annotations

import copy

import pytest
import torch

from moeflow import MoEConfig, RouterConfig
from moeflow.parallel import GradSync, ParallelDims, parallelize
from tests.distributed import run_on_ranks
from tests.test_expert_parallel import Net

D, STEPS, LR = 8, 5, 1e-2


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": [0.9, 0.95], "eps": 1e-8,
                                                   "weight_decay": 0.1, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }  # fmt: skip


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(12, D, generator=gen), torch.randn(12, D, generator=gen)


def _train(rank, world):
    import deepspeed

    from moeflow.integrations.deepspeed import DeepSpeedMoELayer, prepare

    ctx = ParallelDims(ep=world).build()
    cfg = MoEConfig(hidden_size=D, num_experts=4, ffn_hidden_size=8,
                    router=RouterConfig(top_k=2, aux_loss_coeff=1e-2))  # fmt: skip
    torch.manual_seed(0)
    init = Net(cfg)
    ours = parallelize(copy.deepcopy(init), ctx)
    opt = torch.optim.AdamW(ours.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sync = GradSync(ours, ctx)
    for step in range(STEPS):
        x, g = batch(rank, step)
        (ours(x) * g).mean().backward()
        sync.sync()
        opt.step()
        opt.zero_grad(set_to_none=True)
    want = {n: p.detach().clone() for n, p in ours.named_parameters()}
    results = {}
    for stage in (0, 1, 2, "unprepared"):
        model = parallelize(copy.deepcopy(init), ctx)
        if stage != "unprepared":  # without prepare(), the engine mixes different experts' grads
            names = prepare(model, ctx)
            assert isinstance(model.moe1, DeepSpeedMoELayer) and names[0] == "moe1.experts.w1"
        engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=list(model.parameters()),
            config=ds_config(0 if stage == "unprepared" else stage),
        )
        for step in range(STEPS):
            x, g = batch(rank, step)
            loss = (engine(x) * g).mean()
            engine.backward(loss)
            engine.step()
        got = dict(engine.module.named_parameters())
        results[stage] = max(
            float((got[n].detach() - w).abs().max() / w.abs().max()) for n, w in want.items()
        )
        moved = float((got["pre.weight"] - init.pre.weight).detach().abs().max())
        assert moved > 1e-3  # the steps did train
        engine.destroy()
    return results


def _engine_world(rank, world, root):
    """Every engine check of this file in one spawned world: the op DeepSpeed builds at its first
    start and the imports are paid once."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group already there
    return {
        "loop": _train(rank, world),
        "ds_style": _ds_defaults(rank, world),
        "checkpoints": _engine_checkpoints(rank, world, root),
    }


@pytest.fixture(scope="module")
def engine_results(tmp_path_factory) -> list[dict]:
    root = str(tmp_path_factory.mktemp("deepspeed_checkpoints"))
    return run_on_ranks(_engine_world, 2, args=(root,), timeout=900, env={"DS_ACCELERATOR": "cpu"})


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_deepspeed_zero_0_1_2_match_moeflows_loop(engine_results):
    for rank_result in (r["loop"] for r in engine_results):
        for stage in (0, 1, 2):
            assert rank_result[stage] < 1e-5, (stage, rank_result)
        assert rank_result["unprepared"] > 1e-3, rank_result


class DsStyleNet(torch.nn.Module):
    """DeepSpeed's usage pattern: the MoE returns (output, l_aux, exp_counts)."""

    def __init__(self, moe_cls, bias: bool = False, silu: bool = False, **moe_kwargs) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(D, D, bias=False)
        act = torch.nn.SiLU() if silu else torch.nn.GELU(approximate="tanh" if bias else "none")
        expert = torch.nn.Sequential(
            torch.nn.Linear(D, 16, bias=bias), act, torch.nn.Linear(16, D, bias=bias)
        )
        self.moe = moe_cls(D, expert, num_experts=4, **moe_kwargs)

    def forward(self, x):
        out, l_aux, _ = self.moe(self.pre(x))
        return out, l_aux


def load_same_weights(theirs: DsStyleNet, ours: DsStyleNet, seed: int, bias: bool = False):
    """One set of weights (experts that differ, by logical id) into DeepSpeed's MoE and ours,
    whatever part of the experts each rank holds."""
    gen = torch.Generator().manual_seed(seed)
    pre, gate = torch.randn(D, D, generator=gen) * 0.3, torch.randn(4, D, generator=gen)
    w1, b1 = torch.randn(4, 16, D, generator=gen) * 0.3, torch.randn(4, 16, generator=gen)
    w2, b2 = torch.randn(4, D, 16, generator=gen) * 0.3, torch.randn(4, D, generator=gen)
    ds = theirs.moe.deepspeed_moe
    local = ds.experts.deepspeed_experts
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    first = (rank % theirs.moe.ep_size) * len(local)
    with torch.no_grad():
        for net in (theirs, ours):
            net.pre.weight.copy_(pre)
        ds.gate.wg.weight.copy_(gate)
        ours.moe.router.weight.copy_(gate)
        for i, expert in enumerate(local):
            expert[0].weight.copy_(w1[first + i])
            expert[2].weight.copy_(w2[first + i])
            if bias:
                expert[0].bias.copy_(b1[first + i])
                expert[2].bias.copy_(b2[first + i])
        if ours.moe.per_expert_modules:  # a SiLU expert: modules like DeepSpeed's
            for i, expert in enumerate(ours.moe.experts.local):
                expert[0].weight.copy_(w1[first + i])
                expert[2].weight.copy_(w2[first + i])
            return
        for slot, e in enumerate(ours.moe.local_expert_ids):
            ours.moe.experts.w1[slot, :D].copy_(w1[e].t())
            ours.moe.experts.w2[slot].copy_(w2[e].t())
            if bias:
                ours.moe.experts.w1[slot, D].copy_(b1[e])
        if bias:
            ours.moe.ffn_out_bias.copy_(b2)


def their_params(theirs: DsStyleNet, ours: DsStyleNet) -> dict[str, torch.Tensor]:
    """DeepSpeed's parameters under our names and layouts (this rank's experts)."""
    ds = theirs.moe.deepspeed_moe
    local = ds.experts.deepspeed_experts
    out = {"pre.weight": theirs.pre.weight, "moe.router.weight": ds.gate.wg.weight}
    if ours.moe.per_expert_modules:
        for i, expert in enumerate(local):
            for name, p in expert.named_parameters():
                out[f"moe.experts.local.{i}.{name}"] = p
        return out
    out["moe.experts.w1"] = torch.stack([e[0].weight.t() for e in local])
    out["moe.experts.w2"] = torch.stack([e[2].weight.t() for e in local])
    return out


def _ds_defaults(rank, world):
    """Issue acceptance: DeepSpeed's engine (ZeRO 0, 1, 2) at ep 1 and 2 trains the model built
    with moeflow's DeepSpeed-style MoE to the parameters it trains the model built with
    DeepSpeed's own MoE to, constructors at DeepSpeed's defaults but for the variant: dropless
    (k = 2, second experts sampled: DeepSpeed's default), and with capacity at use_rts=False
    (k = 1 and 2; and with SiLU experts, which run as modules, per expert)."""
    import deepspeed
    from deepspeed.moe.layer import MoE as TheirMoE

    from moeflow.integrations.deepspeed import MoE

    # The same numbers as DeepSpeed's MoE outside the engine, with biased tanh-GELU experts (b1
    # as w1's last row, b2 as the layer's ffn_out_bias), at DeepSpeed's defaults (k = 1, random
    # token selection: the same seed draws the same keys).
    theirs, ours = DsStyleNet(TheirMoE, True), DsStyleNet(MoE, True)
    theirs.moe.set_deepspeed_parallelism()
    load_same_weights(theirs, ours, seed=1, bias=True)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(rank))
    torch.manual_seed(5)
    want = theirs(x)
    torch.manual_seed(5)
    got = ours(x)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)
    errors, dropped = {}, {}
    variants = {
        "dropless k2": {"k": 2, "drop_tokens": False},
        "capacity k1": {"use_rts": False},
        "capacity k2": {"k": 2, "use_rts": False},
        "silu modules k2": {"k": 2, "use_rts": False, "silu": True},
    }
    for ep in (1, world):
        ctx = ParallelDims(dp=world // ep, ep=ep).build()
        for name, kwargs in variants.items():
            for stage in (0, 1, 2):
                nets = (DsStyleNet(TheirMoE, ep_size=ep, **kwargs),
                        DsStyleNet(MoE, ep_size=ep, ctx=ctx, **kwargs))  # fmt: skip
                load_same_weights(*nets, seed=2)
                init_pre = nets[1].pre.weight.detach().clone()
                trained = []
                for net in nets:
                    engine, *_ = deepspeed.initialize(
                        model=net, model_parameters=list(net.parameters()), config=ds_config(stage)
                    )
                    for step in range(STEPS):
                        x, g = batch(rank, step)
                        torch.manual_seed(100 + step)  # the same sampled second experts
                        out, l_aux = engine(x)
                        if net is nets[1] and not net.moe.per_expert_modules:
                            stats = net.moe.last_stats
                            dropped[name] = dropped.get(name, 0.0) + float(stats.dropped_fraction)
                        engine.backward((out * g).mean() + 0.01 * l_aux)
                        engine.step()
                    trained.append(engine)
                want = their_params(nets[0], nets[1])
                got = dict(nets[1].named_parameters())
                errors[(ep, name, stage)] = max(
                    float((got[n].detach() - w.detach()).abs().max() / w.abs().max())
                    for n, w in want.items()
                )
                assert float((got["pre.weight"] - init_pre).abs().max()) > 1e-3  # it trained
                for engine in trained:
                    engine.destroy()
    return errors, dropped


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_deepspeed_style_moe_trains_under_the_engine_as_deepspeeds_own(engine_results):
    results = [r["ds_style"] for r in engine_results]
    for errors, dropped in results:
        assert len(errors) == 2 * 4 * 3
        assert max(errors.values()) < 1e-5, errors
        assert dropped["dropless k2"] == 0.0
    for name in ("capacity k1", "capacity k2"):  # the capacity did drop pairs
        assert sum(dropped[name] for _, dropped in results) > 0, name


# -- the drop-in's engine checkpoints -------------------------------------------------------------
MOE_KWARGS = {"k": 2, "use_rts": False}  # capacity drops, sampled second experts (seeded)


def train(engine, rank: int, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x, g = batch(rank, step)
        torch.manual_seed(100 + step)  # the same sampled second experts
        out, l_aux = engine(x)
        loss = (out * g).mean() + 0.01 * l_aux
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return losses


def state_of(engine) -> list[tuple[str, torch.Tensor]]:
    """Every parameter, fp32 master partition (ZeRO 1, 2) and optimizer moment, copied."""
    out = [(name, p.detach().clone()) for name, p in engine.module.named_parameters()]
    masters = getattr(engine.optimizer, "single_partition_of_fp32_groups", [])
    out += [(f"master {i}", t.detach().clone()) for i, t in enumerate(masters)]
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps torch's
    for g, group in enumerate(inner.param_groups):
        for i, p in enumerate(group["params"]):
            for key, value in sorted(inner.state[p].items()):
                out.append((f"group {g} param {i} {key}", torch.as_tensor(value).clone()))
    return out


def start(net, stage: int):
    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=net, model_parameters=list(net.parameters()), config=ds_config(stage)
    )
    return engine


def _resume(rank, ep, ctx, stage, where) -> list[str]:
    """Save after 2 steps, 2 more steps; a fresh engine (other initial weights) loads the
    checkpoint: the state at the save, then the same 2 losses. Returns what differed."""
    from moeflow.integrations.deepspeed import MoE

    torch.manual_seed(0)
    first = start(DsStyleNet(MoE, True, ep_size=ep, ctx=ctx, **MOE_KWARGS), stage)
    train(first, rank, range(2))
    first.save_checkpoint(where, tag="step2")
    saved = state_of(first)
    want = train(first, rank, range(2, 4))
    torch.manual_seed(1)
    second = start(DsStyleNet(MoE, True, ep_size=ep, ctx=ctx, **MOE_KWARGS), stage)
    second.load_checkpoint(where, tag="step2")
    loaded = state_of(second)
    wrong = [name for (name, a), (_, b) in zip(saved, loaded, strict=True) if not torch.equal(a, b)]
    assert len(saved) == len(loaded) and len(saved) > 5
    got = train(second, rank, range(2, 4))
    if got != want:
        wrong.append(f"losses {got} != {want}")
    for engine in (first, second):
        engine.destroy()
    return wrong


def _interchange(rank, ep, ctx, where) -> dict[str, float]:
    """DeepSpeed's MoE's engine checkpoint (per-rank expert files at ep 2) into the drop-in's
    engine, and the drop-in's into DeepSpeed's: the largest output differences after each."""
    from deepspeed.moe.layer import MoE as TheirMoE

    from moeflow.integrations.deepspeed import MoE

    def theirs():
        return DsStyleNet(TheirMoE, True, ep_size=ep, **MOE_KWARGS)

    def ours():
        return DsStyleNet(MoE, True, ep_size=ep, ctx=ctx, **MOE_KWARGS)

    x = torch.randn(10, D, generator=torch.Generator().manual_seed(7 + rank))
    errors = {}
    for name, make_from, make_to in (
        ("theirs->ours", theirs, ours),
        ("ours->theirs", ours, theirs),
    ):
        torch.manual_seed(2)
        source = start(make_from(), 0)
        train(source, rank, range(1))  # trained weights, not the initial ones
        source.save_checkpoint(f"{where}/{name}", tag="t")
        torch.manual_seed(3)
        target = start(make_to(), 0)
        for when in ("before", "after"):  # the load, which must make the difference
            if when == "after":
                target.load_checkpoint(f"{where}/{name}", tag="t", load_module_only=True)
            got, want = [], []
            for engine, out in ((target, got), (source, want)):
                torch.manual_seed(5)
                out.extend(engine.module(x))
            diff = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
            errors[f"{name} {when}"] = diff
        for engine in (source, target):
            engine.destroy()
    return errors


def _engine_checkpoints(rank, world, root):
    """The drop-in's engine checkpoints at ZeRO 0, 1, 2 and ep 1, 2 (`_resume`), and across
    DeepSpeed's `MoE` and the drop-in (`_interchange`)."""
    results = {}
    for ep in (1, world):
        ctx = ParallelDims(dp=world // ep, ep=ep).build()
        for stage in (0, 1, 2):
            results[("resume", ep, stage)] = _resume(
                rank, ep, ctx, stage, f"{root}/ep{ep}-z{stage}"
            )
        results[("interchange", ep)] = _interchange(rank, ep, ctx, f"{root}/swap-ep{ep}")
    return results


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_engine_checkpoints_resume_exactly_and_interchange_with_deepspeeds_moe(engine_results):
    """Issue 39: `save_checkpoint` then `load_checkpoint` into a fresh engine gives every
    parameter, fp32 master partition and optimizer moment back exactly and training continues with
    the uninterrupted losses; DeepSpeed's `MoE`'s checkpoint (per-rank expert files at ep 2) loads
    into the drop-in's engine with DeepSpeed's outputs, and the drop-in's into DeepSpeed's."""
    for rank_results in (r["checkpoints"] for r in engine_results):
        assert len(rank_results) == 2 * 3 + 2
        for key, outcome in rank_results.items():
            if key[0] == "resume":
                assert outcome == [], (key, outcome)
                continue
            for name, diff in outcome.items():  # after: fp32, the same ops in another order
                assert diff < 1e-5 if name.endswith("after") else diff > 1e-2, (key, outcome)


def test_deepspeed_style_arguments_without_equivalent_name_themselves():
    from moeflow.integrations.deepspeed import MoE

    expert = torch.nn.Sequential(
        torch.nn.Linear(D, 16, bias=False), torch.nn.GELU(), torch.nn.Linear(16, D, bias=False)
    )
    cases = [
        ({"use_residual": True}, r"MoE\(use_residual=True\)"),
        ({"enable_expert_tensor_parallelism": True}, r"enable_expert_tensor_parallelism=True"),
        ({"noisy_gate_policy": "Gumbel"}, r"noisy_gate_policy='Gumbel'\) must be None"),
        ({"ep_size": 2}, r"MoE\(ep_size=2\) needs ctx="),
        ({"ep_size": 3}, r"MoE\(num_experts=4\) must be divisible by ep_size \(3\)"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            MoE(D, expert, num_experts=4, **kwargs)
    with pytest.raises(ValueError, match=r"used_token=...\): DeepSpeed masks tokens at k = 1"):
        MoE(D, expert, num_experts=4, k=2)(torch.randn(3, D), torch.ones(3))
