"""DeepSpeed's engine trains a model holding moeflow MoE layers: on 2 gloo ranks at ep = 2,
`deepspeed.initialize` with ZeRO 0, 1 and 2 ends 5 steps with the parameters of moeflow's own loop
(GradSync + AdamW), fp32; without `prepare` it does not. The DeepSpeed-style `MoE` computes what
DeepSpeed's own `MoE` computes (dropless, same weights) and trains in DeepSpeed's usage pattern
(`out, l_aux, counts = moe(x)`, `loss + coeff * l_aux`) under the engine as in moeflow's loop."""

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


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_deepspeed_zero_0_1_2_match_moeflows_loop():
    results = run_on_ranks(_train, 2, timeout=600, env={"DS_ACCELERATOR": "cpu"})
    for rank_result in results:
        for stage in (0, 1, 2):
            assert rank_result[stage] < 1e-5, (stage, rank_result)
        assert rank_result["unprepared"] > 1e-3, rank_result


class DsStyleNet(torch.nn.Module):
    """DeepSpeed's usage pattern: the MoE returns (output, l_aux, exp_counts)."""

    def __init__(self, moe_cls, bias: bool = False, **moe_kwargs) -> None:
        super().__init__()
        self.pre = torch.nn.Linear(D, D, bias=False)
        gelu = torch.nn.GELU(approximate="tanh" if bias else "none")
        expert = torch.nn.Sequential(
            torch.nn.Linear(D, 16, bias=bias), gelu, torch.nn.Linear(16, D, bias=bias)
        )
        self.moe = moe_cls(D, expert, num_experts=4, k=2, drop_tokens=False, **moe_kwargs)

    def forward(self, x):
        out, l_aux, counts = self.moe(self.pre(x))
        assert int(counts.sum()) == 2 * x.shape[0]
        return out, l_aux


def _ds_style(rank, world):
    import deepspeed
    from deepspeed.moe.layer import MoE as TheirMoE

    from moeflow.integrations.deepspeed import MoE

    deepspeed.init_distributed(dist_backend="gloo")  # adopts the process group already there
    ctx = ParallelDims(ep=world).build()
    # 1. The same numbers as DeepSpeed's MoE (ep 1 here, dropless, top-2, same weights); with
    # biased tanh-GELU experts too (b1 as w1's last row, b2 as the layer's ffn_out_bias).
    for bias in (False, True):
        torch.manual_seed(1)
        theirs = DsStyleNet(TheirMoE, bias, top2_2nd_expert_sampling=False)
        theirs.moe.set_deepspeed_parallelism()
        ours = DsStyleNet(MoE, bias, top2_2nd_expert_sampling=False, use_rts=False)
        with torch.no_grad():
            ours.pre.weight.copy_(theirs.pre.weight)
            ours.moe.router.weight.copy_(theirs.moe.deepspeed_moe.gate.wg.weight)
            for e, expert in enumerate(theirs.moe.deepspeed_moe.experts.deepspeed_experts):
                for p in expert.parameters():  # experts that differ (DeepSpeed copies one)
                    p.add_(torch.randn_like(p), alpha=0.3)
                ours.moe.experts.w1[e, :D].copy_(expert[0].weight.t())
                ours.moe.experts.w2[e].copy_(expert[2].weight.t())
                if bias:
                    ours.moe.experts.w1[e, D].copy_(expert[0].bias)
                    ours.moe.ffn_out_bias[e].copy_(expert[2].bias)
        x = torch.randn(10, D, generator=torch.Generator().manual_seed(rank))
        (want, _), (got, l_aux) = theirs(x), ours(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # 2. Under the engine at ep 2 (ZeRO 2), as in moeflow's loop with GradSync.
    results = []
    for engine_loop in (False, True):
        torch.manual_seed(2)
        model = DsStyleNet(MoE, top2_2nd_expert_sampling=False, ep_size=world, ctx=ctx)
        if engine_loop:
            step_fn, *_ = deepspeed.initialize(
                model=model, model_parameters=list(model.parameters()), config=ds_config(2)
            )
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8,
                                    weight_decay=0.1)  # fmt: skip
            sync = GradSync(model, ctx)
        for step in range(STEPS):
            x, g = batch(rank, step)
            out, l_aux = (step_fn if engine_loop else model)(x)
            loss = (out * g).mean() + 0.01 * l_aux
            if engine_loop:
                step_fn.backward(loss)
                step_fn.step()
            else:
                loss.backward()
                sync.sync()
                opt.step()
                opt.zero_grad(set_to_none=True)
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
        if engine_loop:
            step_fn.destroy()
    return max(float((results[1][n] - w).abs().max()) for n, w in results[0].items())


def test_deepspeed_style_moe_matches_deepspeed_and_trains_under_the_engine():
    errors = run_on_ranks(_ds_style, 2, timeout=600, env={"DS_ACCELERATOR": "cpu"})
    assert max(errors) < 1e-5, errors


def test_deepspeed_style_arguments_without_equivalent_name_themselves():
    from moeflow.integrations.deepspeed import MoE

    expert = torch.nn.Sequential(
        torch.nn.Linear(D, 16, bias=False), torch.nn.GELU(), torch.nn.Linear(16, D, bias=False)
    )
    cases = [
        ({"use_residual": True, "use_rts": False}, r"MoE\(use_residual=True\)"),
        ({"k": 2, "use_rts": False}, r"MoE\(top2_2nd_expert_sampling=True\)"),
        ({}, r"MoE\(use_rts=True\) .* pass use_rts=False"),
        ({"eval_capacity_factor": 2.0, "use_rts": False}, r"MoE\(eval_capacity_factor=2\.0\)"),
        ({"ep_size": 2, "use_rts": False}, r"MoE\(ep_size=2\) needs ctx="),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            MoE(D, expert, num_experts=4, **kwargs)
    with pytest.raises(ValueError, match=r"MoE\(expert=Linear\)"):
        MoE(D, torch.nn.Linear(D, D), num_experts=4, use_rts=False)
