//! `microdit precompute`: image–caption pairs → MDS shards of latents and caption
//! embeddings, the data `microdit train` reads.

use std::path::PathBuf;

use crate::backend::MicroditBackend;
use anyhow::{Context, Result};

use super::DeviceChoice;
use crate::data::sources::ImageCaptionSource;
use crate::hub::{known, Hub};
use crate::precompute::{precompute, skip_reasons, Encoders, PrecomputeOptions};
use crate::text::TextEncoder;
use crate::vae::LatentCodec;

#[derive(Debug, clap::Args)]
pub struct PrecomputeArgs {
    /// The pairs: a folder of images with same-named .txt/.json captions, a .jsonl or .csv
    /// of path + caption, webdataset .tar shards (a file or a folder of them), or an MDS
    /// dataset with jpg + caption columns.
    pub input: PathBuf,
    /// Output dataset folder (one part-NNNNN folder per part, then a merged index.json).
    #[arg(long)]
    pub out: PathBuf,
    /// VAE: a diffusers directory or Hub repo.
    #[arg(long, default_value = known::SDXL_VAE)]
    pub vae: String,
    /// OpenCLIP text tower: a directory or Hub repo with open_clip_config.json.
    #[arg(long, default_value = known::CLIP_TEXT)]
    pub text_encoder: String,
    /// Square crops to encode, one latents_R column each.
    #[arg(long, value_delimiter = ',', default_value = "256,512")]
    pub resolutions: Vec<usize>,
    /// Skip images whose short side is below this many pixels.
    #[arg(long, default_value_t = 256)]
    pub min_size: usize,
    /// Images encoded together (memory grows with it, most at 512 px).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Pairs per part: the unit that is written atomically and skipped on a re-run.
    #[arg(long, default_value_t = 500)]
    pub part_size: usize,
    /// Seed of the latent samples (each pair draws from its own stream).
    #[arg(long, default_value_t = 2024)]
    pub seed: u64,
    /// Also store each image (jpg column, short side at most the largest resolution).
    #[arg(long)]
    pub keep_images: bool,
    /// This process's index among --workers processes sharing the output folder (one per
    /// GPU or machine); each takes every workers-th part.
    #[arg(long, default_value_t = 0)]
    pub worker: usize,
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub fn run(args: &PrecomputeArgs) -> Result<()> {
    crate::with_backend!(args.device, |Bk, device| run_on::<Bk>(args, &device))
}

fn run_on<B: MicroditBackend>(args: &PrecomputeArgs, device: &B::Device) -> Result<()> {
    let options = PrecomputeOptions {
        resolutions: args.resolutions.clone(),
        min_size: args.min_size,
        batch_size: args.batch_size,
        part_size: args.part_size,
        seed: args.seed,
        keep_images: args.keep_images,
        worker: args.worker,
        workers: args.workers,
        quiet: args.quiet,
    };
    options.check()?;
    let source = ImageCaptionSource::open(&args.input)?;
    eprintln!("{}: {} pairs", args.input.display(), source.len());
    let hub = Hub::from_env();
    // The VAE first: a wrong --vae is reported before the (larger) text tower loads.
    let images = LatentCodec::load(&args.vae, &hub, device).context("loading the VAE")?;
    let encoders = Encoders {
        text: TextEncoder::<B>::from_source(&args.text_encoder, &hub, device)
            .context("loading the text tower")?,
        images,
    };
    let report = precompute(&source, &args.out, &encoders, &options, device)?;
    let reasons: Vec<String> = skip_reasons(&report)
        .iter()
        .map(|(r, n)| format!("{n} {r}"))
        .collect();
    eprintln!(
        "{} pairs written to {}; {} skipped{}; {} captions cut to the text tower's context (details: {})",
        report.written,
        args.out.display(),
        report.skipped.len(),
        if reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", reasons.join(", "))
        },
        report.truncated_captions,
        args.out.join("report.json").display()
    );
    Ok(())
}
