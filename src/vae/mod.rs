//! The frozen image side: diffusers' `AutoencoderKL` (the SDXL VAE, or 16-channel VAEs).

pub mod autoencoder;
pub mod codec;
pub mod config;
pub mod space_to_depth;

use std::path::Path;

use anyhow::{Context, Result};
use burn::prelude::*;

pub use autoencoder::{AutoencoderKl, LatentDistribution};
pub use codec::LatentCodec;
pub use config::VaeConfig;
pub use space_to_depth::SpaceToDepth;

use crate::backend::MicroditBackend;
use crate::hub::Hub;
use crate::state_dict::{
    apply_state_dict, read_state_dict, upgrade_keys, VAE_KEYS, VAE_LEGACY_KEYS,
};

impl<B: MicroditBackend> AutoencoderKl<B> {
    /// From a diffusers-layout directory or Hub repository: `config.json` and
    /// `diffusion_pytorch_model.safetensors` (or `.bin`), under `subfolder` if given
    /// (`vae` in the SDXL base repository; see [`vae_subfolder`]).
    pub fn from_source(
        source: &str,
        subfolder: Option<&str>,
        hub: &Hub,
        device: &B::Device,
    ) -> Result<(Self, VaeConfig)> {
        let name = |f: &str| subfolder.map_or(f.to_string(), |s| format!("{s}/{f}"));
        let cfg = VaeConfig::from_file(&hub.file(source, &name("config.json"))?)?;
        let weights = hub
            .file(source, &name("diffusion_pytorch_model.safetensors"))
            .or_else(|e| {
                hub.file(source, &name("diffusion_pytorch_model.bin"))
                    .map_err(|_| e)
            })?;
        Ok((Self::load(&cfg, &weights, device)?, cfg))
    }

    pub fn load(cfg: &VaeConfig, weights: &Path, device: &B::Device) -> Result<Self> {
        let tensors = upgrade_keys(read_state_dict(weights)?, &VAE_LEGACY_KEYS);
        apply_state_dict(Self::new(cfg, device), tensors, &VAE_KEYS)
            .with_context(|| format!("loading the VAE from {}", weights.display()))
    }
}

/// The SDXL base repository keeps its VAE in a subfolder; VAE-only repositories do not.
pub fn vae_subfolder(source: &str) -> Option<&'static str> {
    (source == crate::hub::known::SDXL_VAE).then_some(crate::hub::known::SDXL_VAE_SUBFOLDER)
}

impl VaeConfig {
    /// What the denoiser sees: `(z - shift) * scaling_factor`.
    pub fn to_model_latents<B: MicroditBackend>(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        (z - self.shift_factor.unwrap_or(0.0)) * self.scaling_factor
    }

    /// The inverse of [`Self::to_model_latents`], before decoding.
    pub fn from_model_latents<B: MicroditBackend>(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        z / self.scaling_factor + self.shift_factor.unwrap_or(0.0)
    }
}
