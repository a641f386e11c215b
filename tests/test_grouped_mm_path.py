"""The grouped-GEMM expert path (`MoEConfig.expert_kernel`) against the per-block loop: the same
outputs and gradients on CPU in fp32 and bf16 (torch runs grouped_mm there too), at ep 1 and 2,
and on a GPU in bf16 where one exists; where it cannot run (float64, expert biases, unaligned
rows) the loop runs instead."""

from __future__ import annotations

import pytest
import torch

from moeflow import MoEConfig, MoELayer, RouterConfig
from moeflow.moe import grouped_mm_ffn
from moeflow.moe.grouped_ffn import FFNActivations, WeightGrads
from moeflow.parallel import GradSync, ParallelDims, parallelize
from tests.distributed import run_on_ranks

D, F = 16, 24


def pair(kernel_cfg: dict, device="cpu", dtype=torch.float32, seed=0, kernel="grouped_mm"):
    """The same layer twice: the loop and the whole-buffer path on `kernel`."""
    out = []
    for name in ("loop", kernel):
        sizes = {"hidden_size": D, "num_experts": 4, "ffn_hidden_size": F}
        cfg = MoEConfig(**{**sizes, **kernel_cfg}, expert_kernel=name)
        torch.manual_seed(seed)
        layer = MoELayer(cfg)
        with torch.no_grad():
            layer.router.weight.normal_(0.0, 1.0)
        out.append(layer.to(device=device, dtype=dtype))
    return out


def step(layer, x, g):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * g).sum().backward()
    return y, x.grad, {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}


def calls(monkeypatch) -> list:
    seen = []
    real = grouped_mm_ffn.forward

    def spy(*args, **kwargs):
        seen.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(grouped_mm_ffn, "forward", spy)
    return seen


CASES = [
    {"activation": "gelu", "router": RouterConfig(top_k=2)},
    {"activation": "swiglu", "router": RouterConfig(top_k=2, capacity_factor=1.0)},
    {"activation": "relu", "router": RouterConfig(top_k=1, capacity_factor=2.0,
                                                  pad_to_capacity=True)},
    {"activation": "gelu_tanh", "a2a_dim": 8, "router": RouterConfig(top_k=2)},
]  # fmt: skip
# F < D: the row weights scale the activations before the second GEMM instead of its output.
NARROW = {"activation": "gelu", "ffn_hidden_size": 8, "router": RouterConfig(top_k=3)}


def case_id(case: dict) -> str:
    return f"{case['activation']}-F{case.get('ffn_hidden_size', F)}"


# The whole-buffer kernels against the loop: torch's grouped_mm in fp32 and bf16 (it runs on CPU
# too, not in float64); one mm per expert in float64 (the loop's math, to rounding) and fp32.
KERNEL_DTYPES = [
    ("grouped_mm", torch.float32, {"rtol": 1e-4, "atol": 1e-5}),
    ("grouped_mm", torch.bfloat16, {"rtol": 3e-2, "atol": 3e-2}),
    ("grouped_loop", torch.float64, {"rtol": 1e-10, "atol": 1e-12}),
    ("grouped_loop", torch.float32, {"rtol": 1e-4, "atol": 1e-5}),
]


@pytest.mark.parametrize("case", [*CASES, NARROW], ids=case_id)
@pytest.mark.parametrize(
    ("kernel", "dtype", "tol"),
    KERNEL_DTYPES,
    ids=[f"{k}-{str(d).removeprefix('torch.')}" for k, d, _ in KERNEL_DTYPES],
)
def test_whole_buffer_kernels_equal_the_loop_on_cpu(case, kernel, dtype, tol, monkeypatch):
    seen = calls(monkeypatch)
    loop, grouped = pair(case, dtype=dtype, kernel=kernel)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, D, generator=gen).to(dtype)
    g = torch.randn(37, D, generator=gen).to(dtype)
    want, got = step(loop, x, g), step(grouped, x, g)
    assert seen, f"the whole-buffer path ({kernel}) did not run"
    torch.testing.assert_close(got[0], want[0], **tol)
    torch.testing.assert_close(got[1], want[1], **tol)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], **tol, msg=name)


