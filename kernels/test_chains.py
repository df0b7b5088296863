"""The chains' kernels (chains.py) under the Triton interpreter against float64 references:
the Rust defaults' formulas (src/backend: layer_norm.rs, gelu.rs, modulation.rs,
`swiglu_backward_unfused`, `group_norm_unfused`) and torch autograd for every backward.

Run from the repository root (CPU, through Triton's interpreter; on a CUDA device
without TRITON_INTERPRET the same tests run the compiled kernels):

    TRITON_INTERPRET=1 /opt/fixvenv/bin/python -m pytest kernels/test_chains.py -q
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import chains
from kernels.common import interpreting

pytestmark = pytest.mark.skipif(
    not interpreting() and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU) or a CUDA device",
)

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"

F32, BF16 = torch.float32, torch.bfloat16
DTYPES = [F32, BF16]
# Outputs rounded once to the type: f32 arithmetic agrees to ~1e-6, bf16 to its 2⁻⁸ step.
TOL = {F32: 1e-5, BF16: 1e-2}


def random(shape, seed, dtype=F32, mean=0.0, std=1.0):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=g, dtype=torch.float64) * std + mean
    return values.to(dtype).to(DEVICE)


def check(ours, want, dtype, what):
    """ours within TOL of the float64 `want`, elementwise (absolute and relative)."""
    tol = TOL[dtype]
    message = lambda m: f"{what}: {m}"  # noqa: E731
    torch.testing.assert_close(ours.double(), want, rtol=tol, atol=tol, msg=message)


def autograd(fn, inputs, grad):
    """fn's output and the gradients of Σ out·grad, in float64."""
    leaves = [t.double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, grad.double())


# --- 1. layer norm --------------------------------------------------------------------------


def layer_norm_ref(x, gamma, eps):
    """burn's layer norm without a shift (`scaled_layer_norm_unfused`), float64."""
    x = x.double()
    centered = x - x.mean(-1, keepdim=True)
    var = centered.square().mean(-1, keepdim=True)
    return centered / (var + eps).sqrt() * gamma.double()


def layer_norm_backward_ref(x, gamma, grad, eps):
    """`scaled_layer_norm_backward_unfused`'s formulas, float64."""
    dim = x.shape[-1]
    x, grad = x.double().reshape(-1, dim), grad.double().reshape(-1, dim)
    centered = x - x.mean(1, keepdim=True)
    r = (centered.square().mean(1, keepdim=True) + eps).sqrt().reciprocal()
    x_hat = centered * r
    h = grad * gamma.double()
    dx = (h - h.mean(1, keepdim=True) - x_hat * (h * x_hat).mean(1, keepdim=True)) * r
    return dx, (grad * x_hat).sum(0)


def check_layer_norm(x, gamma, grad, eps, dtype):
    """Forward and both gradients against the formulas and autograd."""
    check(chains.layer_norm(x, gamma, eps), layer_norm_ref(x, gamma, eps), dtype, "y")
    dx, d_gamma = chains.layer_norm_backward(x, gamma, grad, eps)
    assert d_gamma.dtype == gamma.dtype
    want_dx, want_d_gamma = layer_norm_backward_ref(x, gamma, grad, eps)
    check(dx, want_dx.reshape(x.shape), dtype, "dx")
    check(d_gamma, want_d_gamma, dtype, "dgamma")
    dim = x.shape[-1]
    _, (auto_dx, auto_d_gamma) = autograd(
        lambda x, g: F.layer_norm(x, (dim,), g, None, eps), [x, gamma], grad
    )
    check(dx, auto_dx, dtype, "dx vs autograd")
    check(d_gamma, auto_d_gamma, dtype, "dgamma vs autograd")


# Rows not a multiple of ROWS; widths: the small tests', odd, DiT-XL's hidden and 4·hidden.
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("rows,dim", [(37, 24), (37, 77), (21, 1152), (5, 4608)])
def test_layer_norm(rows, dim, dtype):
    """bf16 x and grad with an f32 γ (LayerNorm weights stay f32 in bf16 models)."""
    x = random((rows, dim), 1, dtype, mean=0.7, std=1.5)
    gamma = random((dim,), 2, F32, mean=1.0, std=0.5)
    grad = random((rows, dim), 3, dtype)
    check_layer_norm(x, gamma, grad, 1e-6, dtype)


