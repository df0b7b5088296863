//! Expert-choice mixture of experts (Zhou et al. 2022): each expert picks the tokens it
//! processes, so every expert is equally loaded and no balancing loss is needed.

use crate::nn::linear::{Int8Matrix, Linear};
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::{BasicOps, IndexingUpdateOp};

use super::init::{Dist, Init};
use crate::backend::{gelu_exact, top_k_indices, MicroditBackend};
use crate::nn::precision::{matmul_in_weight_type, promote, softmax_f32};

#[derive(Module, Debug)]
pub struct ExpertChoiceFeedForward<B: MicroditBackend> {
    /// [E, D, F]: the experts' first layers (`None` when quantised).
    pub w1: Option<Param<Tensor<B, 3>>>,
    /// [E, F, D]: the experts' second layers (`None` when quantised).
    pub w2: Option<Param<Tensor<B, 3>>>,
    /// In a quantised model: w1 as E·F rows of D, w2 as E·D rows of F.
    pub w1_int8: Option<Int8Matrix<B>>,
    pub w2_int8: Option<Int8Matrix<B>>,
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
        let (w1, w1_int8) =
            init.quantizable_stack([num_experts, dim, hidden], Dist::TruncNormal(0.02));
        let (w2, w2_int8) =
            init.quantizable_stack([num_experts, hidden, dim], Dist::TruncNormal(init_std));
        Self {
            w1,
            w2,
            w1_int8,
            w2_int8,
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
        let probs = softmax_f32(self.gate.forward(x.clone()), 2).swap_dims(1, 2); // [N, E, T]
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
        let h = gelu_exact(stacked_product(xin, &self.w1, &self.w1_int8));
        let h = stacked_product(h, &self.w2, &self.w2_int8); // [E, N·K, D]
        let (h, weights) = promote(h.reshape([e * n * k, d]), weights);
        Tensor::zeros([n * t, d], (&device, h.dtype()))
            .scatter(0, rows, h * weights, IndexingUpdateOp::Add)
            .reshape([n, t, d])
    }
}

/// `x @ w` per expert, `x` [E, rows, d_in], for the float or the int8 stack.
fn stacked_product<B: MicroditBackend>(
    x: Tensor<B, 3>,
    float: &Option<Param<Tensor<B, 3>>>,
    int8: &Option<Int8Matrix<B>>,
) -> Tensor<B, 3> {
    match (float, int8) {
        (Some(w), _) => matmul_in_weight_type(x, w.val()),
        (None, Some(w)) => w.matmul(x),
        (None, None) => unreachable!("an expert stack holds float or int8 weights"),
    }
}

/// `[N, E, K]` values as one column in expert-major order, `[E·N·K, 1]`.
fn expert_major<B: MicroditBackend, K: BasicOps<B>>(t: Tensor<B, 3, K>) -> Tensor<B, 2, K> {
    let [n, e, k] = t.dims();
    t.swap_dims(0, 1).reshape([e * n * k, 1])
}
