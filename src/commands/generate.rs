//! `microdit generate`: prompts in, PNGs out — tokenizer, text tower, MicroDiT with the EDM
//! sampler, VAE decoder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::Backend;
use anyhow::{bail, ensure, Context, Result};
use burn::prelude::*;
use indicatif::{ProgressBar, ProgressStyle};

use super::DeviceChoice;
use crate::edm::generate::{sample_latents, SamplerSettings};
use crate::edm::{karras_sigmas, Churn, EdmConfig, Solver};
use crate::hub::{known, Hub};
use crate::model::weights::{denoiser_part, load_state_dict};
use crate::model::Precision;
use crate::model::{DitConfig, Init, MicroDit};
use crate::state_dict::read_state_dict;
use crate::text::{ClipTextEncoder, ClipTokenizer};
use crate::vae::{vae_subfolder, AutoencoderKl};

pub const DEFAULT_CHECKPOINT: &str =
    "VSehwag24/MicroDiT/ckpts/dit_4_channel_37M_real_and_synthetic_data.pt";

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Prompts; each gives --num-images images.
    pub prompts: Vec<String>,
    /// A file with one prompt per line (added to those given as arguments).
    #[arg(long = "prompts", value_name = "FILE")]
    pub prompts_file: Option<PathBuf>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Image i of prompt p (both from 0) uses seed + p * num_images + i.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 = none).
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// Guide only while the noise level σ is within [LO, HI] (Kynkäänniemi et al. 2024).
    #[arg(long, num_args = 2, value_names = ["LO", "HI"])]
    pub guidance_interval: Option<Vec<f64>>,
    #[arg(long, value_enum, default_value = "heun")]
    pub sampler: Solver,
    /// Stochastic sampling: total churn (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub s_churn: f64,
    #[arg(long, default_value_t = 0.0)]
    pub s_min: f64,
    #[arg(long, default_value_t = f64::INFINITY)]
    pub s_max: f64,
    #[arg(long, default_value_t = 1.0)]
    pub s_noise: f64,
    /// Image side in pixels (the released checkpoints are 512 px models).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// MicroDiT weights: a local .pt/.safetensors file, or REPO/PATH on the Hugging Face Hub.
    #[arg(long, default_value = DEFAULT_CHECKPOINT)]
    pub checkpoint: String,
    /// Denoiser architecture: a preset name or a JSON/TOML config file.
    #[arg(long, default_value = "MicroDiT_XL_2")]
    pub model: String,
    /// VAE: a diffusers directory or Hub repo (default: SDXL for 4 latent channels,
    /// ostris/vae-kl-f8-d16 for 16).
    #[arg(long)]
    pub vae: Option<String>,
    /// OpenCLIP text tower: a directory or Hub repo with open_clip_config.json.
    #[arg(long, default_value = known::CLIP_TEXT)]
    pub text_encoder: String,
    /// Output PNG file (one image) or folder.
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
    /// Also write a contact sheet of all images (grid.png in the output folder).
    #[arg(long)]
    pub grid: bool,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
    /// Precision of the denoiser (bf16/f16 halve its memory; the text tower and the VAE
    /// stay in f32, and the sampler integrates in f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
    /// Reproduce an image from the settings stored in its PNG text chunks.
    #[arg(long, value_name = "IMAGE", conflicts_with_all = ["prompts", "prompts_file"])]
    pub from_png: Option<PathBuf>,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let args = match &args.from_png {
        Some(png) => settings_from_png(png, args)?,
        None => args.clone(),
    };
    crate::with_backend!(args.device, |Bk, device| generate::<Bk>(&args, &device))
}

/// (prompt index, image index, prompt, seed) for every image to make.
fn jobs(args: &GenerateArgs) -> Result<Vec<(usize, usize, String, u64)>> {
    let mut prompts = args.prompts.clone();
    if let Some(file) = &args.prompts_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading prompts from {}", file.display()))?;
        prompts.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    ensure!(
        !prompts.is_empty(),
        "no prompt given: pass prompts as arguments or --prompts FILE"
    );
    ensure!(args.num_images > 0, "--num-images must be at least 1");
    Ok(prompts
        .into_iter()
        .enumerate()
        .flat_map(|(p, prompt)| {
            (0..args.num_images).map(move |i| {
                (
                    p,
                    i,
                    prompt.clone(),
                    args.seed + (p * args.num_images + i) as u64,
                )
            })
        })
        .collect())
}

/// A local file, or `owner/repo/path/in/repo` on the Hub.
fn resolve_checkpoint(hub: &Hub, source: &str) -> Result<PathBuf> {
    if Path::new(source).exists() {
        return Ok(PathBuf::from(source));
    }
    let parts: Vec<&str> = source.splitn(3, '/').collect();
    match parts.as_slice() {
        [owner, repo, file] => hub.file(&format!("{owner}/{repo}"), file),
        _ => bail!(
            "checkpoint {source} is neither a file nor OWNER/REPO/PATH on the Hugging Face Hub"
        ),
    }
}

