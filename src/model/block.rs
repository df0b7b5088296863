//! Transformer blocks: the AdaLN-modulated DiT block, the caption self-attention block, and
//! the final layer.

use crate::nn::linear::Linear;
use burn::prelude::*;
use burn::tensor::activation::gelu_approximate;

use super::attention::{CrossAttention, SelfAttention};
use super::config::BlockShape;
use super::expert_choice::ExpertChoiceFeedForward;
use super::feed_forward::FeedForward;
use super::init::{Dist, Init};
use super::layers::{gated_residual, layer_norm, modulate, residual, LayerNorm};
use crate::backend::MicroditBackend;
use crate::nn::split_last;

/// Every second block swaps its dense feed-forward for experts.
// Built once per model; boxing would only add an indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum BlockFeedForward<B: MicroditBackend> {
    Dense(FeedForward<B>),
    Experts(ExpertChoiceFeedForward<B>),
}

impl<B: MicroditBackend> BlockFeedForward<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        match self {
            Self::Dense(ff) => ff.forward(x),
            Self::Experts(moe) => moe.forward(x),
        }
    }
}

/// `x += gate * attn(modulate(norm(x)))`, `x += cross_attn(norm(x), y)`,
/// `x += gate * ffn(modulate(norm(x)))`; shift/scale/gate from the conditioning vector.
#[derive(Module, Debug)]
pub struct DitBlock<B: MicroditBackend> {
    pub norm1: LayerNorm<B>,
    pub attn: SelfAttention<B>,
    pub cross_attn: CrossAttention<B>,
    pub norm2: LayerNorm<B>,
    pub norm3: LayerNorm<B>,
    pub mlp: BlockFeedForward<B>,
    /// `Sequential(GELU(tanh), Linear(cond_dim, 6 * dim))`, zero at init.
    pub ada_ln_modulation: Linear<B>,
}

pub struct BlockOptions {
    pub cond_dim: usize,
    pub bias: bool,
    pub eps: f64,
    pub num_experts: usize,
    pub expert_capacity: f64,
}

impl<B: MicroditBackend> DitBlock<B> {
    pub fn new(shape: &BlockShape, opts: &BlockOptions, init: &mut Init<B>) -> Self {
        let BlockShape {
            dim,
            head_dim,
            qkv_dim,
            init_std,
            ..
        } = *shape;
        let out = Dist::TruncNormal(init_std);
        let mlp = if shape.moe {
            BlockFeedForward::Experts(ExpertChoiceFeedForward::new(
                opts.num_experts,
                opts.expert_capacity,
                dim,
                shape.expert_hidden(),
                init_std,
                init,
            ))
        } else {
            BlockFeedForward::Dense(FeedForward::new(
                dim,
                shape.swiglu_hidden(),
                opts.bias,
                init_std,
                out,
                init,
            ))
        };
        Self {
            norm1: layer_norm(dim, opts.eps, init),
            attn: SelfAttention::new(dim, qkv_dim, head_dim, opts.bias, opts.eps, out, init),
            cross_attn: CrossAttention::new(dim, head_dim, opts.bias, opts.eps, out, init),
            norm2: layer_norm(dim, opts.eps, init),
            norm3: layer_norm(dim, opts.eps, init),
            mlp,
            ada_ln_modulation: init.quantizable_linear(opts.cond_dim, 6 * dim, true, Dist::Zeros),
        }
    }

    /// `x` [B, N, D] image tokens, `y` [B, L, D] caption tokens, `c` [B, cond_dim].
    pub fn forward(&self, x: Tensor<B, 3>, y: Tensor<B, 3>, c: Tensor<B, 2>) -> Tensor<B, 3> {
        let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp] =
            split_last(self.ada_ln_modulation.forward(gelu_approximate(c)));
        let attn = self.attn.forward(modulate(
            self.norm1.forward(x.clone()),
            shift_msa,
            scale_msa,
        ));
        let x = gated_residual(x, gate_msa, attn);
        let x = residual(x.clone(), self.cross_attn.forward(self.norm2.forward(x), y));
        let ff = self.mlp.forward(modulate(
            self.norm3.forward(x.clone()),
            shift_mlp,
            scale_mlp,
        ));
        gated_residual(x, gate_mlp, ff)
    }
}

/// Pre-norm self-attention + SwiGLU over the caption tokens (`AttentionBlockPromptEmbedding`);
/// both residual branches start at zero.
#[derive(Module, Debug)]
pub struct CaptionBlock<B: MicroditBackend> {
    pub norm1: LayerNorm<B>,
    pub attn: SelfAttention<B>,
    pub norm2: LayerNorm<B>,
    pub mlp: FeedForward<B>,
}

impl<B: MicroditBackend> CaptionBlock<B> {
    pub fn new(shape: &BlockShape, bias: bool, eps: f64, init: &mut Init<B>) -> Self {
        let dim = shape.dim;
        Self {
            norm1: layer_norm(dim, eps, init),
            attn: SelfAttention::new(dim, dim, shape.head_dim, bias, eps, Dist::Zeros, init),
            norm2: layer_norm(dim, eps, init),
            mlp: FeedForward::new(dim, shape.swiglu_hidden(), bias, 0.02, Dist::Zeros, init),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = residual(x.clone(), self.attn.forward(self.norm1.forward(x)));
        residual(x.clone(), self.mlp.forward(self.norm2.forward(x)))
    }
}

/// Modulated LayerNorm and a linear map to `p * p * C` values per token; zero at init.
#[derive(Module, Debug)]
pub struct FinalLayer<B: MicroditBackend> {
    pub norm_final: LayerNorm<B>,
    pub linear: Linear<B>,
    pub ada_ln_modulation: Linear<B>,
}

impl<B: MicroditBackend> FinalLayer<B> {
    pub fn new(dim: usize, out: usize, eps: f64, init: &mut Init<B>) -> Self {
        Self {
            norm_final: layer_norm(dim, eps, init),
            linear: init.linear(dim, out, true, Dist::Zeros),
            ada_ln_modulation: init.linear(dim, 2 * dim, true, Dist::Zeros),
        }
    }

    pub fn forward(&self, x: Tensor<B, 3>, c: Tensor<B, 2>) -> Tensor<B, 3> {
        let [shift, scale] = split_last(self.ada_ln_modulation.forward(gelu_approximate(c)));
        self.linear
            .forward(modulate(self.norm_final.forward(x), shift, scale))
    }
}
