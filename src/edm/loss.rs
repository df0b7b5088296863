//! The EDM training loss (NVlabs `EDMLoss`), with MicroDiT's patch masking.

use crate::backend::MicroditBackend;
use burn::prelude::*;
use rand::Rng;

use super::config::EdmConfig;
use super::precond::{denoise, Guidance};
use crate::model::routing::{Sparsity, TrainingTokens};
use crate::model::MicroDit;
use crate::random::standard_normal;

/// The random draws one loss evaluation uses, kept apart so that a caller (a test, a
/// resumed run) can supply exactly the same ones.
#[derive(Debug, Clone)]
pub struct LossNoise<B: MicroditBackend> {
    /// [B] standard normals; `ln σ = rnd_normal * P_std + P_mean`.
    pub rnd_normal: Tensor<B, 1>,
    /// [B, C, H, W] standard normal noise, scaled by σ.
    pub noise: Tensor<B, 4>,
    /// Patches hidden from the backbone and tokens routed past its blocks, if training
    /// sparsely.
    pub tokens: TrainingTokens<B>,
}

impl<B: MicroditBackend> LossNoise<B> {
    /// Fresh draws for latents of `shape` cut into `patch_size`² patches, in the
    /// reference's order (σ, noise, then the forward's masking and routing).
    pub fn draw(
        rng: &mut impl Rng,
        shape: [usize; 4],
        patch_size: usize,
        sparsity: &Sparsity,
        device: &B::Device,
    ) -> Self {
        let [b, _, h, w] = shape;
        let tokens = (h / patch_size) * (w / patch_size);
        Self {
            rnd_normal: standard_normal(rng, [b], device),
            noise: standard_normal(rng, shape, device),
            tokens: TrainingTokens::draw(rng, [b, tokens], sparsity, device),
        }
    }
}

/// Weighted denoising error `λ(σ) ‖D(x0 + n; σ) − x0‖²` with `λ = (σ² + σd²)/(σ σd)²`,
/// averaged over everything, or — when masking — per patch, then over the kept patches
/// of each sample, then over the batch.
pub fn edm_loss<B: MicroditBackend>(
    model: &MicroDit<B>,
    edm: &EdmConfig,
    x0: Tensor<B, 4>,
    y: Tensor<B, 3>,
    draws: &LossNoise<B>,
    patch_size: usize,
) -> Tensor<B, 1> {
    let [b, _, h, w] = x0.dims();
    let sigma = (draws.rnd_normal.clone() * edm.p_std + edm.p_mean).exp();
    let s = sigma.clone().reshape([b, 1, 1, 1]);
    let sd2 = edm.sigma_data * edm.sigma_data;
    let weight = (s.clone().powi_scalar(2) + sd2) / (s.clone().powi_scalar(2) * sd2);
    let noisy = x0.clone() + draws.noise.clone() * s;
    let denoised = denoise(model, edm, noisy, sigma, y, &draws.tokens, Guidance::None);
    let loss = weight * (denoised - x0).powi_scalar(2);
    match &draws.tokens.mask {
        None => loss.mean(),
        Some(mask) => {
            let p = patch_size;
            let per_patch = loss
                .mean_dim(1)
                .reshape([b, h / p, p, w / p, p])
                .mean_dim(4)
                .mean_dim(2)
                .reshape([b, (h / p) * (w / p)]);
            let visible = mask.mask.clone().neg() + 1.0;
            let per_sample = (per_patch * visible.clone()).sum_dim(1) / visible.sum_dim(1);
            per_sample.mean()
        }
    }
}
