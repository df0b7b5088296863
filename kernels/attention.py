"""Fused attention, forward and backward, FlashAttention-2 style (issue #34 item 1).

Semantics are microdit's reference, `attention_unfused` / `attention_backward_unfused` in
src/backend/mod.rs. For one (batch, head), q is [N, d], k and v are [L, d], c = d^-½:

    S = c · q kᵀ                      f32 accumulation
    S_ij = -inf  where causal and j > i   (burn's tril_mask: key j hidden from query i)
    P = softmax_j(S)                   f32
    O = P·v                            P cast to the operands' dtype, f32 accumulation

Forward (FlashAttention-2, Dao 2023, Algorithm 1): each program owns BLOCK_M query rows and
streams the keys in blocks of BLOCK_N, keeping a running row maximum m, a running sum
l = Σ_j exp(S_ij − m) and an unnormalised accumulator A = Σ_j exp(S_ij − m)·v_j. When a
new block raises the maximum to m', l and A are rescaled by exp(m − m'). At the end
O = A / l and the log-sum-exp LSE_i = m + log l = log Σ_j exp(S_ij) is stored (f32,
[B, H, N] contiguous) so the backward pass can rebuild P_ij = exp(S_ij − LSE_i) without
another reduction. Exponentials are taken as exp2 of log2(e)-scaled scores, the form the
GPU's ex2 instruction computes.

Backward, given dO (FlashAttention-2, Algorithm 2, split into two kernels so that no
program writes where another does: deterministic, no atomics):

    Delta_i = Σ_d dO_id · O_id         (= rowsum(P ∘ dP), since dP = dO vᵀ and O = P v)
    dv      = Pᵀ dO
    dP      = dO vᵀ                    f32
    dS      = P ∘ (dP − Delta)         the softmax Jacobian applied to dP
    dq      = (c·dS) k,    dk = (c·dS)ᵀ q     c·dS cast to the operands' dtype

`attention_bwd_preprocess` computes Delta; `attention_bwd_dkdv` owns BLOCK_N keys and
loops over the query blocks (dk, dv); `attention_bwd_dq` owns BLOCK_M queries and loops
over the key blocks (dq). P is recomputed in both.

Memory layout: every [B, H, rows, d] operand is read or written where it lies, through
its own batch, head and row strides (int32 arguments; the last dim must be contiguous).
Views of a fused [B, N, 3·H·d] qkv projection need no copy. LSE and Delta are contiguous
[B, H, N] f32. Lengths need not be multiples of the blocks and d need not be a power of
two: loads and stores are masked (BLOCK_D is d padded to a power of two ≥ 16). A query
row that sees no key (only when L = 0: the top-left causal mask always leaves key 0)
gets O = 0, dq = 0 and LSE = -inf, the reference's empty sums, never NaN.

Products go through common.dot and bf16 roundings through common.cast, which work around
two faults of Triton 3.9's interpreter (see there) so that the CPU tests check the
arithmetic the GPU does.

Argument order of every kernel: pointers, then the f32 scale c (where used), then strides
per tensor (b, h, row), then H, N, L (as used), then the constexprs HEAD_DIM, BLOCK_D,
BLOCK_M, BLOCK_N, CAUSAL, INTERPRET (as used). Grid: (cdiv(rows, BLOCK), B·H); program id
1 is b·H + h.
"""

import torch
import triton
import triton.language as tl

from .common import block_d, cast, dot, interpreting

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2 e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # log(x) = log2(x)·ln 2
NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))
POS_INF: tl.constexpr = tl.constexpr(float("inf"))