def test_where_grouped_mm_cannot_run_the_loop_does(monkeypatch):
    seen = calls(monkeypatch)
    x = torch.randn(9, D)
    for case, dtype in (({}, torch.float64), ({"ffn_bias": True}, torch.float32)):
        loop, grouped = pair({"activation": "gelu", **case}, dtype=dtype)
        torch.testing.assert_close(grouped(x.to(dtype)), loop(x.to(dtype)), rtol=0, atol=0)
    assert not seen
    unaligned = MoEConfig(hidden_size=6, num_experts=2, ffn_hidden_size=10,
                          expert_kernel="grouped_mm")  # fmt: skip
    MoELayer(unaligned)(torch.randn(5, 6))  # 24-byte rows: the loop
    # SwiGLU with F = 6: h is 12 wide (48 bytes) but the activation 6 (24 bytes).
    loop, grouped = pair({"activation": "swiglu", "ffn_hidden_size": 6}, dtype=torch.float32)
    torch.testing.assert_close(grouped(x), loop(x), rtol=0, atol=0)
    assert not seen
    with pytest.raises(ValueError, match=r"moe\.expert_kernel"):
        MoEConfig(hidden_size=8, num_experts=2, ffn_hidden_size=8, expert_kernel="cublas")


def test_choose_says_which_kernel_runs():
    x32, x64 = torch.zeros(4, 16), torch.zeros(4, 16, dtype=torch.float64)
    w1, w2 = torch.zeros(8, 16, 24), torch.zeros(8, 24, 16)
    biased = torch.zeros(8, 17, 24)  # MoEConfig.ffn_bias: b1 as w1's last row
    many = torch.zeros(grouped_mm_ffn.CPU_GROUPED_FROM, 16, 24)
    many2 = torch.zeros(grouped_mm_ffn.CPU_GROUPED_FROM, 24, 16)
    choose = grouped_mm_ffn.choose
    assert choose("auto", x32, w1, w2) == "loop"  # 8 experts on CPU
    assert choose("auto", x32, many, many2) == "grouped_loop"  # many small experts on CPU
    assert choose("grouped_mm", x32, w1, w2) == "grouped_mm"
    assert choose("grouped_mm", x64, w1, w2) == "loop"  # no float64 grouped_mm
    half = torch.zeros(8, 16, 12), torch.zeros(8, 6, 16)  # SwiGLU, F = 6: 24-byte activations
    assert choose("grouped_mm", x32, *half) == "loop"
    assert choose("grouped_loop", x64, w1, w2) == "grouped_loop"
    assert choose("grouped_loop", x32, biased, w2) == "loop"
    assert choose("loop", x32, many, many2) == "loop"


def test_auto_picks_the_whole_buffer_path_on_cpu_for_many_experts(monkeypatch):
    seen = calls(monkeypatch)
    kernels = []
    real = grouped_mm_ffn.F.grouped_mm

    def spy(*args, **kwargs):
        kernels.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(grouped_mm_ffn.F, "grouped_mm", spy)
    few = MoEConfig(hidden_size=D, num_experts=8, ffn_hidden_size=F)
    MoELayer(few)(torch.randn(20, D))
    assert not seen  # 8 experts: the loop
    many = MoEConfig(hidden_size=D, num_experts=grouped_mm_ffn.CPU_GROUPED_FROM,
                     ffn_hidden_size=F)  # fmt: skip
    MoELayer(many)(torch.randn(20, D))
    assert seen and not kernels  # 32 experts: the whole buffer, one mm per expert


def test_weighted_activations_are_kept_for_w2s_gradient():
    """F < D: the forward keeps `row_w a` (W2's input), and the backward from it gives the same
    bits as one that makes it again."""
    gen = torch.Generator().manual_seed(3)
    x, row_w = torch.randn(10, D, generator=gen), torch.rand(10, generator=gen)
    w1, w2 = torch.randn(2, D, 8, generator=gen), torch.randn(2, 8, D, generator=gen)
    grad_y = torch.randn(10, D, generator=gen)
    blocks, ends = [(0, 0, 4), (1, 4, 10)], [4, 10]
    _, saved = grouped_mm_ffn.forward(x, w1, w2, blocks, "gelu", row_w, ends, "grouped_loop")
    a = saved.per_block[0][0]
    assert saved.a_w is not None and torch.equal(saved.a_w, a * row_w.unsqueeze(-1))
    results = []
    for a_w in (saved.a_w, None):
        grads = WeightGrads(w1, w2)
        state = FFNActivations.from_tensors([*saved.tensors()[:5], a_w, a, *saved.per_block[0][1:]],
                                            blocks, "gelu")  # fmt: skip
        out = grouped_mm_ffn.backward(state, grad_y, grads, ends, "grouped_loop")
        results.append((out, *grads.finish()))
    for kept, remade in zip(*results, strict=True):
        assert torch.equal(kept, remade)
    # D <= F: the weights scale the output rows, and nothing more is kept.
    w1w, w2w = torch.randn(2, D, 24, generator=gen), torch.randn(2, 24, D, generator=gen)
    _, wide = grouped_mm_ffn.forward(x, w1w, w2w, blocks, "gelu", row_w, ends, "grouped_loop")
    assert wide.a_w is None


