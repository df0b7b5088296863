//! EDM preconditioning (Karras et al. 2022, Table 1; NVlabs `EDMPrecond`):
//! `D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ))`.

use crate::backend::MicroditBackend;
use burn::prelude::*;

use super::config::EdmConfig;
use crate::model::{MicroDit, TrainingTokens};

/// How the network is asked: plainly, or with classifier-free guidance at some scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guidance {
    None,
    Scale(f64),
}

impl Guidance {
    /// The reference guides only when the scale exceeds 1.
    pub fn from_scale(scale: f64) -> Self {
        if scale > 1.0 {
            Self::Scale(scale)
        } else {
            Self::None
        }
    }
}

/// The denoised estimate `D(x; σ)` for noisy latents `x` [B, C, H, W] at noise levels
/// `sigma` [B] (or [1] for all), captions `y` [B, L, Cc]; in training, `tokens` says which
/// tokens the backbone sees (`TrainingTokens::all()` otherwise).
pub fn denoise<B: MicroditBackend>(
    model: &MicroDit<B>,
    edm: &EdmConfig,
    x: Tensor<B, 4>,
    sigma: Tensor<B, 1>,
    y: Tensor<B, 3>,
    tokens: &TrainingTokens<B>,
    guidance: Guidance,
) -> Tensor<B, 4> {
    let n = sigma.dims()[0];
    let sd2 = edm.sigma_data * edm.sigma_data;
    let s = sigma.clone().reshape([n, 1, 1, 1]);
    let s2_plus_sd2 = s.clone().powi_scalar(2) + sd2;
    let c_skip = s2_plus_sd2.clone().recip() * sd2;
    let c_out = s * edm.sigma_data / s2_plus_sd2.clone().sqrt();
    let c_in = s2_plus_sd2.sqrt().recip();
    let c_noise = sigma.log() / 4.0;
    let input = x.clone() * c_in;
    let f_x = match guidance {
        Guidance::None => model.forward(input, c_noise, y, tokens),
        Guidance::Scale(scale) => model.forward_cfg(input, c_noise, y, scale),
    };
    c_skip * x + c_out * f_x
}
