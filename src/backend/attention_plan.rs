//! How one attention call maps onto the FlashAttention-2 kernels of `kernels/attention.py`:
//! which compiled variant, over which grid, with which arguments. A pure function of
//! shapes and strides, tested on the CPU against the compiled kernels' parameter lists.
//!
//! Every `[B, H, rows, d]` operand is read where it lies through its batch, head and row
//! strides (int32; the last dimension contiguous), so the q/k/v views of a fused qkv
//! projection need no copy. The row statistics (log-sum-exp, and the backward's
//! Δ = rowsum(dO ∘ O)) are contiguous f32 `[B, H, N]`.

use super::launch_plan::{blocks, constexpr, Arg, TritonKernel};

/// The head dimensions compiled ahead of time (`HEAD_DIMS` in kernels/attention.py).
pub const HEAD_DIMS: [usize; 2] = [32, 64];

/// The four kernels, by the names `kernels/attention.py` gives their variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Forward,
    BackwardPreprocess,
    BackwardKeys,
    BackwardQueries,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Forward => "fwd",
            Kind::BackwardPreprocess => "bwd_preprocess",
            Kind::BackwardKeys => "bwd_dkdv",
            Kind::BackwardQueries => "bwd_dq",
        }
    }

    /// The constant that blocks the grid's first axis, and whether that axis walks keys.
    fn grid_block(self) -> (&'static str, bool) {
        match self {
            Kind::BackwardKeys => ("BLOCK_N", true),
            _ => ("BLOCK_M", false),
        }
    }
}

/// A `[B, H, rows, d]` operand's dimensions and strides (in elements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    pub dims: [usize; 4],
    pub strides: [usize; 4],
}

impl Heads {
    pub fn new(dims: &[usize], strides: &[usize]) -> Option<Self> {
        Some(Self {
            dims: dims.try_into().ok()?,
            strides: strides.try_into().ok()?,
        })
    }

    /// A dense tensor of `dims`.
    pub fn contiguous(dims: [usize; 4]) -> Self {
        let [_, h, n, d] = dims;
        Self {
            dims,
            strides: [h * n * d, n * d, d, 1],
        }
    }

    /// Its batch, head and row strides as kernel arguments.
    fn stride_args(&self) -> [Arg; 3] {
        [0, 1, 2].map(|i| Arg::I32(self.strides[i] as i32))
    }

    /// Readable by the kernels: the last dimension contiguous (or of extent 1) and every
    /// offset within int32.
    fn fits(&self) -> bool {
        let last = self.dims[3] <= 1 || self.strides[3] == 1;
        let extent: usize = (0..4)
            .map(|i| self.dims[i].saturating_sub(1) * self.strides[i])
            .sum();
        last && extent < i32::MAX as usize
    }
}

/// One attention call: q `[B, H, N, d]` over k, v `[B, H, L, d]` in one dtype (`fp32` or
/// `bf16`, as the variants are named; f16 keeps burn's operations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attention {
    pub q: Heads,
    pub k: Heads,
    pub v: Heads,
    pub dtype: &'static str,
    pub causal: bool,
}

impl Attention {
    /// The call, or `None` where no compiled variant serves it (a head dim not built, a
    /// last dimension that is not contiguous, offsets past int32, mismatched shapes): the
    /// caller then keeps burn's operations.
    pub fn new(q: Heads, k: Heads, v: Heads, dtype: &'static str, causal: bool) -> Option<Self> {
        let [b, h, _, d] = q.dims;
        let same_keys = k.dims == v.dims && k.dims[..2] == [b, h] && k.dims[3] == d;
        // An empty grid cannot launch: no rows or no keys stay with burn.
        let served = same_keys
            && q.dims.iter().chain(&k.dims).all(|&n| n > 0)
            && HEAD_DIMS.contains(&d)
            && ["fp32", "bf16"].contains(&dtype)
            && (b * h) < u16::MAX as usize
            && [q, k, v].iter().all(Heads::fits);
        served.then_some(Self {
            q,
            k,
            v,
            dtype,
            causal,
        })
    }

    /// `[B, H, N, d]` of the output and of dq; `[B, H, L, d]` of dk and dv (dense).
    pub fn out(&self) -> Heads {
        Heads::contiguous(self.q.dims)
    }

