//! Text to image for every caller (`generate`, `serve`, `eval`, the demo's evaluation, and
//! the training previews through [`sample_latents`]):
//! prompt → tokens → text tower → EDM sampler over the denoiser → latent codec → pixels.
//! [`TextToImage`] is the text tower and a [`CaptionToImage`] (the rest), apart so that a
//! caller can let the tower go once its prompts are encoded.
//!
//! The sampler itself (the scheduler, in diffusers' terms) is `edm::sampler`; this module
//! only orchestrates. [`load`] builds a pipeline from names (files, Hub repositories, a
//! training run's `pipeline.json`); [`settings`] is what an image's PNG records.

pub mod load;
pub mod settings;

use anyhow::{Context, Result};
use burn::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::backend::MicroditBackend;
use crate::edm::{denoise, karras_sigmas, sample, EdmConfig, Guidance};
use crate::model::config::ModelChoice;
use crate::model::{DitConfig, MicroDit, TrainingTokens};
use crate::random::standard_normal;
use crate::text::TextEncoder;
use crate::vae::LatentCodec;
pub use settings::{GenerationSettings, Sampling, SamplingArgs};

/// Latents `shape` = [1, C, S, S] for caption embedding `y` [1, L, Cc], from ChaCha8(`seed`)
/// noise (the starting latents, then the fresh noise of any stochastic steps); `on_step(i)` after each step.
pub fn sample_latents<B: MicroditBackend>(
    denoiser: &MicroDit<B>,
    edm: &EdmConfig,
    y: Tensor<B, 3>,
    shape: [usize; 4],
    seed: u64,
    sampling: &Sampling,
    mut on_step: impl FnMut(usize),
) -> Tensor<B, 4> {
    let [_, c, h, w] = shape;
    sample_batch(denoiser, edm, y, &[seed], [c, h, w], sampling, |i| {
        on_step(i);
        true
    })
}

/// Latents [N, C, H, W] for caption embeddings `y` [N, L, Cc], row i from ChaCha8(`seeds[i]`)
/// exactly as [`sample_latents`] draws it alone (one image's noise does not depend on the
/// others'); `on_step(i)` after each step returns whether to go on.
pub fn sample_batch<B: MicroditBackend>(
    denoiser: &MicroDit<B>,
    edm: &EdmConfig,
    y: Tensor<B, 3>,
    seeds: &[u64],
    [c, h, w]: [usize; 3],
    sampling: &Sampling,
    on_step: impl FnMut(usize) -> bool,
) -> Tensor<B, 4> {
    let device = y.device();
    let mut rngs: Vec<ChaCha8Rng> = seeds
        .iter()
        .map(|&s| ChaCha8Rng::seed_from_u64(s))
        .collect();
    let draw = |rngs: &mut Vec<ChaCha8Rng>| {
        let rows = rngs
            .iter_mut()
            .map(|rng| standard_normal::<B, 4>(rng, [1, c, h, w], &device))
            .collect();
        Tensor::cat(rows, 0)
    };
    let latents = draw(&mut rngs);
    sample(
        latents,
        &karras_sigmas(edm, sampling.steps),
        sampling.sampler,
        sampling.churn(),
        |x, sigma| {
            let guidance = if sampling.guided_at(sigma) {
                Guidance::from_scale(sampling.guidance)
            } else {
                Guidance::None
            };
            let sigma = Tensor::from_floats([sigma as f32], &device);
            denoise(
                denoiser,
                edm,
                x,
                sigma,
                y.clone(),
                &TrainingTokens::all(),
                guidance,
            )
        },
        |_| draw(&mut rngs),
        on_step,
    )
}

/// An RGB image, `side`² pixels, interleaved bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    pub side: usize,
    pub rgb: Vec<u8>,
}

impl Image {
    /// From [1, 3, S, S] in nominal [−1, 1].
    pub fn from_tensor<B: MicroditBackend>(image: Tensor<B, 4>) -> Result<Self> {
        let side = image.dims()[2];
        Ok(Self {
            side,
            rgb: crate::png_io::to_rgb8(image)?,
        })
    }

