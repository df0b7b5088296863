//! What the `microdit` binary does, one file per subcommand.

pub mod bench;
pub mod bench_frozen;
mod bench_image;
mod bench_timing;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod info;
pub mod plot;
pub mod precompute;
pub mod quantize;
pub mod serve;
pub mod train;

use anyhow::{bail, Result};
use std::path::PathBuf;

use crate::model::config::ModelChoice;
use crate::model::{DitConfig, Precision};
use crate::pipeline::load::Components;
use crate::pipeline::{GenerationSettings, SamplingArgs};

/// Choosing a model: a published preset or a config file, at some resolution.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Published architecture: MicroDiT_Tiny_2 or MicroDiT_XL_2.
    #[arg(long, default_value = "MicroDiT_XL_2", conflicts_with = "config")]
    pub preset: String,
    /// A JSON or TOML file with the reference DiT constructor arguments instead of a preset
    /// (absent arguments take the constructor's defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Image resolution in pixels (SDXL-VAE latents, 8× smaller). Presets default to 256
    /// and interpolate positions above it (512 is the recipe's second resolution); a
    /// config file defaults to its own size.
    #[arg(long)]
    pub resolution: Option<usize>,
    /// Latent channels (4 for the SDXL VAE, 16 for 16-channel VAEs).
    #[arg(long)]
    pub in_channels: Option<usize>,
}

impl ModelArgs {
    /// The preset or config file, at the resolution and channels given.
    pub fn choice(&self) -> ModelChoice {
        let source = match &self.config {
            Some(path) => path.display().to_string(),
            None => self.preset.clone(),
        };
        ModelChoice {
            resolution: self.resolution,
            in_channels: self.in_channels,
            ..ModelChoice::new(source)
        }
    }

    pub fn config(&self) -> Result<DitConfig> {
        self.choice().resolve()
    }
}

/// Which text-to-image model to load, as `generate` and `serve` take it.
#[derive(Debug, Clone, clap::Args)]
pub struct PipelineArgs {
    /// MicroDiT weights: a .pt/.safetensors file, a `microdit train` (or demo) run folder,
    /// or REPO/PATH on the Hugging Face Hub [default: the released 4-channel XL model].
    /// A `pipeline.json` in the weights' folder or above names the other parts.
    #[arg(long)]
    pub checkpoint: Option<String>,
    /// Denoiser architecture: a preset name or a JSON/TOML config file [default:
    /// MicroDiT_XL_2, or pipeline.json's].
    #[arg(long)]
    pub model: Option<String>,
    /// Latent codec: a VAE directory or Hub repo, or space-to-depth:F [default: SDXL's VAE
    /// for 4 latent channels, ostris/vae-kl-f8-d16 for 16, or pipeline.json's].
    #[arg(long)]
    pub vae: Option<String>,
    /// OpenCLIP text tower: a directory or Hub repo with open_clip_config.json [default:
    /// apple/DFN5B-CLIP-ViT-H-14-378, or pipeline.json's].
    #[arg(long)]
    pub text_encoder: Option<String>,
    /// Image side in pixels [default: 512 (the released checkpoints are 512 px models), or
    /// pipeline.json's].
    #[arg(long)]
    pub resolution: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Precision of the denoiser (bf16/f16 halve its memory; int8 holds its transformer
    /// blocks' weights in int8, a quarter, quantising a float checkpoint as it loads or
    /// reading a `microdit quantize` file; the text tower and the VAE stay in f32, and the
    /// sampler integrates in f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
}

impl PipelineArgs {
    /// What the command line names, over a `pipeline.json` beside a local checkpoint, over
    /// the published model's parts.
    pub fn components(&self) -> Result<Components> {
        let given = Components {
            checkpoint: self.checkpoint.clone(),
            model: self.model.clone(),
            vae: self.vae.clone(),
            text_encoder: self.text_encoder.clone(),
            resolution: self.resolution,
            steps: None,
            guidance: None,
            example_prompt: None,
        };
        given.over_defaults()
    }
}

impl PipelineArgs {
    /// The settings every image of a run shares (prompt and seed left empty): the sampling
    /// options given over the model's defaults; the codec is filled in once the checkpoint
    /// says which one it needs.
    pub fn settings(&self, sampling: &SamplingArgs) -> Result<GenerationSettings> {
        let components = self.components()?;
        let parts = components.parts(self.dtype)?;
        Ok(GenerationSettings {
            prompt: String::new(),
            seed: 0,
            sampling: sampling.over(&components.sampling())?,
            resolution: parts.resolution,
            checkpoint: parts.checkpoint,
            model: parts.model,
            vae: parts.vae.unwrap_or_default(),
            text_encoder: parts.text_encoder,
            dtype: parts.dtype,
            software: format!("microdit {}", env!("CARGO_PKG_VERSION")),
        })
    }
}

/// Where to run: `cpu`, or `cuda` / `cuda:N` when built with `--features cuda`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceChoice {
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device '{s}': use cpu, cuda or cuda:N")),
        }
    }
}