    pub fn keys(&self) -> Heads {
        Heads::contiguous(self.k.dims)
    }

    /// `[B, H, N]`: the row statistics.
    pub fn rows(&self) -> [usize; 3] {
        let [b, h, n, _] = self.q.dims;
        [b, h, n]
    }

    /// The compiled variant's name for `kind`.
    pub fn variant(&self, kind: Kind) -> String {
        let d = self.q.dims[3];
        let causal = match kind {
            Kind::BackwardPreprocess => String::new(),
            _ => format!("_causal{}", self.causal as u8),
        };
        format!("attention_{}_{}_d{d}{causal}", kind.name(), self.dtype)
    }

    /// One program per block of rows (queries; keys for the dk/dv kernel) per head.
    pub fn grid(&self, kind: Kind, kernel: &TritonKernel) -> (u32, u32, u32) {
        let [b, h, n, _] = self.q.dims;
        let (block, over_keys) = kind.grid_block();
        let rows = if over_keys { self.k.dims[2] } else { n };
        let block = constexpr(kernel, block).expect("the kernel's grid block") as usize;
        (blocks(rows, block), (b * h) as u32, 1)
    }

    fn scale(&self) -> Arg {
        Arg::F32((self.q.dims[3] as f32).powf(-0.5))
    }

    fn sizes(&self, with_keys: bool) -> Vec<Arg> {
        let [_, h, n, _] = self.q.dims;
        let mut sizes = vec![Arg::I32(h as i32), Arg::I32(n as i32)];
        if with_keys {
            sizes.push(Arg::I32(self.k.dims[2] as i32));
        }
        sizes
    }

    /// `attention_fwd(Q, K, V, O, LSE, scale, strides of q, k, v, o, H, N, L)`.
    pub fn forward_args(&self, [q, k, v, o, lse]: [u64; 5]) -> Vec<Arg> {
        let mut args = [q, k, v, o, lse].map(Arg::Pointer).to_vec();
        args.push(self.scale());
        for t in [self.q, self.k, self.v, self.out()] {
            args.extend(t.stride_args());
        }
        args.extend(self.sizes(true));
        args
    }

    /// `attention_bwd_preprocess(O, DO, Delta, strides of o, do, H, N)`; o and do dense.
    pub fn preprocess_args(&self, [o, d_o, delta]: [u64; 3]) -> Vec<Arg> {
        let mut args = [o, d_o, delta].map(Arg::Pointer).to_vec();
        for t in [self.out(), self.out()] {
            args.extend(t.stride_args());
        }
        args.extend(self.sizes(false));
        args
    }

    /// `attention_bwd_dkdv(Q, K, V, DO, LSE, Delta, DK, DV, scale, strides of q, k, v, do,
    /// dk, dv, H, N, L)`.
    pub fn keys_args(&self, pointers: [u64; 8]) -> Vec<Arg> {
        let mut args = pointers.map(Arg::Pointer).to_vec();
        args.push(self.scale());
        for t in [self.q, self.k, self.v, self.out(), self.keys(), self.keys()] {
            args.extend(t.stride_args());
        }
        args.extend(self.sizes(true));
        args
    }

