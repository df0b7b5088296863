//! `microdit bench text|vae`: the frozen parts at full size (ViT-H text tower, SDXL VAE) with
//! random weights, timed. `bench/pytorch_frozen.py` does the same work with open_clip and
//! diffusers.

use anyhow::Result;
use burn::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::bench::{report, time};
use super::DeviceChoice;
use crate::edm::loss::standard_normal;
use crate::text::{ClipTextConfig, ClipTextEncoder, ClipTokenizer};
use crate::vae::{AutoencoderKl, VaeConfig};

#[derive(Debug, clap::Args)]
pub struct TextBenchArgs {
    /// Prompts encoded together.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

#[derive(Debug, clap::Args)]
pub struct VaeBenchArgs {
    /// Latent side: 32 (a 256 px image) or 64 (512 px).
    #[arg(long, default_value_t = 32)]
    pub latent_size: usize,
    #[arg(long, default_value_t = 1)]
    pub iters: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

pub fn run_text(args: &TextBenchArgs) -> Result<()> {
    crate::with_backend!(args.device, |Bk, device| text::<Bk>(args, &device))
}

pub fn run_vae(args: &VaeBenchArgs) -> Result<()> {
    crate::with_backend!(args.device, |Bk, device| vae::<Bk>(args, &device))
}

fn text<B: Backend>(args: &TextBenchArgs, device: &B::Device) -> Result<()> {
    let cfg = ClipTextConfig::dfn5b_vit_h_14();
    let encoder = ClipTextEncoder::<B>::new(&cfg, device);
    let tokenizer = ClipTokenizer::new();
    let prompts: Vec<String> = (0..args.batch)
        .map(|i| format!("an owl with the moon behind it, pixel art, number {i}"))
        .collect();
    println!(
        "text tower: width {}, {} layers, {} heads; {} prompts",
        cfg.width, cfg.layers, cfg.heads, args.batch
    );
    let seconds = time(1, args.iters, || {
        let ids: Vec<i64> = prompts
            .iter()
            .flat_map(|p| tokenizer.tokenize(p).0)
            .map(i64::from)
            .collect();
        let tokens = Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids, [args.batch, cfg.context_length]),
            device,
        );
        let _ = encoder.forward(tokens).into_data();
    });
    report("tokenize + encode", seconds, args.batch, "prompts");
    Ok(())
}

fn vae<B: Backend>(args: &VaeBenchArgs, device: &B::Device) -> Result<()> {
    let cfg = VaeConfig::sdxl();
    let vae = AutoencoderKl::<B>::new(&cfg, device);
    let s = args.latent_size;
    let z: Tensor<B, 4> = standard_normal(
        &mut ChaCha8Rng::seed_from_u64(0),
        [1, cfg.latent_channels, s, s],
        device,
    );
    println!(
        "SDXL VAE decoder, latent {s}x{s} -> image {}x{}",
        s * 8,
        s * 8
    );
    let seconds = time(1, args.iters, || {
        let _ = vae.decode(z.clone()).into_data();
    });
    report("decode", seconds, 1, "images");
    Ok(())
}
