//! How images become the latents the denoiser sees, and back: a VAE (the recipe's SDXL VAE,
//! or a 16-channel one), or the lossless space-to-depth rearrangement the demo's tiny images
//! use. Named by a string so that configs, PNG settings and the command line can say which:
//! a VAE's directory or Hub repository, or `space-to-depth:F`.

use anyhow::Result;
use burn::prelude::*;

use super::{vae_subfolder, AutoencoderKl, SpaceToDepth, VaeConfig};
use crate::backend::MicroditBackend;
use crate::hub::Hub;

pub enum LatentCodec<B: MicroditBackend> {
    Vae {
        model: Box<AutoencoderKl<B>>,
        config: VaeConfig,
        /// Where it was loaded from (its name).
        source: String,
    },
    SpaceToDepth(SpaceToDepth),
}

impl<B: MicroditBackend> LatentCodec<B> {
    /// `space-to-depth:F`, or a VAE directory / Hub repository.
    pub fn load(name: &str, hub: &Hub, device: &B::Device) -> Result<Self> {
        if let Some(codec) = SpaceToDepth::from_name(name) {
            return Ok(Self::SpaceToDepth(codec?));
        }
        let (model, config) = AutoencoderKl::from_source(name, vae_subfolder(name), hub, device)?;
        Ok(Self::Vae {
            model: Box::new(model),
            config,
            source: name.to_string(),
        })
    }

    pub fn name(&self) -> String {
        match self {
            Self::Vae { source, .. } => source.clone(),
            Self::SpaceToDepth(codec) => codec.name(),
        }
    }

    /// `[B, 3, R, R]` in [−1, 1] → model latents; `noise` is standard normal of the latent
    /// shape (the reference's `latent_dist.sample() * scaling_factor`).
    pub fn encode(&self, images: Tensor<B, 4>, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Vae { model, config, .. } => {
                config.to_model_latents(model.encode(images).sample(noise))
            }
            Self::SpaceToDepth(codec) => codec.encode(images),
        }
    }

    /// Model latents → `[B, 3, R, R]` images in nominal [−1, 1].
    pub fn decode(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        match self {
            Self::Vae { model, config, .. } => model.decode(config.from_model_latents(latents)),
            Self::SpaceToDepth(codec) => codec.decode(latents),
        }
    }

    /// Image pixels per latent pixel along a side.
    pub fn downscale(&self) -> usize {
        match self {
            Self::Vae { config, .. } => config.downscale(),
            Self::SpaceToDepth(codec) => codec.factor,
        }
    }

    pub fn channels(&self) -> usize {
        match self {
            Self::Vae { config, .. } => config.latent_channels,
            Self::SpaceToDepth(codec) => codec.channels(),
        }
    }

    /// [C, H, W] of one image's latents at `resolution` pixels.
    pub fn latent_shape(&self, resolution: usize) -> [usize; 3] {
        let side = resolution / self.downscale();
        [self.channels(), side, side]
    }
}