    /// One image per row of [N, 3, S, S].
    pub fn batch_from_tensor<B: MicroditBackend>(images: Tensor<B, 4>) -> Result<Vec<Self>> {
        (0..images.dims()[0])
            .map(|i| Self::from_tensor(images.clone().narrow(0, i, 1)))
            .collect()
    }

    pub fn to_rgb_image(&self) -> Result<image::RgbImage> {
        image::RgbImage::from_raw(self.side as u32, self.side as u32, self.rgb.clone())
            .context("image buffer size")
    }
}

/// The whole pipeline: the text tower, then [`CaptionToImage`].
pub struct TextToImage<B: MicroditBackend> {
    pub text: TextEncoder<B>,
    pub to_image: CaptionToImage<B>,
}

impl<B: MicroditBackend> TextToImage<B> {
    /// Images for `prompts[i]` seeded `seeds[i]`, sampled as one batch (each row's noise as
    /// [`CaptionToImage::sample`] draws it alone); `on_step(i)` after each step.
    pub fn generate(
        &self,
        prompts: &[&str],
        seeds: &[u64],
        sampling: &Sampling,
        on_step: impl FnMut(usize),
    ) -> Result<Vec<Image>> {
        let y = self.text.encode(prompts, &self.to_image.device).states;
        self.to_image.generate(y, seeds, sampling, on_step)
    }
}

/// Caption embeddings to images: the sampler over the denoiser, then the latent codec. Apart
/// from the text tower, so that `generate` can let the tower go once its prompts are
/// encoded ([`load::Loader`]).
pub struct CaptionToImage<B: MicroditBackend> {
    pub denoiser: MicroDit<B>,
    /// The architecture at the loaded resolution, and how it was chosen (for other sizes).
    pub dit: DitConfig,
    pub choice: ModelChoice,
    pub codec: LatentCodec<B>,
    pub edm: EdmConfig,
    pub device: B::Device,
}

impl<B: MicroditBackend> CaptionToImage<B> {
    /// One image's latents for caption embedding `y` [1, L, Cc].
    pub fn sample(
        &self,
        y: Tensor<B, 3>,
        seed: u64,
        sampling: &Sampling,
        on_step: impl FnMut(usize),
    ) -> Tensor<B, 4> {
        let d = &self.dit;
        let shape = [1, d.in_channels, d.input_size, d.input_size];
        sample_latents(&self.denoiser, &self.edm, y, shape, seed, sampling, on_step)
    }

    /// Images for caption embeddings `y` [N, L, Cc], row i seeded `seeds[i]`, sampled as
    /// one batch; `on_step(i)` after each step.
    pub fn generate(
        &self,
        y: Tensor<B, 3>,
        seeds: &[u64],
        sampling: &Sampling,
        mut on_step: impl FnMut(usize),
    ) -> Result<Vec<Image>> {
        let d = &self.dit;
        let shape = [d.in_channels, d.input_size, d.input_size];
        let latents = sample_batch(&self.denoiser, &self.edm, y, seeds, shape, sampling, |i| {
            on_step(i);
            true
        });
        Image::batch_from_tensor(self.codec.decode(latents))
    }

    /// The codec alone, for decoding once nothing is left to sample: the denoiser let go
    /// and the heap's free pages given back, so that decoding's activations do not come
    /// on top of it.
    pub fn into_codec(self) -> LatentCodec<B> {
        drop(self.denoiser);
        crate::memory::release_freed();
        self.codec
    }

    /// Image side in pixels.
    pub fn resolution(&self) -> usize {
        self.dit.input_size * self.codec.downscale()
    }

    /// The denoiser for images of `resolution` pixels (positions for that grid), and its
    /// architecture there.
    pub fn denoiser_at(&self, resolution: usize) -> Result<(DitConfig, MicroDit<B>)> {
        let dit = ModelChoice {
            resolution: Some(resolution),
            ..self.choice.clone()
        }
        .resolve()?;
        let denoiser = self.denoiser.resized(&dit);
        Ok((dit, denoiser))
    }
}
