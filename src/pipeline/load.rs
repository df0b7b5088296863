//! Building a [`TextToImage`] (or its parts, one at a time: [`Loader`]) from names: the denoiser's weights (a file, a training run's
//! folder, or a file on the Hugging Face Hub), its architecture, the latent codec and the
//! text tower. A folder that trained a model can name its own parts in a `pipeline.json`
//! (the demo writes one), so `microdit generate --checkpoint RUN/…` needs nothing else.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use burn_store::TensorSnapshot;
use serde::{Deserialize, Serialize};

use super::{CaptionToImage, Sampling, TextToImage};
use crate::backend::MicroditBackend;
use crate::edm::EdmConfig;
use crate::hub::{known, Hub};
use crate::model::config::ModelChoice;
use crate::model::weights::{denoiser_part, load_quantized, load_state_dict};
use crate::model::{DitConfig, Init, MicroDit, Precision};
use crate::run_dir;
use crate::state_dict::read_state_dict;
use crate::text::TextEncoder;
use crate::vae::{LatentCodec, SpaceToDepth};

/// The released 512 px model with 4 latent channels.
pub const DEFAULT_CHECKPOINT: &str =
    "VSehwag24/MicroDiT/ckpts/dit_4_channel_37M_real_and_synthetic_data.pt";

/// The file in which a folder names the parts of the model trained in it.
pub const PIPELINE_FILE: &str = "pipeline.json";

/// A pipeline's parts and default sampling, by name; every field optional, so that what
/// the command line says, a `pipeline.json` says and the published defaults can be layered
/// ([`Components::or`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Components {
    /// Weights: a file, a training run folder (its newest weights; their exponential average
    /// where training kept one), or OWNER/REPO/PATH on the Hub.
    pub checkpoint: Option<String>,
    /// Architecture: a preset name or a config file.
    pub model: Option<String>,
    /// Latent codec: a VAE directory or Hub repository, or `space-to-depth:F` (default: by
    /// the checkpoint's latent channels, the SDXL VAE for 4 and ostris/vae-kl-f8-d16 for 16).
    pub vae: Option<String>,
    /// OpenCLIP text tower: a directory or Hub repository.
    pub text_encoder: Option<String>,
    /// Image side in pixels.
    pub resolution: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    /// A prompt of the kind the model was trained on (the web page's placeholder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example_prompt: Option<String>,
}

impl Components {
    /// The published MicroDiT_XL_2 and its frozen parts, 30 Heun steps, guidance 5.
    pub fn published() -> Self {
        let sampling = Sampling::default();
        Self {
            checkpoint: Some(DEFAULT_CHECKPOINT.into()),
            model: Some("MicroDiT_XL_2".into()),
            vae: None,
            text_encoder: Some(known::CLIP_TEXT.into()),
            resolution: Some(512),
            steps: Some(sampling.steps),
            guidance: Some(sampling.guidance),
            example_prompt: Some("an owl with the moon behind it, pixel art".into()),
        }
    }

    /// Each unset field taken from `fallback`.
    pub fn or(self, fallback: Self) -> Self {
        Self {
            checkpoint: self.checkpoint.or(fallback.checkpoint),
            model: self.model.or(fallback.model),
            vae: self.vae.or(fallback.vae),
            text_encoder: self.text_encoder.or(fallback.text_encoder),
            resolution: self.resolution.or(fallback.resolution),
            steps: self.steps.or(fallback.steps),
            guidance: self.guidance.or(fallback.guidance),
            example_prompt: self.example_prompt.or(fallback.example_prompt),
        }
    }

    /// The `pipeline.json` in `path`'s folder or the nearest one above it, with its paths
    /// made relative to where the command runs.
    pub fn beside(path: &Path) -> Result<Option<Self>> {
        let Some(file) = path
            .ancestors()
            .map(|dir| dir.join(PIPELINE_FILE))
            .find(|f| f.is_file())
        else {
            return Ok(None);
        };
        let mut parts: Self = crate::io::read_json(&file, "a microdit pipeline.json")?;
        let base = file.parent().unwrap_or(Path::new("."));
        for name in [&mut parts.model, &mut parts.vae, &mut parts.text_encoder]
            .into_iter()
            .flatten()
        {
            if base.join(&*name).exists() {
                *name = base.join(&*name).display().to_string();
            }
        }
        Ok(Some(parts))
    }

    /// The parts to load, in `dtype`; every one but the codec must be named.
    pub fn parts(&self, dtype: Precision) -> Result<Parts> {
        let named = |v: &Option<String>, what: &str| {
            v.clone()
                .with_context(|| format!("no {what} given (and none in a {PIPELINE_FILE})"))
        };
        Ok(Parts {
            checkpoint: named(&self.checkpoint, "checkpoint")?,
            model: named(&self.model, "model")?,
            vae: self.vae.clone(),
            text_encoder: named(&self.text_encoder, "text encoder")?,
            resolution: self
                .resolution
                .with_context(|| format!("no resolution given (and none in a {PIPELINE_FILE})"))?,
            dtype,
        })
    }

