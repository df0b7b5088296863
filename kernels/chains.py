"""microdit's fused element-wise chains as Triton kernels, one each way.

The same source runs on the CPU under ``TRITON_INTERPRET=1`` (the tests) and compiles ahead
of time to cubins (``BUILDS``). The math is the Rust side's (``src/backend``): the trait
methods' unfused defaults are the references, the CPU kernels (``src/backend/flex``) the
model for order and precision. Every tensor is read in its own type and computed in f32
(statistics, sums and partial sums too); each output is rounded once to its pointer's type.

Chains (``r = (var + ε)^-½`` with the biased variance, two passes: mean, then
``Σ(x − mean)²``; ``σ(v) = 1/(1 + e^-v)``):

1. Layer norm with a scale and no shift (``MicroditBackend::scaled_layer_norm``), rows of ``dim``,
   γ ``[dim]``: ``x̂ = (x − mean)·r``, ``y = x̂·γ``. Backward, with ``h = grad·γ``:
   ``dx = r·(h − mean(h) − x̂·mean(h·x̂))`` and ``dγ = Σ_rows grad·x̂``. The statistics are
   recomputed from x (the trait's backward gets x, γ, grad and ε). Rows may be strided
   (the q/k norms read a slice of the qkv projection). The modulation is its own chain:
   the Rust side does not fuse it into the norm (``MicroditBackend::modulate``; fusing it on the
   CPU was tried and not kept, docs/BENCHMARKS.md).
2. SwiGLU's product (``MicroditBackend::swiglu``): ``out = silu(gate)·value = gate·σ(gate)·value``;
   backward ``dvalue = grad·gate·σ(gate)``,
   ``dgate = grad·value·σ(gate)·(1 + gate·(1 − σ(gate)))``.
3. Exact GELU (``MicroditBackend::gelu_exact``): ``y = x·Φ(x)``; backward ``dx = grad·(Φ(x) + x·φ(x))``,
   ``φ(x) = e^(−x²/2)/√(2π)``. Φ as the CPU kernel computes it, ``½·erfc(−x/√2)`` by
   Numerical Recipes' Chebyshev fit (relative error ~1e-7), so the lower tail keeps its
   precision where ``½(1 + erf(x/√2))`` cancels.
4. AdaLN modulation of tokens ``[B, N, D]`` by per-sample ``[B, D]`` vectors
   (``MicroditBackend::modulate``): ``y = x·(1 + scale) + shift``; backward ``dx = grad·(1 + scale)``,
   ``dshift = Σ_tokens grad``, ``dscale = Σ_tokens grad·x``.
5. Gated residual (``MicroditBackend::gated_residual``): ``y = x + gate·branch``, gate ``[B, D]``;
   backward ``dx = grad`` (returned as is), ``dbranch = grad·gate``,
   ``dgate = Σ_tokens grad·branch``.
6. Group norm of ``[B, C, H, W]`` with ``G`` groups, per-channel γ, β, then SiLU if asked
   (``MicroditBackend::group_norm``, PyTorch's ``group_norm``): per (sample, group),
   ``z = x̂·γ_c + β_c``, ``y = silu(z)`` or ``z``. Backward (the Rust side has none yet: it is
   autograd's of that forward): ``dz = grad·σ(z)·(1 + z·(1 − σ(z)))`` or ``grad``,
   ``h = dz·γ_c``, ``dx = r·(h − mean_g(h) − x̂·mean_g(h·x̂))``, ``dγ_c = Σ dz·x̂``,
   ``dβ_c = Σ dz`` (sums over samples and the plane).

Gradients that are sums over rows (dγ, dshift, dscale, dgate, GroupNorm's dγ and dβ) never
use atomics: each program writes its partial sums to an f32 buffer (``scratch`` gives its
shape), and ``sum_partials`` adds them in a fixed order, so results are bitwise
reproducible for given sizes.

Every kernel takes pointers, then scalars (ε as fp32), then int32 sizes and strides, then
its constexpr block sizes and ``INTERPRET`` last (True under the interpreter). It only
changes how outputs are rounded to bf16 (``common.cast``: the interpreter would truncate
where the GPU rounds to nearest even); every other operation used (``div_rn``,
``sqrt_rn``, ``exp``, loops with run-time bounds) runs the same on both paths.
"""

import torch
import triton
import triton.language as tl

from .common import cast, interpreting