fn generate<B: Backend>(args: &GenerateArgs, device: &B::Device) -> Result<()> {
    let jobs = jobs(args)?;
    let hub = Hub::from_env();
    let start = Instant::now();

    let checkpoint = resolve_checkpoint(&hub, &args.checkpoint)?;
    let tensors = denoiser_part(read_state_dict(&checkpoint)?);
    let mut cfg = if Path::new(&args.model).exists() {
        DitConfig::from_file(Path::new(&args.model))?
    } else {
        DitConfig::preset(&args.model)?
    };
    // The checkpoint says how many latent channels it denoises (4: SDXL VAE, 16: ostris).
    if let Some(w) = tensors.get("x_embedder.proj.weight") {
        cfg.in_channels = w.shape.to_vec().get(1).copied().unwrap_or(cfg.in_channels);
    }
    let vae_source = args.vae.clone().unwrap_or_else(|| {
        if cfg.in_channels == 16 {
            known::VAE_16_CHANNEL.into()
        } else {
            known::SDXL_VAE.into()
        }
    });
    let (vae, vae_cfg) =
        AutoencoderKl::<B>::from_source(&vae_source, vae_subfolder(&vae_source), &hub, device)?;
    ensure!(
        vae_cfg.latent_channels == cfg.in_channels,
        "the VAE {vae_source} has {} latent channels, the checkpoint denoises {}",
        vae_cfg.latent_channels,
        cfg.in_channels
    );
    let scale = vae_cfg.downscale() * cfg.patch_size;
    ensure!(
        args.resolution > 0 && args.resolution.is_multiple_of(scale),
        "--resolution must be a multiple of {scale}"
    );
    cfg.input_size = args.resolution / vae_cfg.downscale();
    if !Path::new(&args.model).exists() {
        // Presets: positions interpolated relative to the 256 px grid the recipe starts at.
        cfg.pos_interp_scale = (args.resolution as f64 / 256.0).max(1.0);
    }
    cfg.validate()?;
    if let Some(pos) = tensors.get("pos_embed") {
        let trained = pos.shape.to_vec().get(1).copied().unwrap_or(0);
        if trained != cfg.num_tokens() {
            eprintln!(
                "warning: {} was trained with {trained} patches per image; {} px gives {}: expect poor images",
                args.checkpoint,
                args.resolution,
                cfg.num_tokens()
            );
        }
    }
    let model = load_state_dict(MicroDit::<B>::new(&cfg, &mut Init::empty(device)), tensors)
        .with_context(|| format!("loading {} as {}", checkpoint.display(), args.model))?
        .cast(args.dtype.dtype());
    let (text, text_cfg) = ClipTextEncoder::<B>::from_source(&args.text_encoder, &hub, device)?;
    ensure!(
        text_cfg.width == cfg.caption_channels,
        "the text tower's width {} differs from the denoiser's caption_channels {}",
        text_cfg.width,
        cfg.caption_channels
    );
    let tokenizer = ClipTokenizer::new();
    eprintln!("loaded models in {:.1} s", start.elapsed().as_secs_f64());

    let edm = EdmConfig::default();
    let settings = SamplerSettings {
        sigmas: karras_sigmas(&edm, args.steps),
        solver: args.sampler,
        churn: Churn {
            s_churn: args.s_churn,
            s_min: args.s_min,
            s_max: args.s_max,
            s_noise: args.s_noise,
        },
        guidance: args.guidance,
        guidance_interval: match args.guidance_interval.as_deref() {
            Some([lo, hi]) => (*lo, *hi),
            _ => (0.0, f64::INFINITY),
        },
    };
    let single_file = jobs.len() == 1 && args.out.extension().is_some_and(|e| e == "png");
    let mut images = Vec::new();
    let sampling = Instant::now();
    let mut evaluations = 0usize;
    for (p, i, prompt, seed) in &jobs {
        let (ids, truncated) = tokenizer.tokenize(prompt);
        if truncated {
            eprintln!(
                "warning: prompt {p} is longer than 77 tokens; truncated as the reference does"
            );
        }
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let y = text.forward(Tensor::from_data(TensorData::new(ids, [1, 77]), device));
        let shape = [1, cfg.in_channels, cfg.input_size, cfg.input_size];
        let bar = progress_bar(
            args.steps,
            &format!("image {}/{}", images.len() + 1, jobs.len()),
        );
        let z = sample_latents(&model, &edm, y, shape, *seed, &settings, |_| bar.inc(1));
        evaluations += crate::edm::generate::evaluations(args.steps, args.sampler);
        bar.finish_and_clear();
        let pixels = crate::image::to_rgb8(vae.decode(vae_cfg.from_model_latents(z)))?;
        let path = if single_file {
            args.out.clone()
        } else {
            args.out.join(format!("{p:03}-{i:02}-seed{seed}.png"))
        };
        let meta = metadata(args, prompt, *seed, &vae_source);
        crate::image::write_png(&path, &pixels, args.resolution, args.resolution, &meta)?;
        images.push((path, pixels));
    }
    let elapsed = sampling.elapsed().as_secs_f64();
    if args.grid && images.len() > 1 {
        let grid = args.out.join("grid.png");
        crate::image::write_grid(
            &grid,
            &images
                .iter()
                .map(|(_, px)| px.as_slice())
                .collect::<Vec<_>>(),
            args.resolution,
        )?;
    }
    println!(
        "wrote {} image{} to {} in {:.1} s ({:.2} s per network evaluation, {} steps, {:?}, guidance {})",
        images.len(),
        if images.len() == 1 { "" } else { "s" },
        if single_file { args.out.display().to_string() } else { format!("{}/", args.out.display()) },
        elapsed,
        elapsed / evaluations.max(1) as f64,
        args.steps,
        args.sampler,
        args.guidance,
    );
    Ok(())
}

