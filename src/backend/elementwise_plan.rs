//! How the element-wise chains of `kernels/chains.py` that need no reduction (exact GELU
//! and SwiGLU's gated product, each way) are launched: dense operands of one dtype, one
//! program per block of elements. A pure function, tested on the CPU against the compiled
//! kernels' parameter lists.

use super::launch_plan::{blocks, constexpr, Arg, TritonKernel};

/// The kernels, as `kernels/chains.py` names them, with their operand counts
/// `(inputs, outputs)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    GeluForward,
    GeluBackward,
    SwigluForward,
    SwigluBackward,
}

impl Chain {
    fn name(self) -> &'static str {
        match self {
            Chain::GeluForward => "gelu_fwd",
            Chain::GeluBackward => "gelu_bwd",
            Chain::SwigluForward => "swiglu_fwd",
            Chain::SwigluBackward => "swiglu_bwd",
        }
    }

    /// How many dense operands it reads and writes.
    pub fn operands(self) -> (usize, usize) {
        match self {
            Chain::GeluForward => (1, 1),
            Chain::GeluBackward => (2, 1),
            Chain::SwigluForward => (2, 1),
            Chain::SwigluBackward => (3, 2),
        }
    }
}

/// One call over `n` elements of dtype `dtype` (`fp32` or `bf16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elementwise {
    pub chain: Chain,
    pub dtype: &'static str,
    pub n: usize,
}

impl Elementwise {
    /// The call, or `None` where no compiled variant serves it.
    pub fn new(chain: Chain, dtype: &'static str, n: usize) -> Option<Self> {
        let served = ["fp32", "bf16"].contains(&dtype) && n > 0 && n < i32::MAX as usize;
        served.then_some(Self { chain, dtype, n })
    }

    pub fn variant(&self) -> String {
        format!("chains_{}_{}", self.chain.name(), self.dtype)
    }

    pub fn grid(&self, kernel: &TritonKernel) -> (u32, u32, u32) {
        let block = constexpr(kernel, "BLOCK").expect("the kernel's block") as usize;
        (blocks(self.n, block), 1, 1)
    }

    /// The inputs' then the outputs' addresses, then the element count.
    pub fn args(&self, pointers: &[u64]) -> Vec<Arg> {
        let (inputs, outputs) = self.chain.operands();
        assert_eq!(
            pointers.len(),
            inputs + outputs,
            "{:?} operands",
            self.chain
        );
        let mut args: Vec<Arg> = pointers.iter().map(|&p| Arg::Pointer(p)).collect();
        args.push(Arg::I32(self.n as i32));
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::launch_plan::{compiled, pack};

    #[test]
    fn every_chain_is_compiled_and_takes_the_planned_arguments() {
        let chains = [
            Chain::GeluForward,
            Chain::GeluBackward,
            Chain::SwigluForward,
            Chain::SwigluBackward,
        ];
        for chain in chains {
            for dtype in ["fp32", "bf16"] {
                let plan = Elementwise::new(chain, dtype, 77 * 1152).unwrap();
                let name = plan.variant();
                let kernel = compiled(&name);
                let (inputs, outputs) = chain.operands();
                let pointers: Vec<u64> = (1..=(inputs + outputs) as u64).collect();
                pack(kernel, &plan.args(&pointers)).unwrap();
                let block = constexpr(kernel, "BLOCK").unwrap() as usize;
                assert_eq!(
                    plan.grid(kernel),
                    ((77 * 1152usize).div_ceil(block) as u32, 1, 1)
                );
            }
        }
        assert!(Elementwise::new(Chain::GeluForward, "fp16", 8).is_none());
        assert!(
            Elementwise::new(Chain::GeluForward, "fp32", 0).is_none(),
            "empty grid"
        );
    }
}