/// Runs `$body` with `$B` bound to the backend for `$device` (a `DeviceChoice`) and `$dev`
/// to its device value ([`with_backend_devices!`] with one device).
#[macro_export]
macro_rules! with_backend {
    ($device:expr, |$B:ident, $dev:ident| $body:expr) => {{
        $crate::with_backend_devices!(&[$device], |$B, devices| {
            let $dev = devices.into_iter().next().expect("one device");
            $body
        })
    }};
}

/// Runs `$body` with `$B` bound to the backend of `$devices` (`DeviceChoice`s of one kind,
/// as data-parallel training takes them) and `$devs` to a `Vec` of its device values.
#[macro_export]
macro_rules! with_backend_devices {
    ($devices:expr, |$B:ident, $devs:ident| $body:expr) => {{
        let choices: &[$crate::commands::DeviceChoice] = $devices;
        match choices.first() {
            None => Err(anyhow::anyhow!("no device given")),
            Some($crate::commands::DeviceChoice::Cpu) => {
                type $B = $crate::backend::Cpu;
                let $devs: Vec<$crate::backend::CpuDevice> = choices
                    .iter()
                    .map(|_| $crate::backend::CpuDevice::default())
                    .collect();
                $body
            }
            #[cfg(feature = "cuda")]
            Some($crate::commands::DeviceChoice::Cuda(_)) => {
                $crate::backend::cuda_runtime::configure();
                type $B = $crate::backend::Cuda;
                let $devs: Vec<$crate::backend::CudaDevice> = choices
                    .iter()
                    .map(|d| match d {
                        $crate::commands::DeviceChoice::Cuda(i) => $crate::backend::CudaDevice::new(*i),
                        $crate::commands::DeviceChoice::Cpu => unreachable!("checked by same_kind"),
                    })
                    .collect();
                $body
            }
            #[cfg(not(feature = "cuda"))]
            Some($crate::commands::DeviceChoice::Cuda(_)) => Err(anyhow::anyhow!(
                "this microdit was built without CUDA support: rebuild with `cargo build --release --features cuda`"
            )),
        }
    }};
}

/// Data-parallel devices must share one backend: all `cpu` or all `cuda:N`, no repeats
/// among GPUs.
pub fn same_kind(devices: &[DeviceChoice]) -> Result<()> {
    let gpus: Vec<usize> = devices
        .iter()
        .filter_map(|d| match d {
            DeviceChoice::Cuda(i) => Some(*i),
            DeviceChoice::Cpu => None,
        })
        .collect();
    if !gpus.is_empty() && gpus.len() != devices.len() {
        bail!("--device mixes cpu and cuda devices");
    }
    let mut unique = gpus.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != gpus.len() {
        bail!("--device names a GPU twice");
    }
    Ok(())
}
