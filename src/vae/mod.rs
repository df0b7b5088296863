//! The frozen image side: diffusers' `AutoencoderKL` (the SDXL VAE, or 16-channel VAEs).

pub mod autoencoder;
pub mod config;

use std::path::Path;

use anyhow::{Context, Result};
use burn::prelude::*;

pub use autoencoder::{AutoencoderKl, LatentDistribution};
pub use config::VaeConfig;

use crate::checkpoint::{apply_state_dict, read_state_dict, upgrade_keys, VAE_KEYS, VAE_LEGACY_KEYS};

impl<B: Backend> AutoencoderKl<B> {
    /// Loads `config.json` + `diffusion_pytorch_model.safetensors` (or `.bin`) from a
    /// diffusers-layout directory.
    pub fn load_dir(dir: &Path, device: &B::Device) -> Result<(Self, VaeConfig)> {
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        let weights = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
            .iter()
            .map(|f| dir.join(f))
            .find(|p| p.exists())
            .with_context(|| format!("{}: no diffusion_pytorch_model.safetensors or .bin", dir.display()))?;
        let tensors = upgrade_keys(read_state_dict(&weights)?, &VAE_LEGACY_KEYS);
        let vae = apply_state_dict(Self::new(&cfg, device), tensors, &VAE_KEYS)
            .with_context(|| format!("loading the VAE from {}", weights.display()))?;
        Ok((vae, cfg))
    }
}

impl VaeConfig {
    /// What the denoiser sees: `(z - shift) * scaling_factor`.
    pub fn to_model_latents<B: Backend>(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        (z - self.shift_factor.unwrap_or(0.0)) * self.scaling_factor
    }

    /// The inverse of [`Self::to_model_latents`], before decoding.
    pub fn from_model_latents<B: Backend>(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        z / self.scaling_factor + self.shift_factor.unwrap_or(0.0)
    }
}
