"""Helpers shared by microdit's Triton kernels.

The kernels are written once and run two ways: compiled for the GPU (ahead of time, to
cubins the Rust side loads) and under Triton's interpreter (`TRITON_INTERPRET=1`) on the
CPU, where the tests check them. Each kernel takes an `INTERPRET` constexpr so that the
one place where the two must differ, `dot` below, can tell them apart at compile time.
"""

import triton
import triton.language as tl

from triton import knobs


def interpreting() -> bool:
    """True when Triton runs kernels in its interpreter (`TRITON_INTERPRET=1`).

    Read from Triton's own knob so the launchers agree with how `@triton.jit` decided to
    wrap the kernels.
    """
    return bool(knobs.runtime.interpret)


def block_d(head_dim: int) -> int:
    """The padded tile width for a head dim: a power of two, and at least 16 because
    `tl.dot` needs every dimension ≥ 16. Columns beyond `head_dim` are masked."""
    return max(16, triton.next_power_of_2(head_dim))


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr):
    """`acc + a @ b` with f32 accumulation; every kernel product goes through here.

    f32 operands use `input_precision="ieee"`: true f32 products, never TF32 (microdit's
    f32 mode is exact on CUDA, docs/BENCHMARKS.md "Exactness").

    bf16/fp16 operands go to the tensor cores as they are on the GPU. Under the
    interpreter they are first widened to f32, because Triton 3.9's interpreter computes
    `tl.dot` on bf16 operands wrongly (a 16x16 product comes out ~1e10 off; fp16 and f32
    are right). Widening is exact: a product of two bf16 (8-bit significands) or fp16
    (11-bit) values fits in f32's 24-bit significand, and the sum is accumulated in f32 on
    both paths, so the interpreter checks the same arithmetic the GPU does up to the
    order of the additions.
    """
    if INTERPRET or a.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """`x.to(dtype)` rounding to nearest, ties to even, on both paths.

    The GPU converts f32 to bf16 that way (cvt.rn.bf16.f32). Triton 3.9's interpreter
    truncates instead (even with fp_downcast_rounding="rtne"), doubling and biasing the
    error of every bf16 rounding, so under INTERPRET the rounding is done on the bits:
    adding 0x7FFF plus the lowest kept bit, then dropping the low 16 bits, is round to
    nearest even (overflow correctly gives inf; NaN inputs are not expected here).
    """
    if INTERPRET and dtype == tl.bfloat16 and x.dtype == tl.float32:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
