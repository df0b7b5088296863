//! `microdit demo`: watch a text-to-image model learn captioned shapes on a CPU, no downloads.

use std::path::PathBuf;

use anyhow::Result;

use super::DeviceChoice;
use crate::backend::Trainable;
use crate::demo::{DemoOptions, Variant, DEFAULT_IMAGE_SIZE};
use crate::model::{DitConfig, Precision};
use crate::pipeline::SamplingArgs;

/// On the CPU the demo trains one replica of its small model per thread (each of a batch of
/// 32), which runs faster than one replica on all threads (docs/BENCHMARKS.md), up to this
/// many.
const MAX_CPU_REPLICAS: usize = 4;

#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Run folder (images, shards, stages, samples.png, loss plots, report.md); re-running
    /// with the same folder resumes.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Wall-clock budget in minutes, data and evaluation included.
    #[arg(long, default_value_t = 10.0)]
    pub minutes: f64,
    /// masked: 75% masking with the patch-mixer, then an unmasked finetune (MicroDiT);
    /// unmasked; masked-no-mixer. Same budget each, for the ablation in docs/DEMO.md.
    #[arg(long, value_enum, default_value = "masked")]
    pub variant: Variant,
    /// Side of the generated images in pixels, even, 16 to 64 (2×2-pixel latents, one patch
    /// each in the demo's model: 64 patches at 16 px, 256 at 32).
    #[arg(long, default_value_t = DEFAULT_IMAGE_SIZE)]
    pub image_size: usize,
    /// Generated training images.
    #[arg(long, default_value_t = 6000)]
    pub train_images: usize,
    /// Prompts sampled for scoring, per group (seen and held-out combinations); the
    /// part-way scorings use a quarter of them [default: 192, which keep a group's accuracy
    /// within about ±4 points; below ten minutes 19 a minute, at least 48].
    #[arg(long)]
    pub eval_prompts: Option<usize>,
    /// Seed of the images, the text tower, the weights and the training order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The denoiser's architecture instead of the demo's: a JSON or TOML DiT config, as the
    /// `dit.json` a demo writes (input_size half the image size, in_channels 12,
    /// caption_channels 64, for the demo's latents and text tower).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// How the scored samples are drawn [default: 18 Heun steps, guidance 5]; re-running a
    /// finished demo with other settings only samples and scores again.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The denoiser's precision when sampling the scored images (training is f32); like
    /// the sampler, it can change on a finished demo, which then only samples and scores
    /// again.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let opts = DemoOptions {
        out: args.out.clone(),
        minutes: args.minutes,
        variant: args.variant,
        image_size: args.image_size,
        train_images: args.train_images,
        eval_prompts: args
            .eval_prompts
            .unwrap_or_else(|| DemoOptions::default_eval_prompts(args.minutes)),
        seed: args.seed,
        quiet: args.quiet,
        sampling: args.sampling.over(&DemoOptions::default_sampling())?,
        dtype: args.dtype,
        model: args
            .model
            .as_deref()
            .map(DitConfig::from_file)
            .transpose()?,
    };
    let replicas = match args.device {
        DeviceChoice::Cpu => rayon::current_num_threads().clamp(1, MAX_CPU_REPLICAS),
        DeviceChoice::Cuda(_) => 1,
    };
    let devices = vec![args.device; replicas];
    crate::with_backend_devices!(&devices, |Bk, devices| crate::demo::run::<Trainable<Bk>>(
        &opts, &devices
    ))?;
    Ok(())
}
