"""Permutation plan, capacity ranks and the permute/unpermute autograd ops, by hand and by
gradcheck."""

from __future__ import annotations

import pytest
import torch

from moeflow.comm import build_plan, expert_capacity, permute, rank_within_expert, unpermute
from moeflow.comm.capacity import capacity_keep_mask
from moeflow.comm.permutation import carrier_width, combine, pair_counts


def test_plan_by_hand():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1]])  # pairs 0..5 -> experts 2,0,0,1,2,1
    plan = build_plan(ids, 3)
    assert plan.rows_per_expert == [2, 2, 2]
    assert plan.row_to_pair.tolist() == [1, 2, 3, 5, 0, 4]
    assert plan.pair_to_row.tolist() == [4, 0, 1, 2, 5, 3]
    keep = torch.tensor([[True, False], [True, True], [False, True]])
    plan = build_plan(ids, 3, keep_TK=keep)
    assert plan.rows_per_expert == [1, 2, 1] and plan.has_dropped
    assert plan.pair_to_row.tolist() == [3, -1, 0, 1, -1, 2]
    plan = build_plan(ids, 3, keep_TK=keep, pad_to=2)
    assert plan.row_to_pair.tolist() == [2, -1, 3, 5, 0, -1]
    with pytest.raises(ValueError, match="pad_to"):  # the counts given: checked on the host
        build_plan(ids, 3, pad_to=1, counts_host=pair_counts(ids, 3).tolist())
    with pytest.raises(RuntimeError, match="pad_to"):  # none given: checked on the device
        build_plan(ids, 3, pad_to=1)


def test_rank_within_expert():
    ids = torch.tensor([1, 0, 1, 1, 0])
    priority = torch.tensor([4, 3, 2, 1, 0])
    assert rank_within_expert(ids, priority, 2).tolist() == [2, 1, 1, 0, 0]


def test_expert_capacity():
    assert expert_capacity(10, 4, 2, 1.0) == 5
    assert expert_capacity(10, 4, 2, 1.25) == 7  # ceil(6.25)
    assert expert_capacity(10, 4, 1, 0.1, min_capacity=4) == 4


def test_permute_unpermute_roundtrip_and_values():
    torch.manual_seed(0)
    T, K, E, D = 7, 2, 3, 4
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    x = torch.randn(T, D)
    plan = build_plan(ids, E)
    buf = permute(x, plan)
    for row, pair in enumerate(plan.row_to_pair.tolist()):
        assert torch.equal(buf[row], x[pair // K])
    w = torch.rand(T, K)
    out = unpermute(buf, w, plan)
    torch.testing.assert_close(out, x * w.sum(1, keepdim=True))


@pytest.mark.parametrize("mode", ["dropless", "dropped", "padded"])
def test_gradcheck(mode):
    torch.manual_seed(1)
    T, K, E, D = 6, 2, 3, 3
    ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    keep = pad = None
    if mode != "dropless":
        keep = torch.rand(T, K) > 0.3
    if mode == "padded":
        pad = T * K
    plan = build_plan(ids, E, keep_TK=keep, pad_to=pad)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    m = torch.randn(D, D, dtype=torch.float64)

    def f(x, w):
        return unpermute(torch.tanh(permute(x, plan) @ m), w, plan)

    assert torch.autograd.gradcheck(f, (x, w))

    def carried(x, w):  # the weight travels as a last column; the "experts" weight their rows
        rows = permute(x, plan, w)
        return combine(torch.tanh(rows[:, :-1] @ m) * rows[:, -1:], plan)

    assert torch.autograd.gradcheck(carried, (x, w))
    torch.testing.assert_close(carried(x, w), f(x, w), rtol=1e-12, atol=1e-14)
    rows = permute(x, plan, w)
    assert rows.shape == (plan.num_rows, D + 1)
    if mode == "padded":  # padding rows carry weight 0
        assert not rows[plan.row_to_pair < 0].any()

    # An aligned carrier (rows that stay on the rank): the same values, the weight in column D,
    # zero columns after it, and the same function and gradients.
    width = carrier_width(D, x.dtype, aligned=True)
    assert width == 4 and carrier_width(D, torch.float32, aligned=True) == 4
    assert carrier_width(D, x.dtype, aligned=False) == D + 1
    wide = permute(x, plan, w, width)
    assert wide.shape == (plan.num_rows, width)
    assert torch.equal(wide[:, : D + 1], rows) and not wide[:, D + 1 :].any()

    def carried_wide(x, w):
        rows = permute(x, plan, w, width)
        return combine(torch.tanh(rows[:, :D] @ m) * rows[:, D : D + 1], plan)

    assert torch.autograd.gradcheck(carried_wide, (x, w))
    torch.testing.assert_close(carried_wide(x, w), f(x, w), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="needs more than 3 columns"):
        permute(x, plan, w, D)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_probs_capacity_one_sort_equals_the_two_sort_selection(dtype):
    # Below float64 the "probs" policy sorts once on an int64 key (expert, weight's bit pattern);
    # float64 weights take two stable sorts. The same weights in float64 (exact) must keep the
    # same pairs: ties to the earlier pair, negative weights and -0.0 == +0.0 included.
    gen = torch.Generator().manual_seed(5)
    for T, K, E in ((64, 4, 8), (37, 3, 5), (50, 1, 3)):
        for trial in range(6):
            w = torch.rand(T, K, generator=gen)
            if trial % 2 == 0:
                w = (w * 4).round() / 4  # many ties
            if trial % 3 == 1:
                w = w - 0.5  # negative weights
            w[0, 0], w[1, 0] = -0.0, 0.0
            w = w.to(dtype)
            ids = torch.randint(0, E, (T, K), generator=gen)
            cap = max(1, T * K // E * 3 // 4)
            fast = capacity_keep_mask(ids, w, E, cap, "probs")
            ref = capacity_keep_mask(ids, w.double(), E, cap, "probs")
            assert torch.equal(fast, ref), (T, K, E, trial)
            assert 0 < int(fast.sum()) < T * K
