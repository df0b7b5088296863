//! Small pieces shared by the denoiser's modules.

use crate::nn::linear::Linear;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::gelu_approximate;

use super::init::{Dist, Init};
use crate::backend::{self, MicroditBackend};
use crate::nn::precision::{cast, promote, to_f32, widest};

/// `nn.LayerNorm(dim, eps, bias=False)`: a learned scale and no shift, in f32 (the scale
/// kept in f32 by [`LowPrecisionCopy`](crate::nn::precision::LowPrecisionCopy)), through
/// [`backend::scaled_layer_norm`]: one node under autodiff where burn's `LayerNorm` is eight
/// operations and their backwards. Named and laid out as burn's (`Struct:LayerNorm` with a
/// `gamma`), so checkpoints and burn-store's PyTorch adapters read it as one.
#[derive(Module, Debug)]
pub struct LayerNorm<B: MicroditBackend> {
    pub gamma: Param<Tensor<B, 1>>,
    epsilon: f64,
}

impl<B: MicroditBackend> LayerNorm<B> {
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        backend::scaled_layer_norm(to_f32(x), self.gamma.val(), self.epsilon)
    }
}

/// A [`LayerNorm`] of width `dim`, its scale at one.
pub fn layer_norm<B: MicroditBackend>(dim: usize, eps: f64, init: &Init<B>) -> LayerNorm<B> {
    LayerNorm {
        gamma: Param::from_tensor(Tensor::ones([dim], init.device())),
        epsilon: eps,
    }
}

/// AdaLN modulation `x * (1 + scale) + shift`, with per-sample `shift`, `scale` of shape [B, D].
pub fn modulate<B: MicroditBackend>(
    x: Tensor<B, 3>,
    shift: Tensor<B, 2>,
    scale: Tensor<B, 2>,
) -> Tensor<B, 3> {
    let dtype = widest(&[x.dtype(), shift.dtype(), scale.dtype()]);
    let [shift, scale] = [shift, scale].map(|t| cast(t, dtype));
    backend::modulate(cast(x, dtype), shift, scale)
}

/// The residual update `x + gate * branch` (gate [B, D] per sample), in the wider type.
pub fn gated_residual<B: MicroditBackend>(
    x: Tensor<B, 3>,
    gate: Tensor<B, 2>,
    branch: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let dtype = widest(&[x.dtype(), gate.dtype(), branch.dtype()]);
    let [x, branch] = [x, branch].map(|t| cast(t, dtype));
    backend::gated_residual(x, cast(gate, dtype), branch)
}

/// `x + branch` in the wider type.
pub fn residual<B: MicroditBackend, const D: usize>(
    x: Tensor<B, D>,
    branch: Tensor<B, D>,
) -> Tensor<B, D> {
    let (x, branch) = promote(x, branch);
    x + branch
}

/// `x` in `like`'s type.
pub fn cast_like<B: MicroditBackend, const D: usize, const E: usize>(
    x: Tensor<B, D>,
    like: &Tensor<B, E>,
) -> Tensor<B, D> {
    cast(x, like.dtype())
}

/// timm's `Mlp` with a LayerNorm between the activation and the second layer, as the
/// reference uses it for the caption projection and the pooled-caption embedding.
#[derive(Module, Debug)]
pub struct Mlp<B: MicroditBackend> {
    pub fc1: Linear<B>,
    pub norm: LayerNorm<B>,
    pub fc2: Linear<B>,
}

impl<B: MicroditBackend> Mlp<B> {
    /// Weights drawn from N(0, 0.02) as `initialize_weights` sets them for both users.
    pub fn new(d_in: usize, d_hidden: usize, d_out: usize, eps: f64, init: &mut Init<B>) -> Self {
        Self {
            fc1: init.linear(d_in, d_hidden, true, Dist::Normal(0.02)),
            norm: layer_norm(d_hidden, eps, init),
            fc2: init.linear(d_hidden, d_out, true, Dist::Normal(0.02)),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let h = gelu_approximate(self.fc1.forward(x));
        self.fc2.forward(self.norm.forward(h))
    }
}

/// `nn.Sequential(LayerNorm, Linear)`: the patch-mixer's width adapters.
#[derive(Module, Debug)]
pub struct NormLinear<B: MicroditBackend> {
    pub norm: LayerNorm<B>,
    pub linear: Linear<B>,
}

impl<B: MicroditBackend> NormLinear<B> {
    pub fn new(d_in: usize, d_out: usize, bias: bool, eps: f64, init: &mut Init<B>) -> Self {
        Self {
            norm: layer_norm(d_in, eps, init),
            linear: init.linear(d_in, d_out, bias, Dist::Xavier),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.linear.forward(self.norm.forward(x))
    }
}
