"""Tests of kernels/topk.py (expert-choice routing's top-k) against torch's stable
descending argsort, the order the Rust side's `argsort_descending(2).narrow(2, 0, k)` gives
with ties put in index order. On the CPU through Triton's interpreter:

    TRITON_INTERPRET=1 /opt/fixvenv/bin/python -m pytest kernels/test_topk.py -q
"""

import pytest
import torch

from kernels import topk
from kernels.common import interpreting

pytestmark = pytest.mark.skipif(
    not interpreting() and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device")

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
NUM_EXPERTS = 8


def reference(values, k):
    return torch.argsort(values, dim=2, descending=True, stable=True)[..., :k].to(torch.int32)


def check(values, k):
    got = topk.top_k_indices(values, k)
    want = reference(values, k)
    assert got.dtype == torch.int32 and got.shape == want.shape and got.is_contiguous()
    mismatch = (got != want).nonzero()
    assert mismatch.numel() == 0, (
        f"{mismatch.shape[0]} of {want.numel()} indices differ, first at {mismatch[0].tolist()}: "
        f"got {got[tuple(mismatch[0])].item()}, want {want[tuple(mismatch[0])].item()}"
    )


def router_probs(batch, tokens, seed):
    """Softmax over the experts of [N, T, E] logits, viewed as [N, E, T] (strided, as the
    model's `probs.swap_dims(1, 2)`)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, tokens, NUM_EXPERTS, generator=g)
    return torch.softmax(logits, dim=2).transpose(1, 2).to(DEVICE)


def capacity_k(capacity, tokens):
    return int(capacity * tokens / NUM_EXPERTS)


# T = 16; 64 (256 tokens, 75% masked in training); 256; 1024.
# Rows cost time in the interpreter: all 8 experts where T is small, 2 of them past that.
@pytest.mark.parametrize("tokens,batch,experts", [(16, 3, 8), (64, 2, 8), (256, 2, 2), (1024, 1, 2)])
@pytest.mark.parametrize("capacity", [1, 2])
def test_router_probabilities(tokens, batch, experts, capacity):
    values = router_probs(batch, tokens, seed=tokens + capacity)[:, :experts]
    assert values.stride(2) == NUM_EXPERTS  # the strided view itself
    check(values, capacity_k(capacity, tokens))


def test_one_row_of_4096():
    # One row: a [1, 1, 4096] slice of router probabilities, k for capacity 2.
    values = router_probs(1, 4096, seed=7)[:, 3:4, :]
    check(values, capacity_k(2, 4096))


@pytest.mark.parametrize("tokens", [16, 200])
def test_ties_quantised(tokens):
    # Few distinct values: long runs of equal values, broken by the smaller index.
    g = torch.Generator().manual_seed(tokens)
    values = torch.randint(0, 4, (2, 2, tokens), generator=g).float() / 4
    check(values.to(DEVICE), tokens)  # the whole order
    check(values.to(DEVICE), capacity_k(1, tokens))


def test_all_equal():
    values = torch.full((1, 2, 64), 0.125, device=DEVICE)
    check(values, 64)


def test_negative_and_signed_zero():
    # Negative values, +-0.0 (equal: the index decides), +-inf and subnormals, with ties.
    pool = torch.tensor(
        [-0.0, 0.0, -1.0, 1.0, -2.5, 2.5, -1e-42, 1e-42, -3.4e38, 3.4e38,
         float("-inf"), float("inf"), -0.5, 0.5, -1e-7, 1e-7]
    )
    g = torch.Generator().manual_seed(5)
    values = pool[torch.randint(0, pool.numel(), (2, 2, 100), generator=g)]
    check(values.to(DEVICE), 100)
    check(values.to(DEVICE), 13)


def test_signed_zero_index_order():
    # -0.0 before +0.0 in index order: -0.0 comes first (equal values, smaller index).
    values = torch.tensor([[[-1.0, -0.0, 0.0, -0.0, 0.0, -2.0]]], device=DEVICE)
    got = topk.top_k_indices(values, 6)
    assert got.tolist() == [[[1, 2, 3, 4, 0, 5]]]
    check(values, 6)


def test_negatives_random():
    g = torch.Generator().manual_seed(11)
    values = torch.randn(2, 3, 250, generator=g) * 1e3 - 3000  # almost all negative
    check(values.to(DEVICE), 37)


def test_strided_input():
    # Every dim strided and a storage offset: [N, E, T] picked out of a larger tensor.
    g = torch.Generator().manual_seed(3)
    big = torch.rand(5, 3 * NUM_EXPERTS, 2 * 256 + 1, generator=g).to(DEVICE)
    values = big[1::2, 1::6, 1::2]  # [2, 4, 256], strides (2·24·513, 6·513, 2)
    assert not values.is_contiguous()
    check(values, 32)
    # Rows permuted: expert stride 1.
    values = big[:2, :NUM_EXPERTS, :64].permute(0, 2, 1).contiguous().permute(0, 2, 1)
    assert values.stride(1) == 1
    check(values, 16)


@pytest.mark.parametrize("tokens,k", [(1, 1), (64, 1), (65, 64), (257, 257), (40, 0)])
def test_edges(tokens, k):
    # One token, k = 1, rows just past a block length (BLOCK_T 256, 1024), k = T, k = 0.
    g = torch.Generator().manual_seed(tokens)
    values = torch.rand(1, 1, tokens, generator=g).to(DEVICE)
    check(values, k)


def test_block_choice():
    assert [topk.block_t_for(t) for t in (1, 64, 65, 256, 257, 4096)] == [
        64, 64, 256, 256, 1024, 4096]
    with pytest.raises(ValueError):
        topk.block_t_for(4097)
    assert [b["constexprs"]["BLOCK_T"] for b in topk.BUILDS] == [64, 256, 1024, 4096]
    assert topk.grid(3, 8) == (24, 1, 1)