fn progress_bar(steps: usize, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] step {pos}/{len} {per_sec} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// The settings that determine an image, stored in its PNG so `--from-png` can redo it.
fn metadata(args: &GenerateArgs, prompt: &str, seed: u64, vae: &str) -> Vec<(String, String)> {
    let mut m = vec![
        ("prompt", prompt.to_string()),
        ("seed", seed.to_string()),
        ("steps", args.steps.to_string()),
        ("guidance", args.guidance.to_string()),
        ("sampler", format!("{:?}", args.sampler).to_lowercase()),
        ("s_churn", args.s_churn.to_string()),
        ("s_min", args.s_min.to_string()),
        ("s_max", args.s_max.to_string()),
        ("s_noise", args.s_noise.to_string()),
        ("resolution", args.resolution.to_string()),
        ("checkpoint", args.checkpoint.clone()),
        ("model", args.model.clone()),
        ("vae", vae.to_string()),
        ("text_encoder", args.text_encoder.clone()),
        ("dtype", format!("{:?}", args.dtype).to_lowercase()),
        (
            "software",
            format!("microdit {}", env!("CARGO_PKG_VERSION")),
        ),
    ];
    if let Some(gi) = &args.guidance_interval {
        m.push(("guidance_interval", format!("{} {}", gi[0], gi[1])));
    }
    m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

fn settings_from_png(png: &Path, cli: &GenerateArgs) -> Result<GenerateArgs> {
    let meta: std::collections::HashMap<String, String> =
        crate::image::read_png_text(png)?.into_iter().collect();
    let get = |k: &str| {
        meta.get(k).cloned().with_context(|| {
            format!(
                "{} has no '{k}' setting: not made by microdit generate?",
                png.display()
            )
        })
    };
    let num = |k: &str| -> Result<f64> {
        get(k)?
            .parse::<f64>()
            .with_context(|| format!("bad '{k}' in {}", png.display()))
    };
    let out = if cli.out == Path::new("outputs") {
        png.with_file_name(format!(
            "{}-again.png",
            png.file_stem().unwrap_or_default().to_string_lossy()
        ))
    } else {
        cli.out.clone()
    };
    Ok(GenerateArgs {
        prompts: vec![get("prompt")?],
        prompts_file: None,
        num_images: 1,
        seed: get("seed")?.parse().context("bad seed")?,
        steps: num("steps")? as usize,
        guidance: num("guidance")?,
        guidance_interval: meta
            .get("guidance_interval")
            .map(|s| s.split(' ').filter_map(|v| v.parse().ok()).collect()),
        sampler: if get("sampler")? == "euler" {
            Solver::Euler
        } else {
            Solver::Heun
        },
        s_churn: num("s_churn")?,
        s_min: num("s_min")?,
        s_max: num("s_max")?,
        s_noise: num("s_noise")?,
        resolution: num("resolution")? as usize,
        checkpoint: get("checkpoint")?,
        model: get("model")?,
        vae: Some(get("vae")?),
        text_encoder: get("text_encoder")?,
        out,
        grid: false,
        device: cli.device,
        dtype: match meta.get("dtype") {
            Some(d) => clap::ValueEnum::from_str(d, true)
                .map_err(|e| anyhow::anyhow!("bad dtype in {}: {e}", png.display()))?,
            None => cli.dtype,
        },
        from_png: None,
    })
}