# Block sizes, defined once: the launchers, `grid`, `scratch` and `BUILDS` read them.
# Registers grow with a step's elements per thread (the layer norm's backward keeps about
# ten values live per element): at 4 warps, its 16×32 steps need 80 registers on sm_80,
# 16×64 ~160 and 16×128 spill. ROWS also sets how many partial sums a backward writes
# (one row per ROWS rows), so it stays at 16 and the steps are narrow instead.
ELEMENTS = 1024  # element-wise kernels: elements per program
ROWS = 16  # row kernels: rows (tokens of one sample) per program
LN_COLS = 32  # layer norm: columns per step along a row
TOKEN_COLS = 64  # modulation, gated residual: features per program
PARTS, PART_COLS = 32, 128  # sum_partials: partial rows × columns per step
PLANE = 512  # group norm: elements per step along a channel's plane
NUM_WARPS = 4
NUM_STAGES = 1  # no loads to pipeline across loop steps worth the shared memory

# Each kernel's constexprs (INTERPRET is added at launch, False in `BUILDS`).
LN_BLOCKS = dict(ROWS=ROWS, COLS=LN_COLS)
TOKEN_BLOCKS = dict(ROWS=ROWS, COLS=TOKEN_COLS)
CONSTEXPRS = {
    "layer_norm_fwd": LN_BLOCKS,
    "layer_norm_bwd": LN_BLOCKS,
    "sum_partials": dict(PARTS=PARTS, COLS=PART_COLS),
    "swiglu_fwd": dict(BLOCK=ELEMENTS),
    "swiglu_bwd": dict(BLOCK=ELEMENTS),
    "gelu_fwd": dict(BLOCK=ELEMENTS),
    "gelu_bwd": dict(BLOCK=ELEMENTS),
    "modulate_fwd": TOKEN_BLOCKS,
    "modulate_bwd": TOKEN_BLOCKS,
    "gated_residual_fwd": TOKEN_BLOCKS,
    "gated_residual_bwd": TOKEN_BLOCKS,
    "group_norm_fwd": dict(BLOCK=PLANE),
    "group_norm_bwd": dict(BLOCK=PLANE),
}


# --- shared pieces -------------------------------------------------------------------


@triton.jit
def _sigmoid(v):
    # As the CPU kernel: 1/(1 + e^-v); e^-v = inf for v < -88 gives 0, not NaN.
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _silu_slope(v):
    # d silu(v)/dv = σ(v)·(1 + v·(1 − σ(v))), SwiGLU's and the group norm's.
    s = _sigmoid(v)
    return s * (1.0 + v * (1.0 - s))


@triton.jit
def _inv_std(var, eps):
    # Correctly rounded, as the CPU's 1/(var + ε).sqrt() (the default sqrt is approximate).
    return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _flat(n, BLOCK: tl.constexpr):
    # This program's elements of a flat tensor of n; 64-bit so that the last block's
    # offsets cannot wrap when n is near 2³¹.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


