//! `microdit bench`: timings of each network on random (or given) weights, beside which
//! `bench/pytorch_*.py` time the same work in PyTorch. `bench denoiser` (also plain
//! `bench`): one training step (forward + backward + clip + AdamW) at each mask ratio and
//! one guided Heun sampler step; `bench text|vae|encode|eval`: the frozen parts and the
//! evaluation networks (`bench_frozen.rs`).
//!
//! Every run's time is printed as it finishes (the first includes compiling GPU kernels on
//! a cold start), then the median of the timed runs with images/s and, on a GPU, model
//! FLOPs utilisation against the bf16 tensor-core peak.

use std::path::PathBuf;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::bench_frozen::{self, EncodeBenchArgs, EvalBenchArgs, TextBenchArgs, VaeBenchArgs};
use super::bench_image::{self, ImageBenchArgs};
use super::bench_timing::{report, time};
use super::{DeviceChoice, ModelArgs};
use crate::backend::{host_sync, AutodiffBackend, MicroditBackend, Trainable};
use crate::edm::{
    denoise, edm_loss, karras_sigmas, sample, Churn, EdmConfig, Guidance, LossNoise, Sampler,
};
use crate::model::flops::{forward_flops, train_step_flops};
use crate::model::init::{Perturb, RANDOM_WEIGHTS_NOISE};
use crate::model::masking::kept_tokens;
use crate::model::routing::{Sparsity, TrainingTokens};
use crate::model::weights::{load_weights, quantize};
use crate::model::{DitConfig, Init, MicroDit, Precision};
use crate::pipeline::Sampling;
use crate::random::standard_normal;
use crate::train::config::TrainConfig;
use crate::train::optim::clip_grad_norm;

/// Dense bf16 tensor-core peak of an H100/H200 SXM (NVIDIA's datasheet), the usual MFU
/// denominator.
const GPU_PEAK_FLOPS: f64 = 989e12;

/// `microdit bench [WHAT]`: without a subcommand, the denoiser.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BenchCommand {
    #[command(subcommand)]
    pub what: Option<Bench>,
    #[command(flatten)]
    pub denoiser: BenchArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// One denoiser training step per mask ratio and one guided sampler step (the default).
    Denoiser(BenchArgs),
    /// Text encoding with the full-size ViT-H text tower.
    Text(TextBenchArgs),
    /// Decoding one latent with the full-size SDXL VAE.
    Vae(VaeBenchArgs),
    /// Precompute's image path: decode, resize and SDXL VAE encoding.
    Encode(EncodeBenchArgs),
    /// The evaluation's networks: FID Inception, CLIP vision tower, Fréchet distance.
    Eval(EvalBenchArgs),
    /// One whole image: text tower, DPM-Solver++(2M) 20 steps with guidance 5, VAE decode
    /// (512 px MicroDiT_XL_2 unless told), each part timed.
    Image(ImageBenchArgs),
}

impl Bench {
    pub fn run(&self) -> Result<()> {
        match self {
            Self::Denoiser(args) => run(args),
            Self::Text(args) => bench_frozen::run_text(args),
            Self::Vae(args) => bench_frozen::run_vae(args),
            Self::Encode(args) => bench_frozen::run_encode(args),
            Self::Eval(args) => bench_frozen::run_eval(args),
            Self::Image(args) => bench_image::run(args),
        }
    }
}

