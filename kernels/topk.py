"""Expert-choice routing's top-k on the device (issue #34, item 2).

`values` is a rank-3 f32 tensor [N, E, T] (batch, experts, tokens; the router's softmax
probabilities, in the model a strided view: `probs.swap_dims(1, 2)` of an [N, T, E]
tensor). For each of the N·E rows the kernel writes the indices of the `k` largest values
of the row, largest first, ties broken by the smaller index first: what a stable
descending sort gives, `torch.argsort(values, dim=2, descending=True, stable=True)[..., :k]`.
The output is a contiguous [N, E, k] int32 tensor (the CUDA backend's Int element,
`CubeBackend<CudaRuntime, f32, i32, u8>`).

One program per row: the row is loaded (BLOCK_T = the next power of two >= T of those
compiled, the tail masked), every element gets a distinct signed 64-bit key

    key = (ordered(value) << 32) | (0xFFFFFFFF - index)

where `ordered` maps the f32 bits to a signed int32 whose order is the float order, so
key order is (value descending, then index ascending) once the keys are sorted
descending; `tl.sort` sorts them and the first k indices are decoded and stored.

Value order: -0.0 counts as equal to +0.0 (as in torch, and as IEEE comparison has it), so
between the two the smaller index wins. burn's CPU sort (`f32::total_cmp`, unstable)
would put +0.0 ahead of -0.0 and leaves equal values' order unspecified; this kernel's
order is one of the orders an unstable sort may give except for that ±0 case. NaN is not
expected (softmax outputs are finite): a NaN with the sign bit clear sorts above +inf,
one with it set below -inf.
"""

import triton
import triton.language as tl

# Row lengths compiled ahead of time; a launch uses the smallest that holds T.
BLOCK_TS = (64, 256, 1024, 4096)


@triton.jit
def topk_rows_kernel(
    values_ptr,  # *fp32, [N, E, T] with strides (stride_n, stride_e, stride_t), in elements
    out_ptr,  # *i32, [N, E, K] contiguous
    num_experts,  # E
    num_tokens,  # T (<= BLOCK_T)
    k,  # K (<= T)
    stride_n,
    stride_e,
    stride_t,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0)  # n * E + e
    n = row // num_experts
    e = row % num_experts
    base = n.to(tl.int64) * stride_n + e.to(tl.int64) * stride_e

    idx = tl.arange(0, BLOCK_T)
    in_row = idx < num_tokens
    v = tl.load(values_ptr + base + idx.to(tl.int64) * stride_t, mask=in_row, other=0.0)

    # Order-preserving map of the f32 bits to a signed int32: non-negative floats keep
    # their bits, negative ones have all but the sign bit flipped (so a larger magnitude
    # gives a smaller integer). -0.0 (0x80000000) is first made +0.0, so that it ties with
    # +0.0 and the index decides, as IEEE comparison (and torch's sort) has it.
    bits = v.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    # Distinct 64-bit keys: value in the high half, the inverted index in the low half
    # (so a smaller index is a larger key among equal values). The tail past T gets the
    # smallest key of all and sorts last; k <= T keeps it out of the output.
    low = 0xFFFFFFFF - idx.to(tl.int64)
    key = (ordered.to(tl.int64) << 32) | low
    key = tl.where(in_row, key, -9223372036854775807 - 1)

    key = tl.sort(key, descending=True)

    picked = (0xFFFFFFFF - (key & 0xFFFFFFFF)).to(tl.int32)
    tl.store(out_ptr + row.to(tl.int64) * k + idx, picked, mask=idx < k)


def block_t_for(num_tokens):
    """The smallest compiled BLOCK_T that holds a row of `num_tokens`."""
    for block in BLOCK_TS:
        if num_tokens <= block:
            return block
    raise ValueError(f"top-k rows of {num_tokens} tokens: at most {BLOCK_TS[-1]} supported")


def num_warps_for(block_t):
    """Warps per program for a row of `block_t` keys."""
    return {64: 2, 256: 4, 1024: 8, 4096: 16}[block_t]


def grid(batch, num_experts):
    """One program per [N, E, ·] row."""
    return (batch * num_experts, 1, 1)


SIGNATURE = {
    "values_ptr": "*fp32",
    "out_ptr": "*i32",
    "num_experts": "i32",
    "num_tokens": "i32",
    "k": "i32",
    "stride_n": "i32",
    "stride_e": "i32",
    "stride_t": "i32",
}

# Ahead-of-time builds, one per row length.
BUILDS = [
    {
        "name": f"topk_rows_t{block_t}",
        "kernel": topk_rows_kernel,
        "signature": dict(SIGNATURE),
        "constexprs": {"BLOCK_T": block_t},
        "num_warps": num_warps_for(block_t),
        "num_stages": 1,
    }
    for block_t in BLOCK_TS
]


def top_k_indices(values, k):
    """Indices [N, E, k] (int32, contiguous) of the k largest values along the last dim of
    the f32 tensor `values` [N, E, T] (any strides), largest first, ties to the smaller
    index: `torch.argsort(values, 2, descending=True, stable=True)[..., :k]`."""
    import torch

    assert values.dim() == 3 and values.dtype == torch.float32
    batch, num_experts, num_tokens = values.shape
    assert 0 <= k <= num_tokens, (k, num_tokens)
    out = torch.empty((batch, num_experts, k), dtype=torch.int32, device=values.device)
    if k == 0 or batch * num_experts == 0:
        return out
    block_t = block_t_for(num_tokens)
    stride_n, stride_e, stride_t = values.stride()
    topk_rows_kernel[grid(batch, num_experts)](
        values,
        out,
        num_experts,
        num_tokens,
        k,
        stride_n,
        stride_e,
        stride_t,
        BLOCK_T=block_t,
        num_warps=num_warps_for(block_t),
        num_stages=1,
    )
    return out