    /// These components (what a command line names), over a `pipeline.json` beside the
    /// checkpoint where that is a local path, over the published model's parts.
    pub fn over_defaults(self) -> Result<Self> {
        let beside = match &self.checkpoint {
            Some(c) if Path::new(c).exists() => Self::beside(Path::new(c))?.unwrap_or_default(),
            _ => Self::default(),
        };
        Ok(self.or(beside).or(Self::published()))
    }

    /// The default sampling: the reference's, with this pipeline's steps and guidance.
    pub fn sampling(&self) -> Sampling {
        let reference = Sampling::default();
        Sampling {
            steps: self.steps.unwrap_or(reference.steps),
            guidance: self.guidance.unwrap_or(reference.guidance),
            ..reference
        }
    }

    /// Writes `pipeline.json` into `dir` (paths in it relative to `dir`).
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::io::write_json(&dir.join(PIPELINE_FILE), self)
    }
}

/// A weights file from a file, a training run folder (its newest checkpoint's weights, the
/// exponential average's where the run kept one, as EDM samples; in a folder of stages, the
/// newest stage's), or `owner/repo/path/in/repo` on the Hub.
pub fn resolve_checkpoint(hub: &Hub, source: &str) -> Result<PathBuf> {
    let path = Path::new(source);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        let run = run_dir::newest_stage(path)?;
        let checkpoint = run_dir::latest(&run)
            .with_context(|| format!("{} lost its checkpoints while being read", run.display()))?;
        let ema = checkpoint.join(run_dir::EMA_WEIGHTS);
        return Ok(match ema.is_file() {
            true => ema,
            false => checkpoint.join(run_dir::WEIGHTS),
        });
    }
    let parts: Vec<&str> = source.splitn(3, '/').collect();
    match parts.as_slice() {
        [owner, repo, file] => hub.file(&format!("{owner}/{repo}"), file),
        _ => bail!(
            "checkpoint {source} is neither a file, a training run folder, nor OWNER/REPO/PATH \
             on the Hugging Face Hub"
        ),
    }
}

/// What to load, every name resolved ([`Components`] layered down to one choice each).
#[derive(Debug, Clone, PartialEq)]
pub struct Parts {
    pub checkpoint: String,
    pub model: String,
    /// `None`: chosen by the checkpoint's latent channels.
    pub vae: Option<String>,
    pub text_encoder: String,
    pub resolution: usize,
    pub dtype: Precision,
}

/// Image pixels per latent pixel of both VAEs a checkpoint's channels choose between (the
/// SDXL VAE's and the 16-channel one's).
const KNOWN_VAE_DOWNSCALE: usize = 8;

impl Parts {
    /// How many times the codec shrinks an image's side, where that is known without
    /// loading anything (a known VAE or space-to-depth); `None` for a VAE of its own, whose
    /// config says.
    fn known_downscale(&self) -> Option<Result<usize>> {
        match self.vae.as_deref() {
            None => Some(Ok(KNOWN_VAE_DOWNSCALE)),
            Some(name) => SpaceToDepth::from_name(name).map(|codec| Ok(codec?.factor)),
        }
    }

    /// Refuses a resolution the model cannot take, where that is known without loading
    /// anything: before weights are looked for on disk or on the Hub.
    fn check_resolution(&self) -> Result<()> {
        match self.known_downscale() {
            Some(downscale) => self.model_choice(downscale?, None).resolve().map(|_| ()),
            None => Ok(()),
        }
    }

    /// The denoiser's architecture for this resolution, a codec of `downscale` and a
    /// checkpoint of `channels` latent channels.
    fn model_choice(&self, downscale: usize, channels: Option<usize>) -> ModelChoice {
        ModelChoice {
            source: self.model.clone(),
            resolution: Some(self.resolution),
            downscale,
            in_channels: channels,
        }
    }

    /// The denoiser of `dit` from `tensors`, in this precision (int8: quantised as it loads).
    fn denoiser<B: MicroditBackend>(
        &self,
        dit: &DitConfig,
        tensors: BTreeMap<String, TensorSnapshot>,
        device: &B::Device,
    ) -> Result<MicroDit<B>> {
        match self.dtype {
            Precision::Int8 => load_quantized(dit, tensors, device),
            float => load_state_dict(MicroDit::<B>::new(dit, &mut Init::empty(device)), tensors)
                .map(|model| model.in_precision(float)),
        }
        .with_context(|| format!("loading {} as {}", self.checkpoint, self.model))
    }
}

