//! The dense SwiGLU feed-forward.

use crate::nn::linear::Linear;
use burn::prelude::*;

use super::init::{Dist, Init};
use crate::backend::{swiglu, MicroditBackend};

/// `w3(silu(w1 x) * w2 x)`, hidden width from [`super::config::BlockShape::swiglu_hidden`].
#[derive(Module, Debug)]
pub struct FeedForward<B: MicroditBackend> {
    pub w1: Linear<B>,
    pub w2: Linear<B>,
    pub w3: Linear<B>,
}

impl<B: MicroditBackend> FeedForward<B> {
    /// w1 starts from a truncated N(0, 0.02); w2 from a truncated N(0, init_std); w3 from `out`.
    pub fn new(
        dim: usize,
        hidden: usize,
        bias: bool,
        init_std: f64,
        out: Dist,
        init: &mut Init<B>,
    ) -> Self {
        Self {
            w1: init.quantizable_linear(dim, hidden, bias, Dist::TruncNormal(0.02)),
            w2: init.quantizable_linear(dim, hidden, bias, Dist::TruncNormal(init_std)),
            w3: init.quantizable_linear(hidden, dim, bias, out),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.w3
            .forward(swiglu(self.w1.forward(x.clone()), self.w2.forward(x)))
    }
}
