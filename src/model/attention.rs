//! Self- and cross-attention with non-affine LayerNorm on q and k (QK-norm over the whole
//! q/k width, before the split into heads, as in the reference).

use crate::nn::linear::Linear;
use burn::prelude::*;

use super::init::{Dist, Init};
use crate::backend::{attention, MicroditBackend};
use crate::nn::precision::{cast, normalize};
use crate::nn::split_last;

/// Scaled dot-product attention of `q` [B, N, H] over `k`, `v` [B, L, H] with `heads` heads,
/// after normalising q and k (in f32); attention itself in v's type; returns [B, N, H].
fn attend<B: MicroditBackend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    eps: f64,
) -> Tensor<B, 3> {
    let [b, n, h] = q.dims();
    let split = |t: Tensor<B, 3>| {
        let len = t.dims()[1];
        t.reshape([b, len, heads, h / heads]).swap_dims(1, 2)
    };
    let dtype = v.dtype();
    let out = attention(
        split(cast(normalize(q, eps), dtype)),
        split(cast(normalize(k, eps), dtype)),
        split(v),
        false,
    );
    out.swap_dims(1, 2).reshape([b, n, h])
}

#[derive(Module, Debug)]
pub struct SelfAttention<B: MicroditBackend> {
    pub qkv: Linear<B>,
    pub proj: Linear<B>,
    num_heads: usize,
    eps: f64,
}

impl<B: MicroditBackend> SelfAttention<B> {
    /// `dim` in and out, attention over `qkv_dim = heads * head_dim`; q/k/v start from a
    /// truncated N(0, 0.02) and the output projection from `proj`.
    pub fn new(
        dim: usize,
        qkv_dim: usize,
        head_dim: usize,
        bias: bool,
        eps: f64,
        proj: Dist,
        init: &mut Init<B>,
    ) -> Self {
        Self {
            qkv: init.quantizable_linear(dim, 3 * qkv_dim, bias, Dist::TruncNormal(0.02)),
            proj: init.quantizable_linear(qkv_dim, dim, bias, proj),
            num_heads: qkv_dim / head_dim,
            eps,
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [q, k, v] = split_last(self.qkv.forward(x));
        self.proj.forward(attend(q, k, v, self.num_heads, self.eps))
    }
}

#[derive(Module, Debug)]
pub struct CrossAttention<B: MicroditBackend> {
    pub q_linear: Linear<B>,
    pub kv_linear: Linear<B>,
    pub proj: Linear<B>,
    num_heads: usize,
    eps: f64,
}

impl<B: MicroditBackend> CrossAttention<B> {
    pub fn new(
        dim: usize,
        head_dim: usize,
        bias: bool,
        eps: f64,
        proj: Dist,
        init: &mut Init<B>,
    ) -> Self {
        Self {
            q_linear: init.quantizable_linear(dim, dim, bias, Dist::TruncNormal(0.02)),
            kv_linear: init.quantizable_linear(dim, 2 * dim, bias, Dist::TruncNormal(0.02)),
            proj: init.quantizable_linear(dim, dim, bias, proj),
            num_heads: dim / head_dim,
            eps,
        }
    }

    /// Image tokens `x` [B, N, D] attend to caption tokens `cond` [B, L, D].
    pub fn forward(&self, x: Tensor<B, 3>, cond: Tensor<B, 3>) -> Tensor<B, 3> {
        let q = self.q_linear.forward(x);
        let [k, v] = split_last(self.kv_linear.forward(cond));
        self.proj.forward(attend(q, k, v, self.num_heads, self.eps))
    }
}