def test_grouped_ends():
    assert grouped_mm_ffn.grouped_ends([(0, 0, 3), (2, 3, 7)], 4) == [3, 3, 7, 7]
    assert grouped_mm_ffn.grouped_ends([], 2) == [0, 0]
    assert grouped_mm_ffn.grouped_ends([(1, 0, 2), (0, 2, 4)], 2) is None  # not in order
    assert grouped_mm_ffn.grouped_ends([(0, 1, 3)], 1) is None  # not from row 0


def spy_offsets() -> list[bool]:
    """Per grouped_mm call: whether its offsets came made on the device by the dispatcher
    (`ReceivedBlocks.ends`, no host-to-device copy) and equal the host's end rows."""
    seen, real = [], grouped_mm_ffn.offsets

    def spy(ends, device, offs=None):
        seen.append(offs is not None and offs.dtype == torch.int32 and offs.tolist() == ends)
        return real(ends, device, offs)

    grouped_mm_ffn.offsets = spy
    return seen


def test_grouped_mm_offsets_are_made_on_the_device(monkeypatch):
    monkeypatch.setattr(grouped_mm_ffn, "offsets", grouped_mm_ffn.offsets)  # restored after
    seen = spy_offsets()
    for case in [*CASES, NARROW]:
        _, grouped = pair(case)
        x = torch.randn(3, 7, D)
        step(grouped, x, torch.randn_like(x))
    assert len(seen) >= 2 * 5 and all(seen)  # forward and backward of 5 layers, each call


def _ep(rank, world):
    seen, real = [], grouped_mm_ffn.forward
    grouped_mm_ffn.forward = lambda *a, **k: seen.append(1) or real(*a, **k)
    offsets = spy_offsets()
    ctx = ParallelDims(ep=world).build()
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(11 + 4 * r, D, generator=gen) for r in range(world)]
    gs = [torch.randn_like(x) for x in xs]
    results = []
    for layer in pair({"activation": "swiglu", "router": RouterConfig(top_k=2)}):
        model = parallelize(torch.nn.Sequential(layer), ctx)
        sync = GradSync(model, ctx)
        out = step(model, xs[rank], gs[rank])
        sync.sync()
        results.append(out)
    (y0, x0, g0), (y1, x1, g1) = results
    tol = {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(y1, y0, **tol)
    torch.testing.assert_close(x1, x0, **tol)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], **tol, msg=name)
    assert seen, "the grouped_mm path did not run"
    assert offsets and all(offsets)
    return sorted(g0)


def test_grouped_mm_equals_the_loop_at_ep2():
    names = ["0.experts.w1", "0.experts.w2", "0.router.weight"]
    assert run_on_ranks(_ep, 2, timeout=120) == [names, names]


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: compares the GPU's grouped_mm path (the default there, bf16) with "
    "the per-block loop",
)
def test_grouped_mm_equals_the_loop_on_the_gpu(monkeypatch):
    seen = calls(monkeypatch)
    for case in CASES:
        loop, grouped = pair(case, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(64, D, device="cuda", dtype=torch.bfloat16)
        g = torch.randn_like(x)
        want, got = step(loop, x, g), step(grouped, x, g)
        torch.testing.assert_close(got[0], want[0], rtol=3e-2, atol=3e-2)
        for name in want[2]:
            torch.testing.assert_close(got[2][name], want[2][name], rtol=3e-2, atol=3e-2)
    assert seen
