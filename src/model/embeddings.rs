//! What the transformer sees: patch tokens with 2-D sin-cos positions, the noise-level
//! embedding and the caption projection.

use crate::nn::linear::Linear;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::gelu_approximate;

use super::init::{Dist, Init};
use crate::backend::MicroditBackend;
use crate::nn::precision::matmul_in_weight_type;

/// A `p x p`, stride-`p` convolution from C latent channels to D, computed as one matmul over
/// patchified latents. The weight keeps the convolution's [D, C, p, p] layout.
#[derive(Module, Debug)]
pub struct PatchEmbed<B: MicroditBackend> {
    pub weight: Param<Tensor<B, 4>>,
    pub bias: Param<Tensor<B, 1>>,
    patch_size: usize,
}

impl<B: MicroditBackend> PatchEmbed<B> {
    pub fn new(in_channels: usize, dim: usize, patch_size: usize, init: &mut Init<B>) -> Self {
        let fan_in = in_channels * patch_size * patch_size;
        // xavier_uniform_ on the weight viewed as [D, C*p*p].
        Self {
            weight: init.param(
                [dim, in_channels, patch_size, patch_size],
                Dist::Xavier,
                (fan_in, dim),
            ),
            bias: init.param([dim], Dist::Zeros, (0, 0)),
            patch_size,
        }
    }

    /// [B, C, H, W] -> [B, T, D], tokens in row-major patch order.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let [b, c, h, w] = x.dims();
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape([b, c, gh, p, gw, p])
            .permute([0, 2, 4, 1, 3, 5])
            .reshape([b * gh * gw, c * p * p]);
        let [d, ..] = self.weight.dims();
        let weight = self.weight.val().reshape([d, c * p * p]).transpose();
        let tokens = matmul_in_weight_type(patches, weight) + self.bias.val().unsqueeze::<2>();
        tokens.reshape([b, gh * gw, d])
    }
}

/// [B, T, p*p*C] -> [B, C, H, W]: the inverse patch order of the final layer
/// (`nhwpqc -> nchpwq` in the reference).
pub fn unpatchify<B: MicroditBackend>(
    x: Tensor<B, 3>,
    patch_size: usize,
    channels: usize,
) -> Tensor<B, 4> {
    let [b, t, _] = x.dims();
    let g = (t as f64).sqrt() as usize;
    let p = patch_size;
    x.reshape([b, g, g, p, p, channels])
        .permute([0, 5, 1, 3, 2, 4])
        .reshape([b, channels, g * p, g * p])
}

/// 2-D sin-cos positions [T, D] (MAE/DiT), with the grid scaled so that a model moved from
/// `base_size` to a larger grid sees the same range of positions (`pos_interp_scale`).
/// First half of the channels encodes the column, second half the row, as the reference's
/// `meshgrid(grid_w, grid_h)` does.
pub fn sincos_pos_embed(
    dim: usize,
    grid_size: usize,
    base_size: usize,
    pos_interp_scale: f64,
) -> Vec<f32> {
    // The reference builds the grid in float32, then embeds it in float64.
    let coord = |i: usize| {
        ((i as f32 / (grid_size as f32 / base_size as f32)) / pos_interp_scale as f32) as f64
    };
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    let mut out = Vec::with_capacity(grid_size * grid_size * dim);
    for row in 0..grid_size {
        for col in 0..grid_size {
            for pos in [coord(col), coord(row)] {
                out.extend(omega.iter().map(|w| (pos * w).sin() as f32));
                out.extend(omega.iter().map(|w| (pos * w).cos() as f32));
            }
        }
    }
    out
}

/// Sinusoidal embedding of the noise level (512 frequencies) followed by a 2-layer MLP.
#[derive(Module, Debug)]
pub struct TimestepEmbedder<B: MicroditBackend> {
    pub mlp_in: Linear<B>,
    pub mlp_out: Linear<B>,
    frequencies: usize,
}

pub const TIMESTEP_FREQUENCIES: usize = 512;

impl<B: MicroditBackend> TimestepEmbedder<B> {
    pub fn new(dim: usize, init: &mut Init<B>) -> Self {
        Self {
            mlp_in: init.linear(TIMESTEP_FREQUENCIES, dim, true, Dist::Normal(0.02)),
            mlp_out: init.linear(dim, dim, true, Dist::Normal(0.02)),
            frequencies: TIMESTEP_FREQUENCIES,
        }
    }

    /// `t` [B] -> [B, 512]: `[cos(t f), sin(t f)]` with `f_i = exp(-ln(10000) i / 256)`.
    fn sinusoidal(&self, t: Tensor<B, 1>) -> Tensor<B, 2> {
        let half = self.frequencies / 2;
        let freqs = Tensor::<B, 1, Int>::arange(0..half as i64, &t.device())
            .float()
            .mul_scalar(-(10000f64.ln()) / half as f64)
            .exp()
            .cast(t.dtype());
        let args = t.unsqueeze_dim::<2>(1) * freqs.unsqueeze_dim(0);
        Tensor::cat(vec![args.clone().cos(), args.sin()], 1)
    }

    pub fn forward(&self, t: Tensor<B, 1>) -> Tensor<B, 2> {
        let h = gelu_approximate(self.mlp_in.forward(self.sinusoidal(t)));
        self.mlp_out.forward(h)
    }
}