@triton.jit
def _load(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store(ptr, offs, value, mask, INTERPRET: tl.constexpr):
    # Rounded once, to nearest even on both paths (see common.cast).
    tl.store(ptr + offs, cast(value, ptr.dtype.element_ty, INTERPRET), mask=mask)


# --- deterministic sums ----------------------------------------------------------------


@triton.jit
def sum_partials(
    part_ptr, out_ptr, parts, cols, PARTS: tl.constexpr, COLS: tl.constexpr, INTERPRET: tl.constexpr
):
    """``out[g, c] = Σ_p part[g, p, c]`` (f32 partials, contiguous ``[G, parts, cols]``),
    in a fixed order: row p into lane p mod PARTS, then the lanes' tree."""
    g = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * COLS + tl.arange(0, COLS)
    acc = tl.zeros([PARTS, COLS], tl.float32)
    for p0 in range(0, parts, PARTS):
        p = p0 + tl.arange(0, PARTS)
        mask = (p[:, None] < parts) & (c[None, :] < cols)
        acc += _load(part_ptr, (g * parts + p[:, None]) * cols + c[None, :], mask)
    _store(out_ptr, g * cols + c, tl.sum(acc, axis=0), c < cols, INTERPRET)


# --- 1. layer norm with a scale -----------------------------------------------------------


@triton.jit
def _row_tile(rows, ROWS: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    return row, row < rows


@triton.jit
def _cols(c0, dim, row_ok, COLS: tl.constexpr):
    col = c0 + tl.arange(0, COLS)
    return col, row_ok[:, None] & (col[None, :] < dim)


@triton.jit
def _row_moments(x_ptr, x_row, row_ok, dim, eps, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Each row's mean and r = (var + ε)^-½, in two passes as the CPU kernel (one pass,
    E[x²] − mean², loses the variance when |mean| ≫ std)."""
    total = tl.zeros([ROWS, COLS], tl.float32)
    for c0 in range(0, dim, COLS):
        col, mask = _cols(c0, dim, row_ok, COLS)
        total += _load(x_ptr, x_row[:, None] + col[None, :], mask)
    mean = tl.sum(total, axis=1) / dim
    squares = tl.zeros([ROWS, COLS], tl.float32)
    for c0 in range(0, dim, COLS):
        col, mask = _cols(c0, dim, row_ok, COLS)
        x = _load(x_ptr, x_row[:, None] + col[None, :], mask)
        centered = tl.where(mask, x - mean[:, None], 0.0)
        squares += centered * centered
    return mean, _inv_std(tl.sum(squares, axis=1) / dim, eps)


@triton.jit
def layer_norm_fwd(
    x_ptr,
    gamma_ptr,
    y_ptr,
    eps,
    rows,
    dim,
    x_stride,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``y = (x − mean)·r·γ`` for ROWS rows (x's rows x_stride apart, y contiguous)."""
    row, row_ok = _row_tile(rows, ROWS)
    x_row = row.to(tl.int64) * x_stride
    y_row = row.to(tl.int64) * dim
    mean, r = _row_moments(x_ptr, x_row, row_ok, dim, eps, ROWS, COLS)
    for c0 in range(0, dim, COLS):
        col, mask = _cols(c0, dim, row_ok, COLS)
        x = _load(x_ptr, x_row[:, None] + col[None, :], mask)
        gamma = _load(gamma_ptr, col, col < dim)
        y = (x - mean[:, None]) * r[:, None] * gamma[None, :]
        _store(y_ptr, y_row[:, None] + col[None, :], y, mask, INTERPRET)


@triton.jit
def layer_norm_bwd(
    x_ptr,
    gamma_ptr,
    grad_ptr,
    dx_ptr,
    part_ptr,
    eps,
    rows,
    dim,
    x_stride,
    grad_stride,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dx of ROWS rows, and their ``Σ grad·x̂`` as row ``program_id`` of the partial
    buffer ``[cdiv(rows, ROWS), dim]`` (each element written once: no atomics)."""
    row, row_ok = _row_tile(rows, ROWS)
    x_row = row.to(tl.int64) * x_stride
    grad_row = row.to(tl.int64) * grad_stride
    out_row = row.to(tl.int64) * dim
    mean, r = _row_moments(x_ptr, x_row, row_ok, dim, eps, ROWS, COLS)
    # Σh and Σh·(x − mean) per row; masked lanes have grad 0, so h 0.
    sum_h = tl.zeros([ROWS, COLS], tl.float32)
    sum_hx = tl.zeros([ROWS, COLS], tl.float32)
    for c0 in range(0, dim, COLS):
        col, mask = _cols(c0, dim, row_ok, COLS)
        x = _load(x_ptr, x_row[:, None] + col[None, :], mask)
        h = _load(grad_ptr, grad_row[:, None] + col[None, :], mask) * _load(
            gamma_ptr, col, col < dim
        )[None, :]
        sum_h += h
        sum_hx += h * (x - mean[:, None])
    mean_h = tl.sum(sum_h, axis=1) / dim
    mean_hx = tl.sum(sum_hx, axis=1) * r / dim
    part_row = tl.program_id(0).to(tl.int64) * dim
    for c0 in range(0, dim, COLS):
        col, mask = _cols(c0, dim, row_ok, COLS)
        x_hat = (_load(x_ptr, x_row[:, None] + col[None, :], mask) - mean[:, None]) * r[:, None]
        grad = _load(grad_ptr, grad_row[:, None] + col[None, :], mask)
        h = grad * _load(gamma_ptr, col, col < dim)[None, :]
        dx = r[:, None] * (h - mean_h[:, None] - x_hat * mean_hx[:, None])
        _store(dx_ptr, out_row[:, None] + col[None, :], dx, mask, INTERPRET)
        tl.store(part_ptr + part_row + col, tl.sum(grad * x_hat, axis=0), mask=col < dim)


# --- 2. SwiGLU's product ------------------------------------------------------------------


@triton.jit
def swiglu_fwd(gate_ptr, value_ptr, out_ptr, n, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """``out = gate·σ(gate)·value``."""
    offs, mask = _flat(n, BLOCK)
    gate = _load(gate_ptr, offs, mask)
    _store(out_ptr, offs, gate * _sigmoid(gate) * _load(value_ptr, offs, mask), mask, INTERPRET)


@triton.jit
def swiglu_bwd(
    gate_ptr,
    value_ptr,
    grad_ptr,
    dgate_ptr,
    dvalue_ptr,
    n,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``dvalue = grad·gate·σ(gate)``, ``dgate = grad·value·σ(gate)·(1 + gate·(1 − σ(gate)))``."""
    offs, mask = _flat(n, BLOCK)
    gate, grad = _load(gate_ptr, offs, mask), _load(grad_ptr, offs, mask)
    _store(dvalue_ptr, offs, grad * gate * _sigmoid(gate), mask, INTERPRET)
    d_gate = grad * _load(value_ptr, offs, mask) * _silu_slope(gate)
    _store(dgate_ptr, offs, d_gate, mask, INTERPRET)


# --- 3. exact GELU ------------------------------------------------------------------------


@triton.jit
def _normal_cdf(x):
    """Φ(x) = ½·erfc(−x/√2) as the CPU kernel (rows.rs `normal_cdf`): Numerical Recipes'
    erfc, ``t·e^(−z² + P(t))`` with ``t = 1/(1 + z/2)``, ``z = |x|/√2``; the tail beyond |x|
    is computed directly, so Φ of negative x keeps its relative precision."""
    z = tl.abs(x) * 0.7071067811865476  # 1/√2
    t = 1.0 / (1.0 + 0.5 * z)
    p = 0.17087277 * t - 0.82215223
    p = p * t + 1.4885159
    p = p * t - 1.135204
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    tail = 0.5 * t * tl.exp(p - z * z)
    return tl.where(x < 0.0, tail, 1.0 - tail)


@triton.jit
def gelu_fwd(x_ptr, y_ptr, n, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """``y = x·Φ(x)``."""
    offs, mask = _flat(n, BLOCK)
    x = _load(x_ptr, offs, mask)
    _store(y_ptr, offs, x * _normal_cdf(x), mask, INTERPRET)


@triton.jit
def gelu_bwd(x_ptr, grad_ptr, dx_ptr, n, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """``dx = grad·(Φ(x) + x·φ(x))``: the exact derivative, not the tanh form's."""
    offs, mask = _flat(n, BLOCK)
    x = _load(x_ptr, offs, mask)
    pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)  # 1/√(2π)
    dx = _load(grad_ptr, offs, mask) * (_normal_cdf(x) + x * pdf)
    _store(dx_ptr, offs, dx, mask, INTERPRET)


# --- 4, 5. per-sample modulation and gated residual ------------------------------------


@triton.jit
def _token_tile(tokens, dim, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A tile of ROWS tokens × COLS features of one sample: grid
    ``(cdiv(tokens, ROWS), batch, cdiv(dim, COLS))``, so a tile never spans two samples
    and its per-sample vectors are loaded once. Offsets into ``[B, N, D]`` and ``[B, D]``."""
    tile, b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    token = tile * ROWS + tl.arange(0, ROWS)
    col = tl.program_id(2) * COLS + tl.arange(0, COLS)
    col_ok = col < dim
    mask = (token[:, None] < tokens) & col_ok[None, :]
    offs = (b * tokens + token[:, None]) * dim + col[None, :]
    return offs, mask, b * dim + col, col_ok


@triton.jit
def _part_offsets(k, dim, COLS: tl.constexpr):
    """Where this tile's column sums go in the partials ``[K, B, cdiv(N, ROWS), D]``
    (K sums per tile): element ``[k, b, tile, col]``."""
    spans, batch = tl.num_programs(0), tl.num_programs(1)
    b, tile = tl.program_id(1).to(tl.int64), tl.program_id(0)
    col = tl.program_id(2) * COLS + tl.arange(0, COLS)
    return ((k * batch + b) * spans + tile) * dim + col


@triton.jit
def modulate_fwd(
    x_ptr,
    shift_ptr,
    scale_ptr,
    y_ptr,
    tokens,
    dim,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``y = x·(1 + scale) + shift``, shift and scale ``[B, D]``."""
    offs, mask, vec, col_ok = _token_tile(tokens, dim, ROWS, COLS)
    scale = _load(scale_ptr, vec, col_ok)[None, :] + 1.0
    shift = _load(shift_ptr, vec, col_ok)[None, :]
    _store(y_ptr, offs, _load(x_ptr, offs, mask) * scale + shift, mask, INTERPRET)


@triton.jit
def modulate_bwd(
    x_ptr,
    scale_ptr,
    grad_ptr,
    dx_ptr,
    part_ptr,
    tokens,
    dim,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``dx = grad·(1 + scale)``; the tile's ``Σ grad`` (dshift) and ``Σ grad·x`` (dscale)
    into partials ``[2, B, cdiv(N, ROWS), D]``."""
    offs, mask, vec, col_ok = _token_tile(tokens, dim, ROWS, COLS)
    grad = _load(grad_ptr, offs, mask)
    scale = _load(scale_ptr, vec, col_ok)[None, :] + 1.0
    _store(dx_ptr, offs, grad * scale, mask, INTERPRET)
    x = _load(x_ptr, offs, mask)
    tl.store(part_ptr + _part_offsets(0, dim, COLS), tl.sum(grad, axis=0), mask=col_ok)
    tl.store(part_ptr + _part_offsets(1, dim, COLS), tl.sum(grad * x, axis=0), mask=col_ok)


@triton.jit
def gated_residual_fwd(
    x_ptr,
    gate_ptr,
    branch_ptr,
    y_ptr,
    tokens,
    dim,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``y = x + branch·gate``, gate ``[B, D]``."""
    offs, mask, vec, col_ok = _token_tile(tokens, dim, ROWS, COLS)
    gate = _load(gate_ptr, vec, col_ok)[None, :]
    y = _load(x_ptr, offs, mask) + _load(branch_ptr, offs, mask) * gate
    _store(y_ptr, offs, y, mask, INTERPRET)


@triton.jit
def gated_residual_bwd(
    gate_ptr,
    branch_ptr,
    grad_ptr,
    dbranch_ptr,
    part_ptr,
    tokens,
    dim,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``dbranch = grad·gate``; the tile's ``Σ grad·branch`` (dgate) into partials
    ``[1, B, cdiv(N, ROWS), D]``. dx is grad itself: nothing to compute."""
    offs, mask, vec, col_ok = _token_tile(tokens, dim, ROWS, COLS)
    grad = _load(grad_ptr, offs, mask)
    _store(dbranch_ptr, offs, grad * _load(gate_ptr, vec, col_ok)[None, :], mask, INTERPRET)
    partial = tl.sum(grad * _load(branch_ptr, offs, mask), axis=0)
    tl.store(part_ptr + _part_offsets(0, dim, COLS), partial, mask=col_ok)


# --- 6. group norm (+ SiLU) ---------------------------------------------------------------


@triton.jit
def _group(channels, groups, plane):
    """This program's (sample, group): its first element (groups are contiguous in
    ``[B, C, H, W]``), first channel and channel count."""
    pid = tl.program_id(0)
    per_group = channels // groups
    first = (pid % groups) * per_group
    return pid.to(tl.int64) * per_group * plane, first, per_group


@triton.jit
def _group_moments(x_ptr, size, eps, BLOCK: tl.constexpr):
    """Mean and r of a group's ``size`` contiguous elements, in two passes."""
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(0, size, BLOCK):
        i = s + tl.arange(0, BLOCK)
        total += _load(x_ptr, i, i < size)
    mean = tl.sum(total, axis=0) / size
    squares = tl.zeros([BLOCK], tl.float32)
    for s in range(0, size, BLOCK):
        i = s + tl.arange(0, BLOCK)
        centered = tl.where(i < size, _load(x_ptr, i, i < size) - mean, 0.0)
        squares += centered * centered
    return mean, _inv_std(tl.sum(squares, axis=0) / size, eps)


@triton.jit
def group_norm_fwd(
    x_ptr,
    gamma_ptr,
    beta_ptr,
    y_ptr,
    eps,
    channels,
    groups,
    plane,
    silu,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """One (sample, group) per program: ``z = (x − mean)·(r·γ_c) + β_c``, then
    ``y = z·σ(z)`` when silu ≠ 0. plane = H·W."""
    base, first, per_group = _group(channels, groups, plane)
    x_ptr, y_ptr = x_ptr + base, y_ptr + base
    mean, r = _group_moments(x_ptr, per_group * plane, eps, BLOCK)
    # Channel by channel, so γ and β are scalars (not a gather per element).
    for k in range(0, per_group):
        a = r * tl.load(gamma_ptr + first + k).to(tl.float32)
        beta = tl.load(beta_ptr + first + k).to(tl.float32)
        for s in range(0, plane, BLOCK):
            i = s + tl.arange(0, BLOCK)
            at, mask = k * plane + i, i < plane
            z = (_load(x_ptr, at, mask) - mean) * a + beta
            if silu != 0:
                z = z / (1.0 + tl.exp(-z))  # z·σ(z), as the CPU kernel writes it
            _store(y_ptr, at, z, mask, INTERPRET)


@triton.jit
def _group_norm_dz(x_ptr, grad_ptr, at, mask, mean, r, gamma, beta, silu):
    """x̂ and the gradient at z (before the SiLU) of one step along a channel."""
    x_hat = (_load(x_ptr, at, mask) - mean) * r
    dz = _load(grad_ptr, at, mask)
    if silu != 0:
        dz = dz * _silu_slope(x_hat * gamma + beta)
    return x_hat, dz


@triton.jit
def group_norm_bwd(
    x_ptr,
    gamma_ptr,
    beta_ptr,
    grad_ptr,
    dx_ptr,
    part_ptr,
    eps,
    channels,
    groups,
    plane,
    silu,
    BLOCK: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """dx of one (sample, group); its channels' ``Σ dz·x̂`` and ``Σ dz`` into partials
    ``[2, B, C]`` (dγ's, then dβ's)."""
    base, first, per_group = _group(channels, groups, plane)
    x_ptr, grad_ptr, dx_ptr = x_ptr + base, grad_ptr + base, dx_ptr + base
    b = tl.program_id(0) // groups
    batch = tl.num_programs(0) // groups
    mean, r = _group_moments(x_ptr, per_group * plane, eps, BLOCK)
    # Σh = Σ_c γ_c·Σdz and Σh·x̂ = Σ_c γ_c·Σdz·x̂: the per-channel sums give both.
    sum_h = 0.0
    sum_hx = 0.0
    for k in range(0, per_group):
        gamma = tl.load(gamma_ptr + first + k).to(tl.float32)
        beta = tl.load(beta_ptr + first + k).to(tl.float32)
        acc_dz = tl.zeros([BLOCK], tl.float32)
        acc_dzx = tl.zeros([BLOCK], tl.float32)
        for s in range(0, plane, BLOCK):
            i = s + tl.arange(0, BLOCK)
            x_hat, dz = _group_norm_dz(
                x_ptr, grad_ptr, k * plane + i, i < plane, mean, r, gamma, beta, silu
            )
            acc_dz += dz  # 0 where masked: grad is loaded as 0
            acc_dzx += dz * x_hat
        d_beta, d_gamma = tl.sum(acc_dz, axis=0), tl.sum(acc_dzx, axis=0)
        channel = (b * channels + first + k).to(tl.int64)
        tl.store(part_ptr + channel, d_gamma)
        tl.store(part_ptr + batch * channels + channel, d_beta)
        sum_h += gamma * d_beta
        sum_hx += gamma * d_gamma
    size = per_group * plane
    mean_h, mean_hx = sum_h / size, sum_hx / size
    for k in range(0, per_group):
        gamma = tl.load(gamma_ptr + first + k).to(tl.float32)
        beta = tl.load(beta_ptr + first + k).to(tl.float32)
        for s in range(0, plane, BLOCK):
            i = s + tl.arange(0, BLOCK)
            at, mask = k * plane + i, i < plane
            x_hat, dz = _group_norm_dz(x_ptr, grad_ptr, at, mask, mean, r, gamma, beta, silu)
            dx = r * (dz * gamma - mean_h - x_hat * mean_hx)
            _store(dx_ptr, at, dx, mask, INTERPRET)


# --- grids, scratch buffers, builds ------------------------------------------------------


def _cdiv(a, b):
    return -(-a // b)


def _base(name):
    """A build's kernel name: ``chains_layer_norm_fwd_bf16`` → ``layer_norm_fwd``."""
    return name if name in CONSTEXPRS else name.removeprefix("chains_").rsplit("_", 1)[0]


def grid(name, sizes):
    """The launch grid of kernel (or build) `name` for `sizes`, a dict of:
    layer_norm_*: rows, dim; swiglu_*, gelu_*: n; modulate_*, gated_residual_*: batch,
    tokens, dim; group_norm_*: batch, groups; sum_partials: groups, cols."""
    kernel, s = _base(name), sizes
    if kernel.startswith("layer_norm"):
        return (_cdiv(s["rows"], ROWS), 1, 1)
    if kernel.startswith(("swiglu", "gelu")):
        return (_cdiv(s["n"], ELEMENTS), 1, 1)
    if kernel.startswith(("modulate", "gated_residual")):
        return (_cdiv(s["tokens"], ROWS), s["batch"], _cdiv(s["dim"], TOKEN_COLS))
    if kernel.startswith("group_norm"):
        return (s["batch"] * s["groups"], 1, 1)
    if kernel == "sum_partials":
        return (s["groups"], _cdiv(s["cols"], PART_COLS), 1)
    raise KeyError(name)


def scratch(name, sizes):
    """The f32 partial-sum buffer a backward writes, ``[G, parts, cols]`` (then
    ``sum_partials`` over parts gives ``[G, cols]``), or None. Sizes as `grid`'s, plus
    channels for group_norm_bwd."""
    kernel, s = _base(name), sizes
    if kernel == "layer_norm_bwd":
        return (1, _cdiv(s["rows"], ROWS), s["dim"])
    if kernel == "modulate_bwd":
        return (2 * s["batch"], _cdiv(s["tokens"], ROWS), s["dim"])
    if kernel == "gated_residual_bwd":
        return (s["batch"], _cdiv(s["tokens"], ROWS), s["dim"])
    if kernel == "group_norm_bwd":
        return (2, s["batch"], s["channels"])
    return None


# --- launchers (the tests'; any device torch and Triton share) -------------------------


def _launch(name, sizes, *args):
    kernel = KERNELS[name]
    options = dict(**CONSTEXPRS[name], INTERPRET=interpreting(), num_warps=NUM_WARPS)
    kernel[grid(name, sizes)](*args, **options)


def _reduce(part, out_dtype):
    """``part[G, P, C]`` summed over P in `sum_partials`' fixed order: ``[G, C]``."""
    groups, parts, cols = part.shape
    out = torch.empty(groups, cols, dtype=out_dtype, device=part.device)
    _launch("sum_partials", dict(groups=groups, cols=cols), part, out, parts, cols)
    return out


def _rows(t):
    """t as ``[rows, dim]`` rows with unit column stride, without a copy when its leading
    dimensions fold into one row stride (a slice of a wider last dimension does)."""
    dim = t.shape[-1]
    try:
        rows = t.view(-1, dim)
    except RuntimeError:
        rows = t.reshape(-1, dim)
    return rows if rows.stride(1) == 1 or dim == 1 else rows.contiguous()


def layer_norm(x, gamma, eps):
    rows = _rows(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    sizes = dict(rows=rows.shape[0], dim=rows.shape[1])
    _launch("layer_norm_fwd", sizes, rows, gamma, y, eps, *sizes.values(), rows.stride(0))
    return y


def layer_norm_backward(x, gamma, grad, eps):
    """``(dx, dγ)``; dγ in γ's type."""
    rows, grad_rows = _rows(x), _rows(grad)
    sizes = dict(rows=rows.shape[0], dim=rows.shape[1])
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    part = torch.empty(scratch("layer_norm_bwd", sizes), dtype=torch.float32, device=x.device)
    args = (rows, gamma, grad_rows, dx, part, eps, *sizes.values())
    _launch("layer_norm_bwd", sizes, *args, rows.stride(0), grad_rows.stride(0))
    return dx, _reduce(part, gamma.dtype)[0]


def _elementwise(name, outputs, *inputs):
    inputs = [t.contiguous() for t in inputs]
    outs = [torch.empty_like(inputs[0]) for _ in range(outputs)]
    n = inputs[0].numel()
    _launch(name, dict(n=n), *inputs, *outs, n)
    return outs


def swiglu(gate, value):
    return _elementwise("swiglu_fwd", 1, gate, value)[0]


def swiglu_backward(gate, value, grad):
    """``(dgate, dvalue)``, as ``MicroditBackend::swiglu_backward``."""
    return tuple(_elementwise("swiglu_bwd", 2, gate, value, grad))


def gelu(x):
    return _elementwise("gelu_fwd", 1, x)[0]


def gelu_backward(x, grad):
    return _elementwise("gelu_bwd", 1, x, grad)[0]


def _token_sizes(tokens):
    batch, n, dim = tokens.shape
    return dict(batch=batch, tokens=n, dim=dim)


def modulate(x, shift, scale):
    x, shift, scale = (t.contiguous() for t in (x, shift, scale))
    sizes, y = _token_sizes(x), torch.empty_like(x)
    _launch("modulate_fwd", sizes, x, shift, scale, y, sizes["tokens"], sizes["dim"])
    return y


def modulate_backward(x, scale, grad):
    """``(dx, dshift, dscale)``, as ``MicroditBackend::modulate_backward``."""
    x, scale, grad = (t.contiguous() for t in (x, scale, grad))
    sizes, dx = _token_sizes(x), torch.empty_like(x)
    part = torch.empty(scratch("modulate_bwd", sizes), dtype=torch.float32, device=x.device)
    _launch("modulate_bwd", sizes, x, scale, grad, dx, part, sizes["tokens"], sizes["dim"])
    d_shift, d_scale = _reduce(part, x.dtype).view(2, sizes["batch"], sizes["dim"])
    return dx, d_shift, d_scale


def gated_residual(x, gate, branch):
    x, gate, branch = (t.contiguous() for t in (x, gate, branch))
    sizes, y = _token_sizes(x), torch.empty_like(x)
    _launch("gated_residual_fwd", sizes, x, gate, branch, y, sizes["tokens"], sizes["dim"])
    return y


def gated_residual_backward(gate, branch, grad):
    """``(dx, dgate, dbranch)``, as ``MicroditBackend::gated_residual_backward``: dx is grad."""
    gate, branch, grad = (t.contiguous() for t in (gate, branch, grad))
    sizes, d_branch = _token_sizes(branch), torch.empty_like(branch)
    shape = scratch("gated_residual_bwd", sizes)
    part = torch.empty(shape, dtype=torch.float32, device=grad.device)
    args = (gate, branch, grad, d_branch, part, sizes["tokens"], sizes["dim"])
    _launch("gated_residual_bwd", sizes, *args)
    return grad, _reduce(part, branch.dtype), d_branch


def _group_sizes(x, groups):
    batch, channels, h, w = x.shape
    assert channels % groups == 0, "channels must split evenly into groups"
    return dict(batch=batch, groups=groups, channels=channels), (channels, groups, h * w)


def group_norm(x, gamma, beta, groups, eps, silu):
    x = x.contiguous()
    sizes, ints = _group_sizes(x, groups)
    y = torch.empty_like(x)
    _launch("group_norm_fwd", sizes, x, gamma, beta, y, eps, *ints, int(silu))
    return y


def group_norm_backward(x, gamma, beta, grad, groups, eps, silu):
    """``(dx, dγ, dβ)``; dγ and dβ in γ's type."""
    x, grad = x.contiguous(), grad.contiguous()
    sizes, ints = _group_sizes(x, groups)
    dx = torch.empty_like(x)
    part = torch.empty(scratch("group_norm_bwd", sizes), dtype=torch.float32, device=x.device)
    _launch("group_norm_bwd", sizes, x, gamma, beta, grad, dx, part, eps, *ints, int(silu))
    d_gamma, d_beta = _reduce(part, gamma.dtype)
    return dx, d_gamma, d_beta


KERNELS = {
    k.fn.__name__: k
    for k in (
        layer_norm_fwd,
        layer_norm_bwd,
        sum_partials,
        swiglu_fwd,
        swiglu_bwd,
        gelu_fwd,
        gelu_bwd,
        modulate_fwd,
        modulate_bwd,
        gated_residual_fwd,
        gated_residual_bwd,
        group_norm_fwd,
        group_norm_bwd,
    )
}


# --- ahead-of-time builds -----------------------------------------------------------------


def _arg_type(kernel, arg, dtype):
    """A run-time argument's Triton type in the `dtype` build: tensors in that type except
    the f32 partial sums and the layer norm's γ (LayerNorm weights stay f32 in bf16 models:
    autocast's rule, `LowPrecisionCopy`; the group norms' γ, β are cast with the rest), ε
    fp32, sizes i32. The kernels read each pointer in its own type: other mixes compile too."""
    if arg == "part_ptr" or (kernel.startswith("layer_norm") and arg == "gamma_ptr"):
        return "*fp32"
    if arg.endswith("_ptr"):
        return f"*{dtype}"
    return "fp32" if arg == "eps" else "i32"


def _signature(kernel, dtype):
    """The kernel's run-time arguments, in its order, with their types."""
    constexprs = {*CONSTEXPRS[kernel], "INTERPRET"}
    args = [a for a in KERNELS[kernel].arg_names if a not in constexprs]
    return {a: _arg_type(kernel, a, dtype) for a in args}


BUILDS = [
    dict(
        name=f"chains_{kernel}_{dtype}",
        kernel=KERNELS[kernel],
        signature=_signature(kernel, dtype),
        constexprs={**CONSTEXPRS[kernel], "INTERPRET": False},
        num_warps=NUM_WARPS,
        num_stages=NUM_STAGES,
    )
    for kernel in KERNELS
    for dtype in ("fp32", "bf16")
]
