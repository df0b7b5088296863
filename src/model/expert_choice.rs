//! Expert-choice mixture of experts (Zhou et al. 2022): each expert picks the tokens it
//! processes, so every expert is equally loaded and no balancing loss is needed.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use burn::tensor::{BasicOps, IndexingUpdateOp};

use super::init::{Dist, Init};
use crate::backend::{gelu_exact, top_k_indices, MicroditBackend};
use crate::nn::precision::{linear, matmul_in_weight_type, promote, softmax_f32};

#[derive(Module, Debug)]
pub struct ExpertChoiceFeedForward<B: MicroditBackend> {
    /// [E, D, F]: the experts' first layers.
    pub w1: Param<Tensor<B, 3>>,
    /// [E, F, D]: the experts' second layers.
    pub w2: Param<Tensor<B, 3>>,
    /// Router D -> E, no bias.
    pub gate: Linear<B>,
    num_experts: usize,
    capacity: f64,
}

impl<B: MicroditBackend> ExpertChoiceFeedForward<B> {
    pub fn new(
        num_experts: usize,
        capacity: f64,
        dim: usize,
        hidden: usize,
        init_std: f64,
        init: &mut Init<B>,
    ) -> Self {
        Self {
            w1: init.param([num_experts, dim, hidden], Dist::TruncNormal(0.02), (0, 0)),
            w2: init.param(
                [num_experts, hidden, dim],
                Dist::TruncNormal(init_std),
                (0, 0),
            ),
            gate: init.linear(dim, num_experts, false, Dist::TruncNormal(0.02)),
            num_experts,
            capacity,
        }
    }

    /// Tokens `x` [N, T, D]: softmax over experts per token; expert e takes the
    /// `int(capacity * T / E)` tokens with the highest probability for it, runs a GELU MLP
    /// on them, and adds the outputs, weighted by those probabilities, back to their tokens.
    /// Gather/scatter-add replace the reference's one-hot einsums (same sums, less work);
    /// the top-k selection runs on the device (`argtopk`), with no copy to the host.
    /// Tokens are gathered straight into expert-major order ([E, N·K, D]), so the experts'
    /// products need no regrouping copies; each token still receives its experts'
    /// outputs in expert order, as the reference sums them.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [n, t, d] = x.dims();
        let e = self.num_experts;
        let k = (self.capacity * t as f64 / e as f64) as usize;
        if k == 0 {
            return x.zeros_like();
        }
        let probs = softmax_f32(linear(&self.gate, x.clone()), 2).swap_dims(1, 2); // [N, E, T]
        let picked = top_k_indices(probs.clone().detach(), k); // [N, E, K]
        let weights = expert_major(probs.gather(2, picked.clone())); // [E·N·K, 1]

        // Row of each picked token in x viewed as [N·T, D].
        let device = x.device();
        let first_row = Tensor::<B, 1, Int>::arange(0..n as i64, &device) * t as i64;
        let rows = expert_major(picked + first_row.reshape([n, 1, 1])).expand([e * n * k, d]);
        let xin = x
            .reshape([n * t, d])
            .gather(0, rows.clone())
            .reshape([e, n * k, d]);
        let h = gelu_exact(matmul_in_weight_type(xin, self.w1.val()));
        let h = matmul_in_weight_type(h, self.w2.val()); // [E, N·K, D]
        let (h, weights) = promote(h.reshape([e * n * k, d]), weights);
        Tensor::zeros([n * t, d], (&device, h.dtype()))
            .scatter(0, rows, h * weights, IndexingUpdateOp::Add)
            .reshape([n, t, d])
    }
}

/// `[N, E, K]` values as one column in expert-major order, `[E·N·K, 1]`.
fn expert_major<B: MicroditBackend, K: BasicOps<B>>(t: Tensor<B, 3, K>) -> Tensor<B, 2, K> {
    let [n, e, k] = t.dims();
    t.swap_dims(0, 1).reshape([e * n * k, 1])
}