pub fn run_command(command: &BenchCommand) -> Result<()> {
    match &command.what {
        Some(what) => what.run(),
        None => run(&command.denoiser),
    }
}

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Caption tokens (77 for the OpenCLIP text tower).
    #[arg(long, default_value_t = 77)]
    pub caption_len: usize,
    /// Mask ratios of the timed training steps.
    #[arg(long, value_delimiter = ',', default_value = "0.75,0")]
    pub mask_ratios: Vec<f64>,
    /// Time only the sampler step (what `generate` spends its time on).
    #[arg(long, conflicts_with = "train_only")]
    pub sampler_only: bool,
    /// Time only the training steps.
    #[arg(long)]
    pub train_only: bool,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Guidance scale of the timed sampler step.
    #[arg(long, default_value_t = Sampling::default().guidance)]
    pub guidance: f64,
    /// Timed repetitions of each measurement (after the warm-up runs).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Precision of the denoiser's products: training as `precision = "bf16"` trains (f32
    /// master weights, autocast rules), sampling as `generate --dtype`.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
    /// Trained weights (a safetensors or .pt state dict of this architecture) instead of
    /// random ones: what `--dtype int8` measures its error on.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    anyhow::ensure!(
        args.batch > 0 && args.iters > 0 && args.caption_len > 0,
        "--batch, --iters and --caption-len must be at least 1"
    );
    anyhow::ensure!(
        args.dtype != Precision::Int8 || args.sampler_only,
        "--dtype int8 is for generation: add --sampler-only"
    );
    let cfg = args.model.config()?;
    crate::with_backend!(args.device, |Bk, device| bench::<Trainable<Bk>>(
        &cfg, args, &device
    ))
}

/// `model` quantised; prints how far one evaluation of the raw network output on `x`, `y`
/// moves from the float model's. Random weights are perturbed first ([`Perturb`]: the
/// reference's zero-initialised layers would hide every other layer's error); trained ones
/// (`trained`) are taken as they are.
fn quantized_beside_float<B: MicroditBackend>(
    model: MicroDit<B>,
    cfg: &DitConfig,
    trained: bool,
    x: Tensor<B, 4>,
    y: Tensor<B, 3>,
) -> Result<MicroDit<B>> {
    let float = match trained {
        true => model,
        false => model.map(&mut Perturb::new(1, RANDOM_WEIGHTS_NOISE)),
    };
    let int8 = quantize(&float, cfg)?;
    let t = Tensor::from_floats([0.25], &x.device());
    let output =
        |m: &MicroDit<B>| m.forward(x.clone(), t.clone(), y.clone(), &TrainingTokens::all());
    let (reference, quantized) = (output(&float), output(&int8));
    let error = (quantized - reference.clone()).powi_scalar(2).sum().sqrt()
        / reference.powi_scalar(2).sum().sqrt();
    println!(
        "int8 against f32, one evaluation, {} weights: relative L2 {:.4}%",
        if trained { "trained" } else { "random" },
        100.0 * error.into_scalar().elem::<f64>()
    );
    Ok(int8)
}

/// Host synchronisations per run of the timed work since the count stood at `before`
/// (`backend::host_sync`: the reads microdit itself asks for).
fn report_host_syncs(before: u64, runs: usize) {
    let per_run = (host_sync::count() - before) as f64 / runs as f64;
    println!("{:<40} {per_run:>9.1} host synchronisations per step", "");
}

/// Achieved model FLOP/s, and on a GPU its share of the bf16 peak.
fn report_flops(flops: f64, seconds: f64, device: DeviceChoice) {
    let rate = flops / seconds;
    match device {
        DeviceChoice::Cuda(_) => println!(
            "{:<40} {:>9.1} TFLOP/s  MFU {:.1}% of {:.0} TFLOP/s",
            "",
            rate / 1e12,
            100.0 * rate / GPU_PEAK_FLOPS,
            GPU_PEAK_FLOPS / 1e12
        ),
        DeviceChoice::Cpu => println!("{:<40} {:>9.1} GFLOP/s", "", rate / 1e9),
    }
}

