//! `microdit generate`: prompts in, PNGs out, through the text-to-image pipeline; each PNG
//! carries its settings, so `--from-png` makes it again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use burn::prelude::Tensor;

use super::PipelineArgs;
use crate::backend::MicroditBackend;
use crate::hub::Hub;
use crate::pipeline::load::Loader;
use crate::pipeline::{CaptionToImage, GenerationSettings, Image, SamplingArgs};
use crate::vae::LatentCodec;

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
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Output PNG file (one image) or folder.
    #[arg(long, default_value = "outputs")]
    pub out: PathBuf,
    /// Also write a contact sheet of all images (grid.png in the output folder).
    #[arg(long)]
    pub grid: bool,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Reproduce an image from the settings stored in its PNG text chunks.
    #[arg(long, value_name = "IMAGE", conflicts_with_all = ["prompts", "prompts_file"])]
    pub from_png: Option<PathBuf>,
}

/// One image to make: its settings (prompt and seed included) and where it goes.
struct Job {
    settings: GenerationSettings,
    path: PathBuf,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    let jobs = match &args.from_png {
        Some(png) => vec![job_from_png(png, args)?],
        None => jobs(args)?,
    };
    crate::with_backend!(args.pipeline.device, |Bk, device| generate::<Bk>(
        &jobs, args, &device
    ))
}

fn prompts(args: &GenerateArgs) -> Result<Vec<String>> {
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
    Ok(prompts)
}

/// Every image's settings and file: image i of prompt p gets seed + p·n + i.
fn jobs(args: &GenerateArgs) -> Result<Vec<Job>> {
    let prompts = prompts(args)?;
    let template = args.pipeline.settings(&args.sampling)?;
    let single =
        prompts.len() * args.num_images == 1 && args.out.extension().is_some_and(|e| e == "png");
    let mut jobs = Vec::new();
    for (p, prompt) in prompts.iter().enumerate() {
        for i in 0..args.num_images {
            let seed = args.seed + (p * args.num_images + i) as u64;
            let path = if single {
                args.out.clone()
            } else {
                args.out.join(format!("{p:03}-{i:02}-seed{seed}.png"))
            };
            let settings = GenerationSettings {
                prompt: prompt.clone(),
                seed,
                ..template.clone()
            };
            jobs.push(Job { settings, path });
        }
    }
    Ok(jobs)
}

/// The image's own settings; written beside it as NAME-again.png unless --out says where.
fn job_from_png(png: &Path, args: &GenerateArgs) -> Result<Job> {
    let chunks = crate::png_io::read_png_text(png)?;
    let mut settings = GenerationSettings::from_png_text(chunks).with_context(|| {
        format!(
            "{}: its settings cannot be read (not made by microdit generate?)",
            png.display()
        )
    })?;
    settings.software = format!("microdit {}", env!("CARGO_PKG_VERSION"));
    let path = if args.out == Path::new("outputs") {
        png.with_file_name(format!(
            "{}-again.png",
            png.file_stem().unwrap_or_default().to_string_lossy()
        ))
    } else {
        args.out.clone()
    };
    Ok(Job { settings, path })
}

