//! diffusers' `AutoencoderKL` `config.json`.

use std::path::Path;

use anyhow::{ensure, Result};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sdxl_scale")]
    pub scaling_factor: f64,
    /// Subtracted before scaling when encoding (added back after unscaling when decoding);
    /// absent for the SDXL VAE.
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "silu")]
    pub act_fn: String,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sdxl_scale() -> f64 {
    0.13025
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}

impl VaeConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = crate::io::read_json(path, "a diffusers AutoencoderKL config")?;
        ensure!(
            !cfg.block_out_channels.is_empty(),
            "block_out_channels is empty"
        );
        ensure!(
            cfg.act_fn == "silu",
            "only act_fn \"silu\" is supported, not {:?}",
            cfg.act_fn
        );
        ensure!(
            cfg.block_out_channels
                .iter()
                .all(|c| c.is_multiple_of(cfg.norm_num_groups)),
            "block_out_channels {:?} must be multiples of norm_num_groups {}",
            cfg.block_out_channels,
            cfg.norm_num_groups
        );
        Ok(cfg)
    }

    /// The SDXL VAE (`stabilityai/stable-diffusion-xl-base-1.0`, subfolder `vae`).
    pub fn sdxl() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.13025,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            act_fn: "silu".into(),
        }
    }

    /// Spatial down-sampling factor (8 for SD-style VAEs).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}