# ---------------------------------------------------------------------------------------
# Tile shapes and launch options: the one table the launcher, BUILDS and grid() read.
# ---------------------------------------------------------------------------------------
# Per operand dtype and kind of kernel: the tile (BLOCK_M query rows, BLOCK_N keys) and
# num_warps / num_stages. Chosen so that no variant spills registers on sm_80 or sm_90
# (`python kernels/build.py --check` fails on any spill); not yet tuned on a GPU.
#
# bf16 runs its products on the tensor cores. The forward keeps the usual FlashAttention-2
# 128×64 tile: at d = 64 (BLOCK_D ≥ 64) it holds a 128×64 f32 accumulator and 128×64
# scores, which eight warps (two Hopper warpgroups of 64 rows) keep in registers; four
# suffice at d = 32. The backward kernels hold two f32 accumulators (dk and dv) or
# rebuild P and dP per step, which at 64×64 fills sm_80's 255 registers and spills in
# dk/dv at d = 64; so each takes a 32-wide inner block (as Triton's FlashAttention-2
# tutorial does): dk/dv 64 keys × 32 queries per step, dq 64 queries × 32 keys per step.
#
# fp32 (exact, `input_precision="ieee"`) has no tensor-core path: the products run on
# the FMA units, each thread holding its rows' full d-long slice of both operands, so the
# tiles are small: 32×32 everywhere (a 64×32 forward tile with four warps spills
# hundreds of bytes at d = 64), with eight warps for dk/dv (four spill on sm_90 at
# d = 64) and four for dq (eight make sm_90's ptxas cap dq at 80 registers and spill).
#
# fp16 is not built ahead of time (the Rust side leaves fp16 attention to burn); it takes
# bf16's shapes so the launcher can still run it, e.g. under the interpreter.
#
# "num_warps" may be a dict {minimum BLOCK_D: warps}, the largest key ≤ BLOCK_D applying.
# The block along each kind's grid axis (GRID_AXIS_BLOCK) must not depend on the head dim:
# grid() has none.
_BF16_CONFIG = {
    "fwd": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": {16: 4, 64: 8}, "num_stages": 3},
    "bwd_preprocess": {"BLOCK_M": 128, "num_warps": 4, "num_stages": 1},
    "bwd_dkdv": {"BLOCK_M": 32, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
    "bwd_dq": {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
}
CONFIG = {
    "fp32": {
        "fwd": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
        "bwd_preprocess": {"BLOCK_M": 128, "num_warps": 4, "num_stages": 1},
        "bwd_dkdv": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 8, "num_stages": 2},
        "bwd_dq": {"BLOCK_M": 32, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2},
    },
    "bf16": _BF16_CONFIG,
    "fp16": _BF16_CONFIG,
}
GRID_AXIS_BLOCK = {"fwd": "BLOCK_M", "bwd_preprocess": "BLOCK_M", "bwd_dkdv": "BLOCK_N",
                   "bwd_dq": "BLOCK_M"}
# The operand dtypes the launcher takes, and those built ahead of time (BUILDS).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRITON_DTYPES = {t: name for name, t in DTYPES.items()}
BUILD_DTYPES = ("fp32", "bf16")
HEAD_DIMS = (32, 64)


def tiles(kind: str, dtype: str) -> dict:
    """The BLOCK_* constexprs of a kind of kernel for an operand dtype ("fp32", "bf16",
    "fp16")."""
    return {k: v for k, v in CONFIG[dtype][kind].items() if k.startswith("BLOCK_")}


def launch_options(kind: str, head_dim: int, dtype: str) -> dict:
    """num_warps and num_stages for a kind of kernel, head dim and operand dtype."""
    config = CONFIG[dtype][kind]
    warps = config["num_warps"]
    if isinstance(warps, dict):
        warps = warps[max(k for k in warps if k <= block_d(head_dim))]
    return {"num_warps": warps, "num_stages": config["num_stages"]}


def grid(kernel_kind: str, n_rows: int, batch_heads: int, dtype: str) -> tuple:
    """Launch grid: one program per block of rows (queries; keys for bwd_dkdv) per head.
    B·H rides on grid axis 1, which CUDA caps at 65,535."""
    assert batch_heads <= 65535, batch_heads
    block = CONFIG[dtype][kernel_kind][GRID_AXIS_BLOCK[kernel_kind]]
    return (triton.cdiv(n_rows, block), batch_heads, 1)


# ---------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------
@triton.jit
def _head_base(ptr, stride_b, stride_h, H):
    """Pointer to (b, h)'s [rows, d] matrix, b·H + h being program id 1. The offset is
    taken in int64: B·stride_b can pass 2^31 where one head's rows do not."""
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return ptr + b * stride_b + h * stride_h


@triton.jit
def _tile_mask(rows, n_rows, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """In-bounds elements of a [rows, BLOCK_D] tile; the column test only when d is
    padded (a [rows, 1] mask otherwise, which loads and stores broadcast)."""
    if HEAD_DIM == BLOCK_D:
        mask = rows[:, None] < n_rows
    else:
        mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    return mask


@triton.jit
def _load_tile(base, rows, n_rows, stride_row, cols, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Rows `rows` of a [n_rows, HEAD_DIM] matrix; zeros outside, which add nothing to
    any product over d."""
    mask = _tile_mask(rows, n_rows, cols, HEAD_DIM, BLOCK_D)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, value, rows, n_rows, stride_row, cols, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    mask = _tile_mask(rows, n_rows, cols, HEAD_DIM, BLOCK_D)
    tl.store(base + rows[:, None] * stride_row + cols[None, :],
             cast(value, base.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def _visible(q_idx, k_idx, L, CAUSAL: tl.constexpr):
    """Which (query, key) pairs take part: keys in range and, when causal, j ≤ i (the
    reference masks j > i). q_idx and k_idx come pre-broadcast, so the same helper serves
    the [queries, keys] tiles and the transposed [keys, queries] ones."""
    ok = k_idx < L
    if CAUSAL:
        ok = ok & (k_idx <= q_idx)
    return ok


# ---------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------
@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn, qk_scale, rows,
                cols, lo, hi, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                INTERPRET: tl.constexpr):
    """Online softmax over key blocks [lo, hi) (FlashAttention-2, Algorithm 1).
    m_i is in log2 units (scores scaled by c·log2 e). MASKED applies the key-range and
    causal mask; the caller only clears it for blocks where every pair is visible."""
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, L, stride_kn, cols, HEAD_DIM, BLOCK_D)
        v = _load_tile(v_base, keys, L, stride_vn, cols, HEAD_DIM, BLOCK_D)
        s = dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], tl.float32), INTERPRET)
        s = s * qk_scale
        if MASKED:
            s = tl.where(_visible(rows[:, None], keys[None, :], L, CAUSAL), s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet has m_new = -inf: subtracting 0 instead keeps
        # exp2(-inf - -inf) = NaN out (its p and alpha are then exactly 0). Unreachable
        # for stored rows under today's masks (key 0 is visible to every row and blocks
        # run from key 0), kept so that a new mask cannot turn such rows into NaN.
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # The reference casts P to the operands' dtype before P·v; so do we.
        acc = dot(cast(p, v.dtype, INTERPRET), v, acc * alpha[:, None], INTERPRET)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_key_ranges(start_m, L, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr):
    """Key blocks for query rows [start_m, start_m + BLOCK_M): [0, full_end) need no mask
    (every key < L and, when causal, ≤ the block's first row), [full_end, hi) do."""
    if CAUSAL:
        hi = tl.minimum(L, start_m + BLOCK_M)
        full_end = (tl.minimum(L, start_m + 1) // BLOCK_N) * BLOCK_N
    else:
        hi = L
        full_end = (L // BLOCK_N) * BLOCK_N
    return full_end, hi


@triton.jit
def attention_fwd(Q, K, V, O, LSE, scale,
                  stride_qb, stride_qh, stride_qn,
                  stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn,
                  stride_ob, stride_oh, stride_on,
                  H, N, L,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, INTERPRET: tl.constexpr):
    """O = softmax(c·q kᵀ [causal mask]) v and LSE for BLOCK_M query rows of one head."""
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    k_base = _head_base(K, stride_kb, stride_kh, H)
    v_base = _head_base(V, stride_vb, stride_vh, H)
    q = _load_tile(_head_base(Q, stride_qb, stride_qh, H), rows, N, stride_qn, cols,
                   HEAD_DIM, BLOCK_D)
    qk_scale = scale * LOG2E

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    full_end, hi = _fwd_key_ranges(start_m, L, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                qk_scale, rows, cols, 0, full_end, L, HEAD_DIM, BLOCK_D,
                                BLOCK_N, False, CAUSAL, INTERPRET)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_vn,
                                qk_scale, rows, cols, full_end, hi, L, HEAD_DIM, BLOCK_D,
                                BLOCK_N, True, CAUSAL, INTERPRET)

    # A row that saw no key (only possible when L = 0) has l = 0: output 0 (the
    # reference's empty product) and LSE = -inf rather than 0/0.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    _store_tile(_head_base(O, stride_ob, stride_oh, H), acc / l_safe[:, None], rows, N,
                stride_on, cols, HEAD_DIM, BLOCK_D, INTERPRET)
    lse = (m_i + tl.log2(l_safe)) * LN2  # back to natural-log units
    tl.store(LSE + tl.program_id(1) * N + rows, lse, mask=rows < N)


# ---------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------
@triton.jit
def attention_bwd_preprocess(O, DO, Delta,
                             stride_ob, stride_oh, stride_on,
                             stride_dob, stride_doh, stride_don,
                             H, N,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr):
    """Delta_i = Σ_d dO_id·O_id in f32 (FlashAttention-2, Algorithm 2): equal to
    rowsum(P ∘ dP) of the reference, and read once per row instead of recomputed."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    o = _load_tile(_head_base(O, stride_ob, stride_oh, H), rows, N, stride_on, cols,
                   HEAD_DIM, BLOCK_D)
    do = _load_tile(_head_base(DO, stride_dob, stride_doh, H), rows, N, stride_don, cols,
                    HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + tl.program_id(1) * N + rows, delta, mask=rows < N)


@triton.jit
def _load_row_stats(LSE, Delta, rows, N):
    """LSE (in log2 units) and Delta for query rows. Rows past N read LSE = +inf, so their
    P = exp2(s − inf) is 0 and they add nothing to dk or dv without a row mask."""
    offs = tl.program_id(1) * N + rows
    lse2 = tl.load(LSE + offs, mask=rows < N, other=POS_INF) * LOG2E
    delta = tl.load(Delta + offs, mask=rows < N, other=0.0)
    return lse2, delta


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE, Delta, stride_qn, stride_don,
                 qk_scale, scale, keys, cols, lo, hi, N, L, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                 CAUSAL: tl.constexpr, INTERPRET: tl.constexpr):
    """dk, dv of one key block from query blocks [lo, hi). Tiles are kept transposed,
    [keys, queries], so that dv += Pᵀ dO and dk += dSᵀ q need no transposed accumulator."""
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, N, stride_qn, cols, HEAD_DIM, BLOCK_D)
        do = _load_tile(do_base, rows, N, stride_don, cols, HEAD_DIM, BLOCK_D)
        lse2, delta = _load_row_stats(LSE, Delta, rows, N)
        zeros = tl.zeros([k.shape[0], BLOCK_M], tl.float32)
        # Pᵀ_ji = exp(S_ij − LSE_i), rebuilt from the forward's LSE.
        p_t = tl.exp2(dot(k, tl.trans(q), zeros, INTERPRET) * qk_scale - lse2[None, :])
        if MASKED:
            p_t = tl.where(_visible(rows[None, :], keys[:, None], L, CAUSAL), p_t, 0.0)
        dv = dot(cast(p_t, do.dtype, INTERPRET), do, dv, INTERPRET)
        dp_t = dot(v, tl.trans(do), zeros, INTERPRET)
        ds_t = p_t * (dp_t - delta[None, :]) * scale
        dk = dot(cast(ds_t, q.dtype, INTERPRET), q, dk, INTERPRET)
    return dk, dv


@triton.jit
def _dkdv_query_ranges(start_n, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
    """Query blocks for keys [start_n, start_n + BLOCK_N): causally, none before the block
    holding row start_n sees them; those starting before start_n + BLOCK_N − 1 see only
    some (masked), the rest all (unmasked). Out-of-range keys are never stored and
    out-of-range rows carry P = 0, so only the causal mask needs blocks of its own."""
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        mask_end = lo + tl.cdiv(start_n + BLOCK_N - 1 - lo, BLOCK_M) * BLOCK_M
        mask_end = tl.minimum(mask_end, N)
    else:
        lo = 0
        mask_end = 0
    return lo, mask_end


@triton.jit
def attention_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, scale,
                       stride_qb, stride_qh, stride_qn,
                       stride_kb, stride_kh, stride_kn,
                       stride_vb, stride_vh, stride_vn,
                       stride_dob, stride_doh, stride_don,
                       stride_dkb, stride_dkh, stride_dkn,
                       stride_dvb, stride_dvh, stride_dvn,
                       H, N, L,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr, INTERPRET: tl.constexpr):
    """dv = Pᵀ dO and dk = (c·dS)ᵀ q for BLOCK_N keys of one head."""
    start_n = tl.program_id(0) * BLOCK_N
    keys = start_n + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = _load_tile(_head_base(K, stride_kb, stride_kh, H), keys, L, stride_kn, cols,
                   HEAD_DIM, BLOCK_D)
    v = _load_tile(_head_base(V, stride_vb, stride_vh, H), keys, L, stride_vn, cols,
                   HEAD_DIM, BLOCK_D)
    q_base = _head_base(Q, stride_qb, stride_qh, H)
    do_base = _head_base(DO, stride_dob, stride_doh, H)
    qk_scale = scale * LOG2E

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, mask_end = _dkdv_query_ranges(start_n, N, BLOCK_M, BLOCK_N, CAUSAL)
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE, Delta, stride_qn,
                          stride_don, qk_scale, scale, keys, cols, lo, mask_end, N, L,
                          HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, INTERPRET)
    dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, LSE, Delta, stride_qn,
                          stride_don, qk_scale, scale, keys, cols, mask_end, N, N, L,
                          HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, INTERPRET)

    _store_tile(_head_base(DK, stride_dkb, stride_dkh, H), dk, keys, L, stride_dkn, cols,
                HEAD_DIM, BLOCK_D, INTERPRET)
    _store_tile(_head_base(DV, stride_dvb, stride_dvh, H), dv, keys, L, stride_dvn, cols,
                HEAD_DIM, BLOCK_D, INTERPRET)


@triton.jit
def _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, qk_scale,
               scale, rows, cols, lo, hi, L, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               INTERPRET: tl.constexpr):
    """dq of one query block from key blocks [lo, hi): dq += (c·dS) k."""
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, L, stride_kn, cols, HEAD_DIM, BLOCK_D)
        v = _load_tile(v_base, keys, L, stride_vn, cols, HEAD_DIM, BLOCK_D)
        zeros = tl.zeros([q.shape[0], BLOCK_N], tl.float32)
        p = tl.exp2(dot(q, tl.trans(k), zeros, INTERPRET) * qk_scale - lse2[:, None])
        if MASKED:
            p = tl.where(_visible(rows[:, None], keys[None, :], L, CAUSAL), p, 0.0)
        dp = dot(do, tl.trans(v), zeros, INTERPRET)
        ds = p * (dp - delta[:, None]) * scale
        dq = dot(cast(ds, k.dtype, INTERPRET), k, dq, INTERPRET)
    return dq


@triton.jit
def attention_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, scale,
                     stride_qb, stride_qh, stride_qn,
                     stride_kb, stride_kh, stride_kn,
                     stride_vb, stride_vh, stride_vn,
                     stride_dob, stride_doh, stride_don,
                     stride_dqb, stride_dqh, stride_dqn,
                     H, N, L,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, INTERPRET: tl.constexpr):
    """dq = (c·dS) k for BLOCK_M query rows of one head."""
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_tile(_head_base(Q, stride_qb, stride_qh, H), rows, N, stride_qn, cols,
                   HEAD_DIM, BLOCK_D)
    do = _load_tile(_head_base(DO, stride_dob, stride_doh, H), rows, N, stride_don, cols,
                    HEAD_DIM, BLOCK_D)
    lse2, delta = _load_row_stats(LSE, Delta, rows, N)
    k_base = _head_base(K, stride_kb, stride_kh, H)
    v_base = _head_base(V, stride_vb, stride_vh, H)
    qk_scale = scale * LOG2E

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_end, hi = _fwd_key_ranges(start_m, L, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, qk_scale,
                    scale, rows, cols, 0, full_end, L, HEAD_DIM, BLOCK_D, BLOCK_N, False,
                    CAUSAL, INTERPRET)
    dq = _dq_blocks(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, qk_scale,
                    scale, rows, cols, full_end, hi, L, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                    CAUSAL, INTERPRET)
    _store_tile(_head_base(DQ, stride_dqb, stride_dqh, H), dq, rows, N, stride_dqn, cols,
                HEAD_DIM, BLOCK_D, INTERPRET)


# ---------------------------------------------------------------------------------------
# Host side: launchers (used by the tests) and the ahead-of-time build list
# ---------------------------------------------------------------------------------------
KERNELS = {
    "fwd": attention_fwd,
    "bwd_preprocess": attention_bwd_preprocess,
    "bwd_dkdv": attention_bwd_dkdv,
    "bwd_dq": attention_bwd_dq,
}


def _strides(t: torch.Tensor) -> tuple:
    """(b, h, row) strides of a [B, H, rows, d] tensor whose last dim is contiguous."""
    assert t.dim() == 4, t.shape
    assert t.stride(3) == 1 or t.shape[3] == 1, "the head dim must be contiguous"
    strides = t.stride(0), t.stride(1), t.stride(2)
    assert max(strides) < 2**31, "strides are int32 arguments"
    return strides


def _constexprs(kind: str, dtype: str, head_dim: int, causal: bool, interpret: bool) -> dict:
    """The constexpr arguments a kernel of this kind takes, in signature order."""
    c = {"HEAD_DIM": head_dim, "BLOCK_D": block_d(head_dim), **tiles(kind, dtype)}
    if kind != "bwd_preprocess":
        c.update(CAUSAL=causal, INTERPRET=interpret)
    return c


def _launch(kind, rows, b, h, head_dim, causal, *args):
    dtype = TRITON_DTYPES[args[0].dtype]
    KERNELS[kind][grid(kind, rows, b * h, dtype)](
        *args, **_constexprs(kind, dtype, head_dim, causal, interpreting()),
        **launch_options(kind, head_dim, dtype))


def _check(q, k, v):
    assert q.dtype == k.dtype == v.dtype, (q.dtype, k.dtype, v.dtype)
    assert q.shape[:2] == k.shape[:2] == v.shape[:2] and k.shape == v.shape
    assert q.shape[3] == k.shape[3]


def attention(q, k, v, causal=False, out=None):
    """Fused attention forward. q [B, H, N, d], k and v [B, H, L, d], any strides with a
    contiguous last dim. Returns (out [B, H, N, d] in q's dtype, lse [B, H, N] f32);
    `out` may be given (a view anywhere, e.g. into a [B, N, H, d] buffer)."""
    _check(q, k, v)
    b, h, n, d = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    lse = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    if n == 0:
        return out, lse
    _launch("fwd", n, b, h, d, causal, q, k, v, out, lse, d ** -0.5,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), h, n, k.shape[2])
    return out, lse


def attention_backward(q, k, v, o, lse, do, causal=False, dq=None, dk=None, dv=None):
    """Fused attention backward from the forward's o and lse and the output gradient do.
    Returns (dq, dk, dv); each may be given as a view to write into."""
    _check(q, k, v)
    b, h, n, d = q.shape
    l = k.shape[2]
    new = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
    dq = new(q) if dq is None else dq
    dk = new(k) if dk is None else dk
    dv = new(v) if dv is None else dv
    scale = d ** -0.5
    if n == 0:
        dk.zero_()
        dv.zero_()
        return dq, dk, dv
    delta = torch.empty((b, h, n), device=q.device, dtype=torch.float32)
    _launch("bwd_preprocess", n, b, h, d, causal, o, do, delta, *_strides(o),
            *_strides(do), h, n)
    if l > 0:
        _launch("bwd_dkdv", l, b, h, d, causal, q, k, v, do, lse, delta, dk, dv, scale,
                *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk),
                *_strides(dv), h, n, l)
    _launch("bwd_dq", n, b, h, d, causal, q, k, v, do, lse, delta, dq, scale,
            *_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq),
            h, n, l)
    return dq, dk, dv


# Ahead-of-time variants: Triton type of each runtime argument, by kernel kind. "T" is
# the operands' dtype.
_POINTERS = {
    "fwd": ["Q:T", "K:T", "V:T", "O:T", "LSE:f"],
    "bwd_preprocess": ["O:T", "DO:T", "Delta:f"],
    "bwd_dkdv": ["Q:T", "K:T", "V:T", "DO:T", "LSE:f", "Delta:f", "DK:T", "DV:T"],
    "bwd_dq": ["Q:T", "K:T", "V:T", "DO:T", "LSE:f", "Delta:f", "DQ:T"],
}


def signature(kind: str, dtype: str) -> dict:
    """Argument name → Triton type for the runtime arguments of a kernel, in order; the
    strides, H, N and L are i32, the scale fp32."""
    types = {"T": f"*{dtype}", "f": "*fp32"}
    sig = {}
    for name, t in (p.split(":") for p in _POINTERS[kind]):
        sig[name] = types[t]
    for name in KERNELS[kind].arg_names[len(sig):]:
        if name in _constexprs(kind, dtype, 64, False, False):
            break
        sig[name] = "fp32" if name == "scale" else "i32"
    return sig


def _builds() -> list:
    builds = []
    for kind, kernel in KERNELS.items():
        for dtype in BUILD_DTYPES:
            for d in HEAD_DIMS:
                for causal in ((None,) if kind == "bwd_preprocess" else (False, True)):
                    suffix = "" if causal is None else f"_causal{int(causal)}"
                    builds.append({
                        "name": f"attention_{kind}_{dtype}_d{d}{suffix}",
                        "kernel": kernel,
                        "signature": signature(kind, dtype),
                        "constexprs": _constexprs(kind, dtype, d, bool(causal), False),
                        **launch_options(kind, d, dtype),
                        # Not needed to compile; for whoever launches the cubin.
                        "kind": kind, "dtype": dtype, "head_dim": d, "causal": causal,
                    })
    return builds


# One entry per (kernel, dtype in BUILD_DTYPES, head dim, causal); the preprocess kernel
# has no mask, so one per (dtype, head dim), named without the causal suffix.
BUILDS = _builds()