/// The text tower encodes every prompt and is let go before the denoiser loads, and the
/// denoiser before the last image is decoded, so that memory holds one large part at a
/// time (a laptop's one int8 image fits in 2 GB).
fn generate<B: MicroditBackend>(
    jobs: &[Job],
    args: &GenerateArgs,
    device: &B::Device,
) -> Result<()> {
    let first = &jobs.first().context("nothing to generate")?.settings;
    let start = Instant::now();
    let (parts, hub) = (first.parts(), Hub::from_env());
    let loader = Loader::<B>::open(&parts, &hub, device)?;
    let captions = encode_prompts(&loader, jobs)?;
    crate::memory::release_freed();
    let to_image = loader.caption_to_image()?;
    eprintln!(
        "loaded models and encoded {} prompt{} in {:.1} s",
        captions.len(),
        if captions.len() == 1 { "" } else { "s" },
        start.elapsed().as_secs_f64()
    );

    let sampling_started = Instant::now();
    let (images, evaluations) = sample_and_write(to_image, jobs, captions)?;
    let elapsed = sampling_started.elapsed().as_secs_f64();
    if args.grid && images.len() > 1 {
        let tiles: Vec<&[u8]> = images.iter().map(|i| i.rgb.as_slice()).collect();
        crate::png_io::write_grid(&args.out.join("grid.png"), &tiles, images[0].side)?;
    }
    let where_to = if jobs.len() == 1 {
        jobs[0].path.display().to_string()
    } else {
        format!("{}/", args.out.display())
    };
    let peak = crate::memory::peak()
        .map(|bytes| {
            format!(
                "; peak memory {:.2} GiB",
                bytes as f64 / (1u64 << 30) as f64
            )
        })
        .unwrap_or_default();
    println!(
        "wrote {} image{} to {where_to} in {elapsed:.1} s ({:.2} s per network evaluation, {} steps, {}, guidance {}{peak})",
        images.len(),
        if images.len() == 1 { "" } else { "s" },
        elapsed / evaluations.max(1) as f64,
        first.sampling.steps,
        first.sampling.sampler,
        first.sampling.guidance,
    );
    Ok(())
}

/// Each job's image sampled, decoded and written as it is made (an interrupted run keeps
/// what it finished), but the last one decoded after the denoiser is let go, since nothing
/// is left to sample: decoding's activations then do not come on top of it. Returns the
/// images and the network evaluations spent.
fn sample_and_write<B: MicroditBackend>(
    to_image: CaptionToImage<B>,
    jobs: &[Job],
    captions: Vec<Tensor<B, 3>>,
) -> Result<(Vec<Image>, usize)> {
    let (mut images, mut evaluations, mut last) = (Vec::new(), 0, None);
    for (n, (job, caption)) in jobs.iter().zip(captions).enumerate() {
        let settings = GenerationSettings {
            vae: to_image.codec.name(),
            ..job.settings.clone()
        };
        let sampling = &settings.sampling;
        let bar = crate::progress::bar(
            sampling.steps,
            &format!("image {}/{}", n + 1, jobs.len()),
            "step",
        );
        let latents = to_image.sample(caption, settings.seed, sampling, |_| bar.inc(1));
        bar.finish_and_clear();
        evaluations += sampling.evaluations();
        match n + 1 < jobs.len() {
            true => images.push(write_image(&to_image.codec, latents, job, &settings)?),
            false => last = Some((latents, job, settings)),
        }
    }
    let codec = to_image.into_codec();
    if let Some((latents, job, settings)) = last {
        images.push(write_image(&codec, latents, job, &settings)?);
    }
    Ok((images, evaluations))
}

/// `latents` decoded and written to the job's file with `settings` in its text chunks.
fn write_image<B: MicroditBackend>(
    codec: &LatentCodec<B>,
    latents: Tensor<B, 4>,
    job: &Job,
    settings: &GenerationSettings,
) -> Result<Image> {
    let image = Image::from_tensor(codec.decode(latents))?;
    crate::png_io::write_png(
        &job.path,
        &image.rgb,
        image.side,
        image.side,
        &settings.to_png_text()?,
    )?;
    Ok(image)
}

/// Every job's caption embedding [1, L, Cc] (each prompt encoded once), from a text tower
/// loaded for them alone.
fn encode_prompts<B: MicroditBackend>(
    loader: &Loader<B>,
    jobs: &[Job],
) -> Result<Vec<Tensor<B, 3>>> {
    let text = loader.text()?;
    let mut encoded: HashMap<&str, Tensor<B, 3>> = HashMap::new();
    for (n, job) in jobs.iter().enumerate() {
        let prompt = job.settings.prompt.as_str();
        if encoded.contains_key(prompt) {
            continue;
        }
        let caption = text.encode(&[prompt], loader.device());
        if caption.truncated > 0 {
            eprintln!(
                "warning: prompt {n} is longer than the text tower's {} tokens; truncated as the reference does",
                text.config.context_length
            );
        }
        encoded.insert(prompt, caption.states);
    }
    Ok(jobs
        .iter()
        .map(|job| encoded[job.settings.prompt.as_str()].clone())
        .collect())
}