def test_layer_norm_reads_strided_rows():
    """The q/k norms' rows: a slice of the fused qkv projection [B, N, 3D], rows 3D apart
    (read in place: the launcher passes the row stride, it does not copy)."""
    b, n, d = 3, 5, 37
    qkv = random((b, n, 3 * d), 4, F32, mean=0.7, std=1.5)
    x = qkv[:, :, d : 2 * d]
    assert chains._rows(x).stride(0) == 3 * d
    grad = random((b, 2 * n, 3 * d), 5)[:, ::2, :d]  # strided grad rows too
    check_layer_norm(x, random((d,), 6, mean=1.0), grad, 1e-5, F32)


def test_layer_norm_variance_is_two_pass():
    """Rows with |mean| ≫ std: E[x²] − mean² in f32 would lose the variance. (dγ is left
    out: rounding the mean of 30s already moves x̂ by ~4e-6, summed over the rows.)"""
    x = random((19, 1152), 7, F32, mean=30.0, std=1.0)
    gamma, grad = random((1152,), 8, mean=1.0), random((19, 1152), 9)
    check(chains.layer_norm(x, gamma, 1e-6), layer_norm_ref(x, gamma, 1e-6), F32, "y")
    dx, _ = chains.layer_norm_backward(x, gamma, grad, 1e-6)
    check(dx, layer_norm_backward_ref(x, gamma, grad, 1e-6)[0], F32, "dx")


# --- 2. SwiGLU ----------------------------------------------------------------------------


def swiglu_backward_ref(gate, value, grad):
    """`swiglu_backward_unfused`'s formulas, float64: (dgate, dvalue)."""
    gate, value, grad = gate.double(), value.double(), grad.double()
    s = torch.sigmoid(gate)
    return grad * value * s * (gate * (1 - s) + 1), grad * gate * s


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # e^100 = inf: intended
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_swiglu(dtype):
    """[3, 37, 77] (not a multiple of the block), gates out to ±100 (σ saturates, no NaN)."""
    shape = (3, 37, 77)
    gate = random(shape, 10, dtype, std=4.0)
    gate.view(-1)[:4] = torch.tensor([-100.0, 100.0, -30.0, 30.0], dtype=dtype, device=DEVICE)
    value, grad = random(shape, 11, dtype), random(shape, 12, dtype)
    check(chains.swiglu(gate, value), F.silu(gate.double()) * value.double(), dtype, "y")
    ours = chains.swiglu_backward(gate, value, grad)
    _, auto = autograd(lambda gate, value: F.silu(gate) * value, [gate, value], grad)
    wants = swiglu_backward_ref(gate, value, grad)
    for what, mine, want, theirs in zip(["dgate", "dvalue"], ours, wants, auto):
        check(mine, want, dtype, what)
        check(mine, theirs, dtype, f"{what} vs autograd")


# --- 3. exact GELU ------------------------------------------------------------------------


