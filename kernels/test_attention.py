"""Tests of the fused attention kernels against a float64 PyTorch reference.

Run on the CPU through Triton's interpreter (the kernels are the same source the GPU
build compiles):

    TRITON_INTERPRET=1 /opt/fixvenv/bin/python -m pytest kernels/test_attention.py -q

Every case checks the forward output, the log-sum-exp and the three gradients, each
against float64 autograd on the same (rounded) inputs, by relative L2 error.
"""

import pytest
import torch
import triton
import triton.language as tl

from kernels import attention as fa
from kernels.common import cast, dot, interpreting

pytestmark = pytest.mark.skipif(
    not interpreting() and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device")

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
# Relative L2 tolerances. The kernels' own error is about 3e-7 in f32, 2.5e-3 in bf16
# (below the unfused reference's own 3-5e-3 there: its scores are rounded to bf16) and
# 3e-4 in fp16.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def reference(q, k, v, do, causal):
    """(o, lse, dq, dk, dv) in float64: softmax(c·q kᵀ, key j > i hidden if causal) v."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        future = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    lse = torch.logsumexp(s, -1)
    o = torch.softmax(s, -1) @ v
    o.backward(do.double())
    return o, lse, q.grad, k.grad, v.grad


def rel_err(got, want):
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def fused(q, k, v, do, causal, **out):
    o, lse = fa.attention(q, k, v, causal, out=out.get("o"))
    dq, dk, dv = fa.attention_backward(q, k, v, o, lse, do, causal, dq=out.get("dq"),
                                       dk=out.get("dk"), dv=out.get("dv"))
    return o, lse, dq, dk, dv


def check(got, want, dtype):
    names = ("o", "lse", "dq", "dk", "dv")
    errs = {n: rel_err(g, w) for n, g, w in zip(names, got, want)}
    for n, g in zip(names, got):
        assert torch.isfinite(g).all(), f"{n} has NaN/inf"
    # LSE is computed in f32 whatever the operands (their rounding is in the reference's
    # inputs too), so it is held to the f32 tolerance.
    tol = {n: TOL[torch.float32] if n == "lse" else TOL[dtype] for n in names}
    assert all(errs[n] < tol[n] for n in names), errs


def randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def make(b, h, n, l, d, dtype, seed=0):
    q, do = (randn(b, h, n, d, dtype=dtype, seed=seed + i) for i in (0, 3))
    k, v = (randn(b, h, l, d, dtype=dtype, seed=seed + i) for i in (1, 2))
    return q, k, v, do


# (id, B, H, N, L, d, causal, dtype): the shapes microdit runs and the edges of the masks.
CASES = [
    # Text tower: 77 tokens, causal (not a multiple of any block).
    ("text_f32", 2, 3, 77, 77, 64, True, torch.float32),
    ("text_bf16", 2, 3, 77, 77, 64, True, torch.bfloat16),
    # Cross-attention of 256 patches over 77 text tokens, and over 8 caption tokens.
    ("cross77_f32", 1, 2, 256, 77, 64, False, torch.float32),
    ("cross77_bf16", 1, 2, 256, 77, 64, False, torch.bfloat16),
    ("cross8_bf16", 1, 2, 256, 8, 32, False, torch.bfloat16),
    # 64 of 256 patches kept under 75% masking.
    ("masked64_f32", 2, 2, 64, 64, 64, False, torch.float32),
    ("masked64_bf16", 2, 2, 64, 64, 64, False, torch.bfloat16),
    # 256 patches at the d = 32 preset.
    ("patches256_d32_f32", 1, 2, 256, 256, 32, False, torch.float32),
    ("patches256_d32_bf16", 1, 2, 256, 256, 32, False, torch.bfloat16),
    # Other head dims: 16 (the smallest tile), 80 (padded to 128, columns masked), 128.
    ("d16_causal_f32", 1, 2, 77, 77, 16, True, torch.float32),
    ("d80_f32", 1, 2, 77, 100, 80, False, torch.float32),
    ("d80_causal_bf16", 1, 2, 100, 100, 80, True, torch.bfloat16),
    ("d128_f32", 1, 1, 130, 70, 128, False, torch.float32),
    # Causal with N ≠ L: keys past the last query, and queries past the last key.
    ("causal_n_lt_l_f32", 1, 2, 77, 200, 32, True, torch.float32),
    ("causal_n_gt_l_f32", 1, 2, 200, 77, 32, True, torch.float32),
    # fp16 operands (not built ahead of time; the launcher runs them with bf16's tiles).
    ("text_fp16", 1, 2, 77, 77, 64, True, torch.float16),
]


@pytest.mark.parametrize("b,h,n,l,d,causal,dtype", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_matches_reference(b, h, n, l, d, causal, dtype):
    q, k, v, do = make(b, h, n, l, d, dtype)
    check(fused(q, k, v, do, causal), reference(q, k, v, do, causal), dtype)


@pytest.mark.parametrize("causal,dtype", [(False, torch.bfloat16), (True, torch.float32)],
                         ids=["bf16", "causal_f32"])
def test_1024_patches(causal, dtype):
    """1024 patches (several blocks on both axes); one head keeps the interpreter quick."""
    q, k, v, do = make(1, 1, 1024, 1024, 64, dtype, seed=7)
    check(fused(q, k, v, do, causal), reference(q, k, v, do, causal), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_strided_views_of_fused_qkv(dtype):
    """q, k, v and their gradients as views of one [B, N, 3·H·d] tensor, and o, dO in
    [B, N, H, d] layout, as the model holds them: the kernels must honour every stride."""
    b, h, n, d = 2, 3, 77, 32
    qkv = randn(b, n, 3 * h * d, dtype=dtype, seed=11)
    q, k, v = (qkv.view(b, n, 3, h, d)[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    do = randn(b, n, h, d, dtype=dtype, seed=12).permute(0, 2, 1, 3)
    o_buf = torch.full((b, n, h, d), float("nan"), dtype=dtype, device=DEVICE)
    dqkv = torch.full_like(qkv, float("nan"))
    dq, dk, dv = (dqkv.view(b, n, 3, h, d)[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    assert not q.is_contiguous() and q.stride() == (n * 3 * h * d, d, 3 * h * d, 1)

    got = fused(q, k, v, do, True, o=o_buf.permute(0, 2, 1, 3), dq=dq, dk=dk, dv=dv)
    check(got, reference(q, k, v, do, True), dtype)
    assert torch.isfinite(o_buf).all() and torch.isfinite(dqkv).all()


def test_stores_stay_in_bounds():
    """Outputs written into views of larger NaN-filled buffers: d = 80 pads to a 128-wide
    tile and 77 rows to 128, yet nothing past the views may be written."""
    b, h, n, d, pad = 1, 2, 77, 80, 8
    q, k, v, do = make(b, h, n, n, d, torch.float32, seed=21)
    bufs = {name: torch.full((b, h, n + pad, d + pad), float("nan"), device=DEVICE)
            for name in ("o", "dq", "dk", "dv")}
    views = {name: t[:, :, :n, :d] for name, t in bufs.items()}
    check(fused(q, k, v, do, True, **views), reference(q, k, v, do, True), torch.float32)
    for name, t in bufs.items():
        assert torch.isfinite(t[:, :, :n, :d]).all(), name
        assert torch.isnan(t[:, :, n:]).all() and torch.isnan(t[:, :, :, d:]).all(), name


def test_no_visible_key():
    """A query row that sees no key (here L = 0; top-left causal masking always leaves
    key 0 visible) gives the reference's empty sum: o = 0, dq = 0, LSE = -inf, no NaN."""
    q, k, v, do = make(1, 2, 77, 0, 32, torch.float32)
    o, lse, dq, dk, dv = fused(q, k, v, do, False)
    assert (o == 0).all() and (dq == 0).all() and dk.numel() == dv.numel() == 0
    assert (lse == float("-inf")).all()


def test_builds_and_grid_agree():
    """BUILDS covers every (kernel, dtype ∈ {fp32, bf16}, d ∈ {32, 64}, causal);
    signatures list the runtime arguments in kernel order, constexprs the rest; the tiles
    and launch options are the dtype's, and grid() uses the same tiles."""
    names = [e["name"] for e in fa.BUILDS]
    assert len(names) == len(set(names)) == 2 * 2 * (3 * 2 + 1)
    assert "attention_fwd_bf16_d64_causal0" in names
    assert "attention_bwd_preprocess_fp32_d32" in names
    assert not any("fp16" in n for n in names), "fp16 is left to burn"
    for e in fa.BUILDS:
        args = e["kernel"].arg_names
        assert list(e["signature"]) + list(e["constexprs"]) == args, e["name"]
        assert e["constexprs"].get("INTERPRET", False) is False
        assert e["constexprs"]["BLOCK_D"] >= e["constexprs"]["HEAD_DIM"]
        kind, dtype = e["kind"], e["dtype"]
        tiles = fa.tiles(kind, dtype)
        assert {k: e["constexprs"][k] for k in tiles} == tiles
        assert {k: e[k] for k in ("num_warps", "num_stages")} == fa.launch_options(
            kind, e["head_dim"], dtype)
        ptrs = [t for t in e["signature"].values() if t.startswith("*")]
        assert set(ptrs) <= {f"*{dtype}", "*fp32"}
        block = e["constexprs"][fa.GRID_AXIS_BLOCK[kind]]
        assert fa.grid(kind, 129, 6, dtype) == (triton.cdiv(129, block), 6, 1)
    assert fa.grid("fwd", 77, 6, "bf16") == (1, 6, 1)
    assert fa.grid("fwd", 77, 6, "fp32") == (3, 6, 1)
    assert fa.grid("bwd_dkdv", 129, 2, "bf16") == (3, 2, 1)
    assert fa.grid("bwd_dkdv", 129, 2, "fp32") == (5, 2, 1)


@triton.jit
def _cast_kernel(X, Y, INTERPRET: tl.constexpr):
    r = tl.arange(0, 1024)
    tl.store(Y + r, cast(tl.load(X + r), Y.dtype.element_ty, INTERPRET))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cast_rounds_to_nearest_even(dtype):
    """common.cast agrees bit for bit with torch's (and the GPU's) round-to-nearest-even,
    where the interpreter's own f32 → bf16 conversion truncates."""
    x = randn(1024, dtype=torch.float32, seed=31) * 100
    x[:4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), float("inf")])  # ties
    y = torch.empty(1024, dtype=dtype, device=DEVICE)
    _cast_kernel[(1,)](x, y, interpreting())
    assert torch.equal(y.view(torch.int16), x.to(dtype).view(torch.int16))


@triton.jit
def _dot_kernel(A, B, C, INTERPRET: tl.constexpr):
    r = tl.arange(0, 16)
    a = tl.load(A + r[:, None] * 16 + r[None, :])
    b = tl.load(B + r[:, None] * 16 + r[None, :])
    tl.store(C + r[:, None] * 16 + r[None, :],
             dot(a, b, tl.zeros([16, 16], tl.float32), INTERPRET))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "f32"])
def test_dot_accumulates_in_f32(dtype):
    """common.dot: the exact f32 product of bf16/fp16 operands (up to summation order),
    and true f32 (no TF32) for f32 operands."""
    a, b = (randn(16, 16, dtype=dtype, seed=s) for s in (41, 42))
    c = torch.empty(16, 16, device=DEVICE)
    _dot_kernel[(1,)](a, b, c, interpreting())
    assert rel_err(c, a.double() @ b.double()) < 1e-6
