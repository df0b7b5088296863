//! `microdit bench-text|bench-vae|bench-encode|bench-eval`: the frozen parts at full size
//! (ViT-H text tower, SDXL VAE, FID Inception, CLIP vision tower) with random weights, timed. `bench/pytorch_frozen.py` does the same work
//! with open_clip, torchvision and diffusers.

use crate::backend::MicroditBackend;
use anyhow::Result;
use burn::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::bench_timing::{report, time};
use super::DeviceChoice;
use crate::data::preprocess::{decode_rgb, resize_center_crop, to_model_input};
use crate::eval::clip::{ClipVisionConfig, ClipVisionEncoder};
use crate::eval::inception::FidInception;
use crate::eval::stats::{frechet_distance, Statistics};
use crate::random::standard_normal;
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

#[derive(Debug, clap::Args)]
pub struct EvalBenchArgs {
    /// Images per batch.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 2)]
    pub iters: usize,
    /// CLIP vision tower: vit-l-14 (224 px) or vit-h-14-378 (DFN5B, 378 px).
    #[arg(long, default_value = "vit-l-14")]
    pub clip: String,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

#[derive(Debug, clap::Args)]
pub struct EncodeBenchArgs {
    /// A folder of images (e.g. from `python3 bench/pytorch_frozen.py photos DIR`).
    pub images: std::path::PathBuf,
    #[arg(long, default_value_t = 256)]
    pub resolution: usize,
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

/// Counts that must be at least 1, by option name.
fn positive(counts: &[(&str, usize)]) -> Result<()> {
    for (name, value) in counts {
        anyhow::ensure!(*value > 0, "--{name} must be at least 1");
    }
    Ok(())
}

pub fn run_text(args: &TextBenchArgs) -> Result<()> {
    positive(&[("batch", args.batch), ("iters", args.iters)])?;
    crate::with_backend!(args.device, |Bk, device| text::<Bk>(args, &device))
}

pub fn run_vae(args: &VaeBenchArgs) -> Result<()> {
    positive(&[("latent-size", args.latent_size), ("iters", args.iters)])?;
    crate::with_backend!(args.device, |Bk, device| vae::<Bk>(args, &device))
}

pub fn run_eval(args: &EvalBenchArgs) -> Result<()> {
    positive(&[("batch", args.batch), ("iters", args.iters)])?;
    crate::with_backend!(args.device, |Bk, device| eval::<Bk>(args, &device))
}

pub fn run_encode(args: &EncodeBenchArgs) -> Result<()> {
    positive(&[("resolution", args.resolution), ("batch", args.batch)])?;
    crate::with_backend!(args.device, |Bk, device| encode::<Bk>(args, &device))
}

fn text<B: MicroditBackend>(args: &TextBenchArgs, device: &B::Device) -> Result<()> {
    let cfg = ClipTextConfig::dfn5b_vit_h_14();
    let encoder = ClipTextEncoder::<B>::new(&cfg, device);
    let tokenizer = ClipTokenizer::new().with_context_length(cfg.context_length);
    let prompts: Vec<String> = (0..args.batch)
        .map(|i| format!("an owl with the moon behind it, pixel art, number {i}"))
        .collect();
    println!(
        "text tower: width {}, {} layers, {} heads; {} prompts",
        cfg.width, cfg.layers, cfg.heads, args.batch
    );
    let seconds = time("run", 1, args.iters, || {
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

fn vae<B: MicroditBackend>(args: &VaeBenchArgs, device: &B::Device) -> Result<()> {
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
    let seconds = time("run", 1, args.iters, || {
        let _ = vae.decode(z.clone()).into_data();
    });
    report("decode", seconds, 1, "images");
    Ok(())
}

/// The evaluation's networks: FID Inception features, the CLIP vision tower, and the
/// Fréchet distance of 2048-d statistics.
fn eval<B: MicroditBackend>(args: &EvalBenchArgs, device: &B::Device) -> Result<()> {
    let n = args.batch;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let inception = FidInception::<B>::random(0, device);
    let size = crate::eval::inception::INPUT_SIZE;
    let images: Tensor<B, 4> = standard_normal(&mut rng, [n, 3, size, size], device);
    println!("FID Inception-v3, {n} images at {size} px");
    let seconds = time("run", 1, args.iters, || {
        let _ = inception.forward(images.clone()).into_data();
    });
    report("Inception features", seconds, n, "images");

    let cfg = match args.clip.as_str() {
        "vit-l-14" => ClipVisionConfig::vit_l_14(),
        "vit-h-14-378" => ClipVisionConfig::dfn5b_vit_h_14_378(),
        other => anyhow::bail!("--clip {other}: expected vit-l-14 or vit-h-14-378"),
    };
    let tower = ClipVisionEncoder::<B>::new(&cfg, device);
    let s = cfg.image_size;
    let pixels: Tensor<B, 4> = standard_normal(&mut rng, [n, 3, s, s], device);
    println!("CLIP {} vision tower, {n} images at {s} px", args.clip);
    let seconds = time("run", 1, args.iters, || {
        let _ = tower.forward(pixels.clone()).into_data();
    });
    report("CLIP image features", seconds, n, "images");

    let features = |shift: f32, rng: &mut ChaCha8Rng| -> Vec<Vec<f32>> {
        (0..4096)
            .map(|_| {
                (0..2048)
                    .map(|_| rng.random_range(0.0..1.0f32) + shift)
                    .collect()
            })
            .collect()
    };
    let a = Statistics::from_rows(&features(0.0, &mut rng))?;
    let b = Statistics::from_rows(&features(0.1, &mut rng))?;
    let seconds = time("run", 0, 1, || {
        let _ = frechet_distance(&a, &b);
    });
    report("Fréchet distance, 2048-d", seconds, 1, "distances");
    Ok(())
}

/// Precompute's image path: read, decode, resize + crop (in parallel), then the SDXL VAE's
/// encoder and a latent sample, batch by batch; the first batch is a warm-up.
fn encode<B: MicroditBackend>(args: &EncodeBenchArgs, device: &B::Device) -> Result<()> {
    let mut files: Vec<_> = std::fs::read_dir(&args.images)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "jpg" || e == "png"))
        .collect();
    files.sort();
    anyhow::ensure!(
        files.len() > args.batch,
        "{}: needs more than {} images",
        args.images.display(),
        args.batch
    );
    let cfg = VaeConfig::sdxl();
    let vae = AutoencoderKl::<B>::new(&cfg, device);
    let r = args.resolution;
    let side = r / cfg.downscale();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut run = |batch: &[std::path::PathBuf]| -> Result<()> {
        let pixels = batch
            .par_iter()
            .map(|p| {
                let image = decode_rgb(&std::fs::read(p)?)?;
                Ok(to_model_input(&resize_center_crop(&image, r)?))
            })
            .collect::<Result<Vec<_>>>()?
            .concat();
        let n = batch.len();
        let images = Tensor::from_data(TensorData::new(pixels, [n, 3, r, r]), device);
        let noise = standard_normal(&mut rng, [n, cfg.latent_channels, side, side], device);
        let _ = vae.encode(images).sample(noise).into_data();
        Ok(())
    };
    let (warmup, timed) = files.split_at(args.batch);
    run(warmup)?;
    println!(
        "SDXL VAE encoder, {} images at {r} px, batch {}",
        timed.len(),
        args.batch
    );
    let start = std::time::Instant::now();
    for batch in timed.chunks(args.batch) {
        run(batch)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    report("decode + resize + encode", seconds, timed.len(), "images");
    Ok(())
}
