//! `microdit bench image`: one whole image as `generate` makes it (text tower, the sampler
//! over the denoiser with guidance, VAE decode) with stand-in weights, each part timed.
//! `bench/pytorch_generate.py` does the same work in PyTorch.
//!
//! The weights are zeros, allocated when first read as a loaded model's are: the work and
//! the memory of a real checkpoint's, without one (none can be downloaded here).

use std::time::Instant;

use anyhow::Result;
use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;

use super::bench_timing::report;
use super::{DeviceChoice, ModelArgs};
use crate::backend::MicroditBackend;
use crate::edm::EdmConfig;
use crate::model::config::ModelChoice;
use crate::model::{DitConfig, Init, MicroDit, Precision};
use crate::pipeline::{CaptionToImage, Image, Sampling, SamplingArgs};
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

/// As `generate` makes its one image: the text tower loaded, the prompt encoded and the
/// tower let go, then the denoiser and the codec loaded, and the denoiser let go before
/// decoding (each part's weights written before its lap, as a loaded model's are).
fn image<B: MicroditBackend>(
    model: &ModelArgs,
    sampling: &Sampling,
    dtype: Precision,
    device: &B::Device,
) -> Result<()> {
    let choice = model.choice();
    let dit = choice.resolve()?;
    println!(
        "one {} px image: {} {} steps, guidance {}, denoiser in {dtype}; text tower and VAE f32",
        dit.input_size * VaeConfig::sdxl().downscale(),
        sampling.steps,
        sampling.sampler,
        sampling.guidance
    );
    let text = stand_in_text::<B>(device);
    let text = TextEncoder {
        tower: text.tower.map(&mut Materialize),
        ..text
    };
    let mut laps = Laps::default();
    let y = text
        .encode(&["an owl with the moon behind it, pixel art"], device)
        .states;
    laps.end("text tower");
    drop(text);
    crate::memory::release_freed();
    let to_image = stand_in::<B>(choice, dit, dtype, device);
    let to_image = materialized(to_image);
    laps.start();
    let latents = to_image.sample(y, 0, sampling, |_| {});
    let _ = latents.clone().into_data();
    laps.end("sampling");
    let codec = to_image.into_codec();
    laps.start();
    Image::from_tensor(codec.decode(latents))?;
    laps.end("VAE decode");
    report("whole image", laps.total, 1, "images");
    Ok(())
}

/// The parts' times, reported as each ends, and their sum (the weights' allocation left out,
/// as a loaded model's is before `generate` starts).
struct Laps {
    started: Instant,
    total: f64,
}

impl Default for Laps {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            total: 0.0,
        }
    }
}

impl Laps {
    fn start(&mut self) {
        self.started = Instant::now();
    }

    fn end(&mut self, what: &str) {
        let seconds = self.started.elapsed().as_secs_f64();
        report(what, seconds, 1, "images");
        self.total += seconds;
    }
}

/// Replaces every parameter by one written in full, as a loaded weight is: the lazily
/// allocated zeros of a skeleton are pages the system has not mapped yet, which would
/// leave the weights out of the peak memory. Floats become −0.0 (zeros to the arithmetic,
/// but not the all-zero bytes an allocator hands out unwritten), int8 values 1 (the
/// kernels' time does not depend on them).
struct Materialize;

impl<B: MicroditBackend> ModuleMapper<B> for Materialize {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let written = vec![-0.0f32; shape.num_elements()];
        let tensor = Tensor::from_data(TensorData::new(written, shape), &tensor.device());
        Param::from_mapped_value(id, tensor, mapper)
    }

    fn map_int<const D: usize>(
        &mut self,
        param: Param<Tensor<B, D, Int>>,
    ) -> Param<Tensor<B, D, Int>> {
        let (id, tensor, mapper) = param.consume();
        let (shape, dtype) = (tensor.shape(), tensor.dtype());
        let written = TensorData::new(vec![1i8; shape.num_elements()], shape).convert_dtype(dtype);
        let tensor = Tensor::from_data(written, (&tensor.device(), dtype));
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The published text tower (DFN5B's ViT-H) with lazily allocated zero weights.
fn stand_in_text<B: MicroditBackend>(device: &B::Device) -> TextEncoder<B> {
    let config = ClipTextConfig::dfn5b_vit_h_14();
    TextEncoder {
        tokenizer: ClipTokenizer::new().with_context_length(config.context_length),
        tower: ClipTextEncoder::new(&config, device),
        config,
    }
}

/// The denoiser of `dit` and the SDXL VAE with lazily allocated zero weights, the denoiser
/// in `dtype`.
fn stand_in<B: MicroditBackend>(
    choice: ModelChoice,
    dit: DitConfig,
    dtype: Precision,
    device: &B::Device,
) -> CaptionToImage<B> {
    let denoiser = match dtype {
        Precision::Int8 => MicroDit::new(&dit, &mut Init::empty_int8(device)),
        float => MicroDit::new(&dit, &mut Init::empty(device)).in_precision(float),
    };
    let vae = VaeConfig::sdxl();
    CaptionToImage {
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
    }
}

/// The denoiser's and the VAE's weights written in full ([`Materialize`]).
fn materialized<B: MicroditBackend>(to_image: CaptionToImage<B>) -> CaptionToImage<B> {
    let codec = match to_image.codec {
        LatentCodec::Vae {
            model,
            config,
            source,
        } => LatentCodec::Vae {
            model: Box::new(model.map(&mut Materialize)),
            config,
            source,
        },
        other => other,
    };
    CaptionToImage {
        denoiser: to_image.denoiser.map(&mut Materialize),
        codec,
        ..to_image
    }
}