/// The checkpoint's denoiser tensors, and how many latent channels it denoises (4: SDXL
/// VAE, 16: ostris).
fn checkpoint_tensors(
    parts: &Parts,
    hub: &Hub,
) -> Result<(BTreeMap<String, TensorSnapshot>, Option<usize>)> {
    parts.check_resolution()?;
    let checkpoint = resolve_checkpoint(hub, &parts.checkpoint)?;
    let tensors = denoiser_part(read_state_dict(&checkpoint)?);
    let channels = tensors
        .get("x_embedder.proj.weight")
        .and_then(|w| w.shape.to_vec().get(1).copied());
    Ok((tensors, channels))
}

/// The denoiser `parts` name, in their precision, and its architecture, without the text
/// tower (and without the codec, where its downscale is known): what `microdit quantize`
/// writes out.
pub fn load_denoiser<B: MicroditBackend>(
    parts: &Parts,
    hub: &Hub,
    device: &B::Device,
) -> Result<(MicroDit<B>, DitConfig)> {
    let (tensors, channels) = checkpoint_tensors(parts, hub)?;
    let downscale = match parts.known_downscale() {
        Some(downscale) => downscale?,
        None => LatentCodec::<B>::load(parts.vae.as_deref().unwrap_or_default(), hub, device)?
            .downscale(),
    };
    let dit = parts.model_choice(downscale, channels).resolve()?;
    Ok((parts.denoiser(&dit, tensors, device)?, dit))
}

/// A pipeline being loaded: its checkpoint opened (tensors read only as they are applied),
/// its codec loaded and its architecture resolved, so that every name is checked before
/// the large parts load; then the text tower and the denoiser, in the order memory allows.
/// [`TextToImage::load`] holds both at once; `generate` encodes its prompts and lets the
/// tower go before the denoiser loads, so that a laptop holds one of them at a time.
pub struct Loader<'a, B: MicroditBackend> {
    parts: &'a Parts,
    hub: &'a Hub,
    tensors: BTreeMap<String, TensorSnapshot>,
    dit: DitConfig,
    choice: ModelChoice,
    codec: LatentCodec<B>,
    device: B::Device,
}

impl<'a, B: MicroditBackend> Loader<'a, B> {
    pub fn open(parts: &'a Parts, hub: &'a Hub, device: &B::Device) -> Result<Self> {
        let (tensors, channels) = checkpoint_tensors(parts, hub)?;
        let vae = parts.vae.clone().unwrap_or_else(|| {
            match channels {
                Some(16) => known::VAE_16_CHANNEL,
                _ => known::SDXL_VAE,
            }
            .into()
        });
        let codec = LatentCodec::<B>::load(&vae, hub, device)?;
        let choice = parts.model_choice(codec.downscale(), channels);
        let dit = choice.resolve()?;
        ensure!(
            codec.channels() == dit.in_channels,
            "the codec {vae} has {} latent channels, the checkpoint denoises {}",
            codec.channels(),
            dit.in_channels
        );
        if let Some(pos) = tensors.get("pos_embed") {
            let trained = pos.shape.to_vec().get(1).copied().unwrap_or(0);
            if trained != dit.num_tokens() {
                eprintln!(
                    "warning: {} was trained with {trained} patches per image; {} px gives {}: \
                     expect poor images",
                    parts.checkpoint,
                    parts.resolution,
                    dit.num_tokens()
                );
            }
        }
        Ok(Self {
            parts,
            hub,
            tensors,
            dit,
            choice,
            codec,
            device: device.clone(),
        })
    }

    /// The text tower, checked to give the embeddings the denoiser takes.
    pub fn text(&self) -> Result<TextEncoder<B>> {
        let text = TextEncoder::from_source(&self.parts.text_encoder, self.hub, &self.device)?;
        ensure!(
            text.config.width == self.dit.caption_channels,
            "the text tower's width {} differs from the denoiser's caption_channels {}",
            text.config.width,
            self.dit.caption_channels
        );
        Ok(text)
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// The denoiser's weights loaded: the rest of the pipeline.
    pub fn caption_to_image(self) -> Result<CaptionToImage<B>> {
        Ok(CaptionToImage {
            denoiser: self.parts.denoiser(&self.dit, self.tensors, &self.device)?,
            dit: self.dit,
            choice: self.choice,
            codec: self.codec,
            edm: EdmConfig::default(),
            device: self.device,
        })
    }
}

impl<B: MicroditBackend> TextToImage<B> {
    /// Every part at once (what `serve`, `eval` and the demo keep for many prompts).
    pub fn load(parts: &Parts, hub: &Hub, device: &B::Device) -> Result<Self> {
        let loader = Loader::open(parts, hub, device)?;
        let text = loader.text()?;
        Ok(Self {
            text,
            to_image: loader.caption_to_image()?,
        })
    }
}
