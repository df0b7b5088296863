//! Small pieces shared by the denoiser's modules.

use burn::nn::{LayerNorm, LayerNormConfig, Linear};
use burn::prelude::*;
use burn::tensor::activation::gelu_approximate;

use super::init::{Dist, Init};

/// `nn.LayerNorm(dim, eps, bias=False)`: a learned scale and no shift.
pub fn layer_norm<B: Backend>(dim: usize, eps: f64, init: &Init<B>) -> LayerNorm<B> {
    LayerNormConfig::new(dim)
        .with_epsilon(eps)
        .with_bias(false)
        .init(init.device())
}

/// LayerNorm without any parameters over the last dimension (the q/k norms).
pub fn normalize<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let (var, mean) = x.clone().var_mean_bias(D - 1);
    (x - mean) / (var + eps).sqrt()
}

/// AdaLN modulation `x * (1 + scale) + shift`, with per-sample `shift`, `scale` of shape [B, D].
pub fn modulate<B: Backend>(
    x: Tensor<B, 3>,
    shift: Tensor<B, 2>,
    scale: Tensor<B, 2>,
) -> Tensor<B, 3> {
    x * (scale.unsqueeze_dim::<3>(1) + 1.0) + shift.unsqueeze_dim(1)
}

/// Splits the last dimension of `x` into `N` equal parts (PyTorch's `chunk(N, -1)`).
pub fn split_last<B: Backend, const D: usize, const N: usize>(
    x: Tensor<B, D>,
) -> [Tensor<B, D>; N] {
    <[Tensor<B, D>; N]>::try_from(x.chunk(N, D - 1)).expect("last dimension divisible into N parts")
}

/// timm's `Mlp` with a LayerNorm between the activation and the second layer, as the
/// reference uses it for the caption projection and the pooled-caption embedding.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub fc1: Linear<B>,
    pub norm: LayerNorm<B>,
    pub fc2: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// Weights drawn from N(0, 0.02) as `initialize_weights` sets them for both users.
    pub fn new(d_in: usize, d_hidden: usize, d_out: usize, eps: f64, init: &mut Init<B>) -> Self {
        Self {
            fc1: init.linear(d_in, d_hidden, true, Dist::Normal(0.02)),
            norm: layer_norm(d_hidden, eps, init),
            fc2: init.linear(d_hidden, d_out, true, Dist::Normal(0.02)),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.fc2
            .forward(self.norm.forward(gelu_approximate(self.fc1.forward(x))))
    }
}

/// `nn.Sequential(LayerNorm, Linear)`: the patch-mixer's width adapters.
#[derive(Module, Debug)]
pub struct NormLinear<B: Backend> {
    pub norm: LayerNorm<B>,
    pub linear: Linear<B>,
}

impl<B: Backend> NormLinear<B> {
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