fn bench<B: AutodiffBackend>(cfg: &DitConfig, args: &BenchArgs, device: &B::Device) -> Result<()> {
    let edm = EdmConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let shape = [args.batch, cfg.in_channels, cfg.input_size, cfg.input_size];
    let x0: Tensor<B, 4> = standard_normal(&mut rng, shape, device);
    let y: Tensor<B, 3> = standard_normal(
        &mut rng,
        [args.batch, args.caption_len, cfg.caption_channels],
        device,
    );
    let mut model = Some(match &args.weights {
        Some(path) => load_weights(MicroDit::<B>::new(cfg, &mut Init::empty(device)), path)?,
        None => MicroDit::<B>::new(cfg, &mut Init::reference(0, device)),
    });
    // The reference recipe's optimiser, learning rate and clipping.
    let recipe = TrainConfig::default();
    let mut optim = recipe.adamw().init::<B, MicroDit<B>>();
    println!(
        "{} parameters, batch {}, latents {:?}, captions {}x{}, {:?}, {:?}",
        crate::model::params::param_count(cfg),
        args.batch,
        shape,
        args.caption_len,
        cfg.caption_channels,
        args.dtype,
        args.device
    );

    let ratios: &[f64] = if args.sampler_only {
        &[]
    } else {
        &args.mask_ratios
    };
    for &ratio in ratios {
        let what = format!("train step, mask ratio {ratio}");
        let syncs_before = host_sync::count();
        let seconds = time(&what, args.warmup, args.iters, || {
            let m = model.take().expect("model");
            let sparsity = Sparsity {
                mask_ratio: ratio,
                route: None,
            };
            let draws = LossNoise::draw(&mut rng, shape, cfg.patch_size, &sparsity, device);
            // As the trainer does: a low-precision copy inside the graph computes, the
            // gradients land on the f32 master weights.
            let loss = edm_loss(
                &m.clone().in_precision(args.dtype),
                &edm,
                x0.clone(),
                y.clone(),
                &draws,
                cfg.patch_size,
            );
            // The trainer reads each loss and the gradient norm back to log them.
            host_sync::scalar(loss.clone());
            let mut grads = GradientsParams::from_grads(loss.backward(), &m);
            clip_grad_norm(&m, &mut grads, recipe.grad_clip);
            model = Some(burn::optim::Optimizer::step(
                &mut optim, recipe.lr, m, grads,
            ));
            B::sync(device).expect("device sync");
        });
        report(&what, seconds, args.batch, "images");
        report_host_syncs(syncs_before, args.warmup + args.iters.max(1));
        let kept = kept_tokens(cfg.num_tokens(), ratio);
        report_flops(
            train_step_flops(cfg, args.caption_len, kept, args.batch),
            seconds,
            args.device,
        );
    }

    if args.train_only {
        return Ok(());
    }
    let inference = model.take().expect("model").valid();
    let y = y.inner();
    let x = x0.inner();
    let inference = match args.dtype {
        Precision::Int8 => {
            let trained = args.weights.is_some();
            quantized_beside_float(inference, cfg, trained, x.clone(), y.clone())?
        }
        float => inference.in_precision(float),
    };
    let dev = device.clone();
    // The reference sampler's schedule (its first step is what is timed).
    let sigmas = karras_sigmas(&edm, Sampling::default().steps);
    let guidance = Guidance::from_scale(args.guidance);
    let call = |x: Tensor<B::InnerBackend, 4>, sigma: f64| {
        denoise(
            &inference,
            &edm,
            x,
            Tensor::from_floats([sigma as f32], &dev),
            y.clone(),
            &TrainingTokens::all(),
            guidance,
        )
    };
    let what = format!("Heun step, guidance {}", args.guidance);
    // The sampler's first step (corrected, as every step but the last), then stop.
    let syncs_before = host_sync::count();
    let seconds = time(&what, args.warmup, args.iters, || {
        let no_noise = |_| unreachable!("deterministic");
        let _ = sample(
            x.clone(),
            &sigmas,
            Sampler::Heun,
            Churn::default(),
            call,
            no_noise,
            |_| false,
        );
        B::InnerBackend::sync(&dev).expect("device sync");
    });
    report(&what, seconds, args.batch, "images");
    report_host_syncs(syncs_before, args.warmup + args.iters.max(1));
    // Two network evaluations, each of the batch twice (guided and unguided halves).
    let rows = if guidance == Guidance::None { 1 } else { 2 } * args.batch;
    report_flops(
        2.0 * rows as f64 * forward_flops(cfg, args.caption_len, cfg.num_tokens()),
        seconds,
        args.device,
    );
    Ok(())
}
