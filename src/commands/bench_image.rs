//! `microdit bench image`: one whole image as `generate` makes it (text tower, the sampler
//! over the denoiser with guidance, VAE decode) with stand-in weights, each part timed.
//! `bench/pytorch_generate.py` does the same work in PyTorch.
//!
//! The weights are zeros, allocated when first read as a loaded model's are: the work and
//! the memory of a real checkpoint's, without one (none can be downloaded here).

use std::time::Instant;

use anyhow::Result;
use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;

use super::bench_timing::report;
use super::{DeviceChoice, ModelArgs};
use crate::backend::MicroditBackend;
use crate::edm::EdmConfig;
use crate::model::{Init, MicroDit, Precision};
use crate::pipeline::{Sampling, SamplingArgs, TextToImage};
use crate::text::{ClipTextConfig, ClipTextEncoder, ClipTokenizer, TextEncoder};
use crate::vae::{AutoencoderKl, LatentCodec, VaeConfig};

/// The whole-image benchmark's sampler: DPM-Solver++(2M), 20 steps, guidance 5.
const STEPS: usize = 20;
const GUIDANCE: f64 = 5.0;

#[derive(Debug, clap::Args)]
pub struct ImageBenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The sampler [default: DPM-Solver++(2M), 20 steps, guidance 5].
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// The denoiser's precision (the text tower and the VAE are f32).
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

pub fn run(args: &ImageBenchArgs) -> Result<()> {
    let defaults = Sampling {
        sampler: crate::edm::Sampler::DpmSolver2M,
        ..Sampling::heun(STEPS, GUIDANCE)
    };
    let sampling = args.sampling.over(&defaults)?;
    let model = ModelArgs {
        resolution: args.model.resolution.or(Some(512)),
        ..args.model.clone()
    };
    crate::with_backend!(args.device, |Bk, device| image::<Bk>(
        &model, &sampling, args.dtype, &device
    ))
}

fn image<B: MicroditBackend>(
    model: &ModelArgs,
    sampling: &Sampling,
    dtype: Precision,
    device: &B::Device,
) -> Result<()> {
    let pipeline = stand_in::<B>(model, dtype, device)?;
    // As `generate` has its weights in memory before it starts.
    let mut load = Materialize;
    pipeline.text.tower.visit(&mut load);
    pipeline.denoiser.visit(&mut load);
    if let LatentCodec::Vae { model, .. } = &pipeline.codec {
        model.visit(&mut load);
    }
    println!(
        "one {} px image: {} {} steps, guidance {}, denoiser in {dtype}; text tower and VAE f32",
        pipeline.resolution(),
        sampling.steps,
        sampling.sampler,
        sampling.guidance
    );
    let start = Instant::now();
    let mut part = Instant::now();
    let mut lap = |what: &str| {
        report(what, part.elapsed().as_secs_f64(), 1, "images");
        part = Instant::now();
    };
    let y = pipeline
        .encode_prompt("an owl with the moon behind it, pixel art")
        .states;
    lap("text tower");
    let latents = pipeline.sample(y, 0, sampling, |_| {});
    let _ = latents.clone().into_data();
    lap("sampling");
    pipeline.decode(latents)?;
    lap("VAE decode");
    report("whole image", start.elapsed().as_secs_f64(), 1, "images");
    Ok(())
}

/// Reads every parameter, so that lazily allocated ones are allocated.
struct Materialize;

impl<B: MicroditBackend> ModuleVisitor<B> for Materialize {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let _ = param.val();
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
        let _ = param.val();
    }
}

/// The pipeline of the published parts (ViT-H text tower, the denoiser, the SDXL VAE) with
/// lazily allocated zero weights, the denoiser in `dtype`.
fn stand_in<B: MicroditBackend>(
    model: &ModelArgs,
    dtype: Precision,
    device: &B::Device,
) -> Result<TextToImage<B>> {
    let choice = model.choice();
    let dit = choice.resolve()?;
    let denoiser = match dtype {
        Precision::Int8 => MicroDit::new(&dit, &mut Init::empty_int8(device)),
        float => MicroDit::new(&dit, &mut Init::empty(device)).in_precision(float),
    };
    let text = ClipTextConfig::dfn5b_vit_h_14();
    let vae = VaeConfig::sdxl();
    Ok(TextToImage {
        text: TextEncoder {
            tokenizer: ClipTokenizer::new().with_context_length(text.context_length),
            tower: ClipTextEncoder::new(&text, device),
            config: text,
        },
        denoiser,
        choice,
        dit,
        codec: LatentCodec::Vae {
            model: Box::new(AutoencoderKl::new(&vae, device)),
            config: vae,
            source: "stand-in SDXL VAE".into(),
        },
        edm: EdmConfig::default(),
        device: device.clone(),
    })
}
