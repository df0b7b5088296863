//! `microdit quantize`: a checkpoint's denoiser with its transformer blocks' weights in
//! int8, which `generate`, `serve` and `eval` load with `--dtype int8` in about a quarter
//! of the memory (and without ever holding the float weights).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};

use crate::backend::Cpu;
use crate::hub::Hub;
use crate::model::weights::save_weights;
use crate::model::Precision;
use crate::pipeline::load::{load_denoiser, Components};

#[derive(Debug, Clone, clap::Args)]
pub struct QuantizeArgs {
    /// MicroDiT weights: a .pt/.safetensors file, a `microdit train` (or demo) run folder,
    /// or REPO/PATH on the Hugging Face Hub.
    pub checkpoint: String,
    /// Where to write the quantised weights (.safetensors).
    pub out: PathBuf,
    /// Denoiser architecture: a preset name or a JSON/TOML config file [default:
    /// pipeline.json's beside the checkpoint, else MicroDiT_XL_2].
    #[arg(long)]
    pub model: Option<String>,
    /// Image side in pixels the weights are for (it sets the stored positions) [default:
    /// pipeline.json's, else 512].
    #[arg(long)]
    pub resolution: Option<usize>,
    /// The latent codec the model works in, for its downscale: a VAE directory or Hub
    /// repo, or space-to-depth:F [default: pipeline.json's, else by the checkpoint's latent
    /// channels].
    #[arg(long)]
    pub vae: Option<String>,
}

pub fn run(args: &QuantizeArgs) -> Result<()> {
    ensure!(
        args.out.extension().and_then(|e| e.to_str()) == Some("safetensors"),
        "{}: the quantised weights are written as .safetensors",
        args.out.display()
    );
    let components = Components {
        checkpoint: Some(args.checkpoint.clone()),
        model: args.model.clone(),
        resolution: args.resolution,
        vae: args.vae.clone(),
        ..Components::default()
    }
    .over_defaults()?;
    let parts = components.parts(Precision::Int8)?;
    let device = Default::default();
    let hub = Hub::from_env();
    let (model, _) = load_denoiser::<Cpu>(&parts, &hub, &device)?;
    save_weights(&model, &args.out)?;
    let size = |path: &Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    println!(
        "wrote {} ({:.1} MB; load it with --checkpoint {} --dtype int8)",
        args.out.display(),
        size(&args.out) as f64 / 1e6,
        args.out.display()
    );
    Ok(())
}
