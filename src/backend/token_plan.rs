//! How AdaLN's modulation `x·(1 + scale) + shift` and the gated residual `x + gate·branch`
//! (tokens `[B, N, D]`, per-sample vectors `[B, D]`, all dense and of one dtype) map onto
//! `kernels/chains.py`: tiles of ROWS tokens × COLS features of one sample; the backwards
//! write each tile's column sums (the vectors' gradients) once to an f32 buffer
//! `[K·B, tiles, D]`, which `sum_partials` adds in a fixed order. A pure function, tested
//! on the CPU against the compiled kernels' parameter lists.

use super::launch_plan::{blocks, constexpr, Arg, PartialSums, TritonKernel};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenChain {
    ModulateForward,
    ModulateBackward,
    GatedResidualForward,
    GatedResidualBackward,
}

impl TokenChain {
    fn name(self) -> &'static str {
        match self {
            TokenChain::ModulateForward => "modulate_fwd",
            TokenChain::ModulateBackward => "modulate_bwd",
            TokenChain::GatedResidualForward => "gated_residual_fwd",
            TokenChain::GatedResidualBackward => "gated_residual_bwd",
        }
    }

    /// Column sums a backward tile writes per sample (`d_shift` and `d_scale`; `d_gate`).
    pub fn sums(self) -> usize {
        match self {
            TokenChain::ModulateBackward => 2,
            TokenChain::GatedResidualBackward => 1,
            _ => 0,
        }
    }
}

/// One call over tokens `[batch, tokens, dim]` of dtype `fp32` or `bf16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tokens {
    pub batch: usize,
    pub tokens: usize,
    pub dim: usize,
    pub dtype: &'static str,
}

impl Tokens {
    /// The call, or `None` where no compiled variant serves it (or the grid is empty).
    pub fn new(dims: &[usize], dtype: &'static str) -> Option<Self> {
        let [batch, tokens, dim] = dims.try_into().ok()?;
        let served = ["fp32", "bf16"].contains(&dtype)
            && batch * tokens * dim > 0
            && batch * tokens * dim < i32::MAX as usize
            && batch < u16::MAX as usize;
        served.then_some(Self {
            batch,
            tokens,
            dim,
            dtype,
        })
    }

    pub fn variant(&self, chain: TokenChain) -> String {
        format!("chains_{}_{}", chain.name(), self.dtype)
    }

    /// The column sums' variant, writing the vectors' gradients in the tokens' dtype.
    pub fn sum_variant(&self) -> String {
        format!("chains_sum_partials_{}", self.dtype)
    }

    /// `(cdiv(tokens, ROWS), batch, cdiv(dim, COLS))`: a tile never spans two samples.
    pub fn grid(&self, kernel: &TritonKernel) -> (u32, u32, u32) {
        let block = |name| constexpr(kernel, name).expect("the kernel's tile") as usize;
        let (rows, cols) = (block("ROWS"), block("COLS"));
        (
            blocks(self.tokens, rows),
            self.batch as u32,
            blocks(self.dim, cols),
        )
    }

    /// A backward's partial column sums, `[sums·B, tiles, D]`: each vector's B groups one
    /// after another.
    pub fn partials(&self, chain: TokenChain, backward: &TritonKernel) -> PartialSums {
        PartialSums {
            groups: chain.sums() * self.batch,
            parts: self.grid(backward).0 as usize,
            cols: self.dim,
        }
    }

    /// The kernel's pointers in its order, then the token count and width.
    pub fn args(&self, pointers: &[u64]) -> Vec<Arg> {
        let mut args: Vec<Arg> = pointers.iter().map(|&p| Arg::Pointer(p)).collect();
        args.extend([self.tokens, self.dim].map(|n| Arg::I32(n as i32)));
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::launch_plan::{compiled as kernel, pack};

    #[test]
    fn the_token_chains_take_the_planned_arguments() {
        let chains = [
            (TokenChain::ModulateForward, 4),
            (TokenChain::ModulateBackward, 5),
            (TokenChain::GatedResidualForward, 4),
            (TokenChain::GatedResidualBackward, 5),
        ];
        for dtype in ["fp32", "bf16"] {
            let plan = Tokens::new(&[3, 77, 1152], dtype).unwrap();
            for (chain, pointers) in chains {
                let k = kernel(&plan.variant(chain));
                let pointers: Vec<u64> = (1..=pointers).collect();
                pack(k, &plan.args(&pointers)).unwrap();
                let rows = constexpr(k, "ROWS").unwrap() as usize;
                let cols = constexpr(k, "COLS").unwrap() as usize;
                let grid = (
                    77usize.div_ceil(rows) as u32,
                    3,
                    1152usize.div_ceil(cols) as u32,
                );
                assert_eq!(plan.grid(k), grid);
                if chain.sums() > 0 {
                    let sums = plan.partials(chain, k);
                    assert_eq!(sums.dims(), [chain.sums() * 3, grid.0 as usize, 1152]);
                    let sum = kernel(&plan.sum_variant());
                    pack(sum, &sums.split(3).args([1, 2])).unwrap();
                    assert_eq!(sums.split(3).grid(sum).0, 3);
                }
            }
        }
        assert!(Tokens::new(&[3, 0, 8], "fp32").is_none(), "empty grid");
        assert!(Tokens::new(&[3, 4, 8], "fp16").is_none());
    }
}