def normal_cdf(x):
    """Φ in float64 without cancellation in the lower tail."""
    return 0.5 * torch.special.erfc(-x / 2**0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_gelu(dtype):
    """−8…8 on a line plus random values; the backward against `gelu_exact_backward_unfused`'s
    `grad·(Φ(x) + x·φ(x))` and autograd of F.gelu (the erf form, not tanh's)."""
    line = torch.linspace(-8, 8, 4001, dtype=torch.float64, device=DEVICE)
    x = torch.cat([line, random(1234, 13, torch.float64, std=3.0)]).to(dtype)
    grad = random(x.shape, 14, dtype)
    xd = x.double()
    check(chains.gelu(x), xd * normal_cdf(xd), dtype, "y")
    pdf = torch.exp(-0.5 * xd * xd) / (2 * torch.pi) ** 0.5
    dx = chains.gelu_backward(x, grad)
    check(dx, grad.double() * (normal_cdf(xd) + xd * pdf), dtype, "dx")
    _, (auto_dx,) = autograd(lambda x: F.gelu(x, approximate="none"), [x], grad)
    check(dx, auto_dx, dtype, "dx vs autograd")


def test_gelu_lower_tail_keeps_relative_precision():
    """As the CPU kernel's Φ (relative error ~2e-7·(4 + x²)): GELU of −6…−1 to 1e-5
    relative, where ½(1 + erf(x/√2)) in f32 is off by up to 100%."""
    x = torch.linspace(-6, -1, 501, device=DEVICE)
    want = x.double() * normal_cdf(x.double())
    rel = ((chains.gelu(x).double() - want) / want).abs().max().item()
    assert rel < 1e-5, rel


# --- 4, 5. modulation and gated residual ----------------------------------------------------


def per_sample(t):
    return t.double()[:, None, :]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("dim", [77, 1152])
def test_modulate(dim, dtype):
    """x [3, 37, D] by shift, scale [3, D] (37 tokens: not a multiple of ROWS)."""
    b, n = 3, 37
    x, grad = random((b, n, dim), 15, dtype), random((b, n, dim), 16, dtype)
    shift, scale = random((b, dim), 17, dtype), random((b, dim), 18, dtype, std=0.5)
    want = x.double() * (per_sample(scale) + 1) + per_sample(shift)
    check(chains.modulate(x, shift, scale), want, dtype, "y")
    dx, d_shift, d_scale = chains.modulate_backward(x, scale, grad)
    # `modulate_backward_unfused`'s formulas.
    g = grad.double()
    check(dx, g * (per_sample(scale) + 1), dtype, "dx")
    check(d_shift, g.sum(1), dtype, "dshift")
    check(d_scale, (g * x.double()).sum(1), dtype, "dscale")
    torch_modulate = lambda x, sh, sc: x * (1 + sc[:, None]) + sh[:, None]  # noqa: E731
    _, auto = autograd(torch_modulate, [x, shift, scale], grad)
    for what, ours, theirs in zip(["dx", "dshift", "dscale"], [dx, d_shift, d_scale], auto):
        check(ours, theirs, dtype, f"{what} vs autograd")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("dim", [77, 1152])
def test_gated_residual(dim, dtype):
    """x, branch [3, 37, D] and gate [3, D]."""
    b, n = 3, 37
    x, branch = random((b, n, dim), 19, dtype), random((b, n, dim), 20, dtype)
    gate, grad = random((b, dim), 21, dtype), random((b, n, dim), 22, dtype)
    want = x.double() + branch.double() * per_sample(gate)
    check(chains.gated_residual(x, gate, branch), want, dtype, "y")
    dx, d_gate, d_branch = chains.gated_residual_backward(gate, branch, grad)
    assert dx is grad  # as the Rust backward: dx is the output's gradient itself
    g = grad.double()
    check(d_gate, (g * branch.double()).sum(1), dtype, "dgate")
    check(d_branch, g * per_sample(gate), dtype, "dbranch")
    _, auto = autograd(lambda x, ga, br: x + ga[:, None] * br, [x, gate, branch], grad)
    for what, ours, theirs in zip(["dx", "dgate", "dbranch"], [dx, d_gate, d_branch], auto):
        check(ours, theirs, dtype, f"{what} vs autograd")


def test_bf16_outputs_round_to_nearest_even():
    """Outputs are rounded once, to nearest even, as the GPU does (the interpreter's own
    f32 → bf16 conversion truncates: half the values would come out one step low). With
    bf16 inputs, x + gate·branch is exact in float64; f32 may round the sum first, which
    moves a rare tie, so a few mismatches are allowed."""
    x, branch = random((2, 40, 77), 30, BF16), random((2, 40, 77), 31, BF16)
    gate = random((2, 77), 32, BF16)
    want = (x.double() + branch.double() * per_sample(gate)).to(BF16)
    mismatched = (chains.gated_residual(x, gate, branch) != want).double().mean().item()
    assert mismatched < 0.01, mismatched


def test_backward_sums_are_reproducible():
    """No atomics: the reduced gradients are bitwise the same run to run."""
    x, grad = random((2, 45, 77), 23), random((2, 45, 77), 24)
    scale = random((2, 77), 25)
    first = chains.modulate_backward(x, scale, grad)
    again = chains.modulate_backward(x, scale, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# --- 6. group norm (+ SiLU) -----------------------------------------------------------------


def group_norm_ref(x, gamma, beta, groups, eps, silu):
    """`group_norm_unfused`, float64: statistics per (sample, group), biased variance."""
    b, c, h, w = x.shape
    x = x.double().reshape(b, groups, -1)
    x = x - x.sum(2, keepdim=True) / x.shape[2]
    var = x.square().sum(2, keepdim=True) / x.shape[2]
    x = (x / (var + eps).sqrt()).reshape(b, c, h, w)
    y = x * gamma.double()[:, None, None] + beta.double()[:, None, None]
    return F.silu(y) if silu else y


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("silu", [False, True], ids=["plain", "silu"])
@pytest.mark.parametrize(
    "shape,groups",
    # The VAE's 32 groups on an odd 5×7 plane; 4 groups of 6 channels on a 20×30 plane
    # (longer than the kernel's step).
    [((2, 64, 5, 7), 32), ((2, 24, 20, 30), 4)],
    ids=["32groups", "plane600"],
)
def test_group_norm(shape, groups, silu, dtype):
    """Forward against `group_norm_unfused` and F.group_norm; backward against autograd
    (the Rust side has no backward of its own)."""
    c, eps = shape[1], 1e-6
    x, grad = random(shape, 26, dtype, mean=0.5, std=2.0), random(shape, 27, dtype)
    gamma, beta = random((c,), 28, dtype, mean=1.0, std=0.5), random((c,), 29, dtype)
    y = chains.group_norm(x, gamma, beta, groups, eps, silu)
    check(y, group_norm_ref(x, gamma, beta, groups, eps, silu), dtype, "y")

    def torch_group_norm(x, gamma, beta):
        y = F.group_norm(x, groups, gamma, beta, eps)
        return F.silu(y) if silu else y

    want, auto = autograd(torch_group_norm, [x, gamma, beta], grad)
    check(y, want, dtype, "y vs F.group_norm")
    ours = chains.group_norm_backward(x, gamma, beta, grad, groups, eps, silu)
    for what, mine, theirs in zip(["dx", "dgamma", "dbeta"], ours, auto):
        check(mine, theirs, dtype, f"{what} vs autograd")


# --- builds --------------------------------------------------------------------------------


def test_builds_cover_every_kernel_and_argument():
    """One build per kernel × dtype, naming every argument in the kernel's order: pointers,
    scalars (fp32), int32s, then the constexprs, INTERPRET last (False)."""
    assert len(chains.BUILDS) == 2 * len(chains.KERNELS)
    order = {"ptr": 0, "fp32": 1, "i32": 2}
    sizes = dict(rows=7, n=7, batch=7, tokens=7, dim=7, groups=7, cols=7)
    for build in chains.BUILDS:
        names = build["kernel"].arg_names
        assert [*build["signature"], *build["constexprs"]] == names, build["name"]
        assert names[-1] == "INTERPRET" and build["constexprs"]["INTERPRET"] is False
        kinds = [order["ptr" if t[0] == "*" else t] for t in build["signature"].values()]
        assert kinds == sorted(kinds), build["name"]
        assert len(chains.grid(build["name"], sizes)) == 3


def test_bf16_builds_compile_for_sm90():
    """Each kernel's bf16 build compiles to a cubin for sm_90 without a GPU (a fresh
    interpreter: under TRITON_INTERPRET the kernels are not compilable objects)."""
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from kernels import chains
        target = GPUTarget("cuda", 90, 128)
        for b in chains.BUILDS:
            if not b["name"].endswith("_bf16"):
                continue
            src = triton.compiler.ASTSource(
                fn=b["kernel"], signature=b["signature"], constexprs=b["constexprs"])
            options = dict(num_warps=b["num_warps"], num_stages=b["num_stages"])
            k = triton.compile(src, target=target, options=options)
            assert k.asm["cubin"], b["name"]
            print(b["name"], "shared", k.metadata.shared)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton 3.9's default, stated (silences its warning)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-c", script]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("shared") == len(chains.KERNELS), done.stdout