    /// `attention_bwd_dq(Q, K, V, DO, LSE, Delta, DQ, scale, strides of q, k, v, do, dq,
    /// H, N, L)`.
    pub fn queries_args(&self, pointers: [u64; 7]) -> Vec<Arg> {
        let mut args = pointers.map(Arg::Pointer).to_vec();
        args.push(self.scale());
        for t in [self.q, self.k, self.v, self.out(), self.out()] {
            args.extend(t.stride_args());
        }
        args.extend(self.sizes(true));
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::launch_plan::{compiled as kernel, pack};

    /// q, k and v as the self-attention leaves them: views of one `[B, N, 3·H·d]` projection
    /// split into heads, `[B, H, N, d]` with strides (N·3Hd, d, 3Hd, 1).
    fn fused(b: usize, h: usize, n: usize, d: usize) -> [Heads; 3] {
        let row = 3 * h * d;
        [(); 3].map(|_| Heads {
            dims: [b, h, n, d],
            strides: [n * row, d, row, 1],
        })
    }

    #[test]
    fn every_variant_is_compiled_and_takes_the_planned_arguments() {
        let kinds = [
            Kind::Forward,
            Kind::BackwardPreprocess,
            Kind::BackwardKeys,
            Kind::BackwardQueries,
        ];
        for dtype in ["fp32", "bf16"] {
            for d in HEAD_DIMS {
                for causal in [false, true] {
                    let [q, k, v] = fused(2, 3, 77, d);
                    let plan = Attention::new(q, k, v, dtype, causal).unwrap();
                    for kind in kinds {
                        let kernel = kernel(&plan.variant(kind));
                        assert_eq!(constexpr(kernel, "HEAD_DIM"), Some(d as i64));
                        if kind != Kind::BackwardPreprocess {
                            assert_eq!(constexpr(kernel, "CAUSAL"), Some(causal as i64));
                        }
                        let args = match kind {
                            Kind::Forward => plan.forward_args([1, 2, 3, 4, 5]),
                            Kind::BackwardPreprocess => plan.preprocess_args([1, 2, 3]),
                            Kind::BackwardKeys => plan.keys_args([1, 2, 3, 4, 5, 6, 7, 8]),
                            Kind::BackwardQueries => plan.queries_args([1, 2, 3, 4, 5, 6, 7]),
                        };
                        pack(kernel, &args).unwrap();
                        let block = constexpr(kernel, kind.grid_block().0).unwrap() as usize;
                        assert_eq!(
                            plan.grid(kind, kernel),
                            (77usize.div_ceil(block) as u32, 6, 1)
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn operands_are_read_where_they_lie() {
        let [q, k, v] = fused(2, 3, 256, 64);
        let cross_keys = Heads::contiguous([2, 3, 8, 64]);
        let plan = Attention::new(q, cross_keys, cross_keys, "bf16", false).unwrap();
        let args = plan.forward_args([10, 11, 12, 13, 14]);
        let row = 3 * 3 * 64;
        let i = |x: usize| Arg::I32(x as i32);
        assert_eq!(args[..5], [10, 11, 12, 13, 14].map(Arg::Pointer)[..]);
        assert_eq!(args[5], Arg::F32(0.125), "1/√64");
        // q's strides, then k's, v's and the dense output's; then H, N, L.
        assert_eq!(args[6..9], [i(256 * row), i(64), i(row)]);
        assert_eq!(args[9..12], [i(3 * 8 * 64), i(8 * 64), i(64)]);
        assert_eq!(args[15..18], [i(3 * 256 * 64), i(256 * 64), i(64)]);
        assert_eq!(args[18..], [i(3), i(256), i(8)]);
        // The dk/dv kernel's grid walks the keys.
        let keys = kernel(&plan.variant(Kind::BackwardKeys));
        let block = constexpr(keys, "BLOCK_N").unwrap() as usize;
        assert_eq!(
            plan.grid(Kind::BackwardKeys, keys).0,
            8usize.div_ceil(block) as u32
        );
        // And the self-attention's own views.
        let plan = Attention::new(q, k, v, "fp32", false).unwrap();
        assert_eq!(
            plan.forward_args([0; 5])[9..12],
            [i(256 * row), i(64), i(row)]
        );
    }

    #[test]
    fn calls_no_variant_serves_are_left_to_burn() {
        let [q, k, v] = fused(1, 2, 16, 64);
        assert!(Attention::new(q, k, v, "fp32", false).is_some());
        let [q80, k80, v80] = fused(1, 2, 16, 80);
        assert!(
            Attention::new(q80, k80, v80, "fp32", false).is_none(),
            "head dim 80"
        );
        assert!(Attention::new(q, k, v, "fp16", false).is_none());
        let transposed = Heads {
            dims: [1, 2, 16, 64],
            strides: [2048, 1024, 1, 16],
        };
        assert!(Attention::new(transposed, k, v, "fp32", false).is_none());
        let huge = Heads {
            dims: [4096, 2, 1024, 64],
            strides: [1 << 20, 64, 128, 1],
        };
        assert!(
            Attention::new(huge, huge, huge, "bf16", false).is_none(),
            "past int32"
        );
        let no_keys = Heads::contiguous([1, 2, 0, 64]);
        assert!(
            Attention::new(q, no_keys, no_keys, "fp32", false).is_none(),
            "empty grid"
        );
        let other_keys = Heads::contiguous([1, 2, 16, 32]);
        assert!(Attention::new(q, other_keys, other_keys, "fp32", false).is_none());
    }
}
