//! A training stage, as a TOML file (`configs/*.toml` mirror the reference's four stages).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::DitConfig;
use crate::model::Precision;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// A preset name (`MicroDiT_XL_2`, `MicroDiT_Tiny_2`) or a model config file.
    pub model: String,
    /// Image resolution: 256 or 512 (latents of side resolution / 8).
    #[serde(default = "default_resolution")]
    pub resolution: usize,
    /// Latent channels of the dataset (4 for the SDXL VAE).
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// MDS dataset directories, mixed (concatenated, then shuffled together).
    pub data: Vec<PathBuf>,
    /// Column holding the latents (`latents_256` / `latents_512`).
    #[serde(default)]
    pub latents_column: Option<String>,
    #[serde(default = "default_caption_column")]
    pub caption_column: String,
    /// What the forward and backward passes compute in: `f32`, or `bf16` with f32 master
    /// weights (the reference's `amp_bf16`; weights, optimiser state and the loss stay f32).
    #[serde(default)]
    pub precision: Precision,
    /// Probability that a caption is replaced by zeros (for classifier-free guidance).
    #[serde(default = "default_caption_dropout")]
    pub caption_dropout: f64,
    /// Fraction of patches hidden from the backbone.
    pub mask_ratio: f64,
    /// Log-normal noise-level distribution of the EDM loss (the 512 px stages use 0 / 0.6).
    #[serde(default = "default_p_mean")]
    pub p_mean: f64,
    #[serde(default = "default_p_std")]
    pub p_std: f64,
    pub steps: usize,
    /// Images per optimiser step, across all devices.
    pub global_batch: usize,
    /// Images per forward/backward pass; gradients are accumulated up to `global_batch`.
    pub micro_batch: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f32,
    #[serde(default = "default_betas")]
    pub betas: [f32; 2],
    #[serde(default = "default_eps")]
    pub eps: f32,
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    #[serde(default)]
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of `lr` (cosine decay ends there); 1 = constant.
    #[serde(default = "default_alpha_f")]
    pub alpha_f: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: usize,
    /// How many checkpoints to keep (oldest removed first).
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Train the expert-choice MoE parameters at `lr · expert_lr_scale` (the reference
    /// intended 0.5 but applied 1; unset = one rate for all).
    #[serde(default)]
    pub expert_lr_scale: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.99975).
    #[serde(default)]
    pub ema_decay: Option<f64>,
    /// Step from which the average starts (it starts as a copy of the weights then).
    #[serde(default)]
    pub ema_start: usize,
    /// Skip unreadable or wrongly shaped samples (counted in metrics.jsonl) instead of stopping.
    #[serde(default)]
    pub skip_bad_samples: bool,
    /// Every this many steps, sample a grid for the preview captions (0 = never).
    #[serde(default)]
    pub sample_every: usize,
    /// safetensors file with `caption_latents` [N, L, Cc] for the preview grid.
    #[serde(default)]
    pub sample_captions: Option<PathBuf>,
    /// VAE to decode previews with (directory or Hub repo); without one the grid shows latents.
    #[serde(default)]
    pub sample_vae: Option<String>,
    #[serde(default = "default_sample_steps")]
    pub sample_steps: usize,
    #[serde(default = "default_sample_guidance")]
    pub sample_guidance: f64,
    /// Start from these weights (a previous stage's run directory or a weights file).
    #[serde(default)]
    pub init_from: Option<PathBuf>,
    /// With `init_from` a run directory: also continue its optimiser state (AdamW moments),
    /// as the reference does when a stage loads the previous stage's checkpoint (its
    /// learning rate and schedule come from this stage's config).
    #[serde(default = "default_true")]
    pub carry_optimizer: bool,
}

fn default_true() -> bool {
    true
}

fn default_sample_steps() -> usize {
    30
}
fn default_sample_guidance() -> f64 {
    5.0
}
fn default_p_mean() -> f64 {
    -0.6
}
fn default_p_std() -> f64 {
    1.2
}
fn default_alpha_f() -> f64 {
    1.0
}
fn default_resolution() -> usize {
    256
}
fn default_channels() -> usize {
    4
}
fn default_caption_column() -> String {
    "caption_latents".into()
}
fn default_caption_dropout() -> f64 {
    0.1
}
fn default_lr() -> f64 {
    2.4e-4
}
fn default_weight_decay() -> f32 {
    0.1
}
fn default_betas() -> [f32; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f32 {
    1e-8
}
fn default_grad_clip() -> f64 {
    0.25
}
fn default_checkpoint_every() -> usize {
    1000
}
fn default_keep_last() -> usize {
    3
}
fn default_log_every() -> usize {
    10
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: Self =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        // Relative paths in a config are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for d in &mut cfg.data {
            if d.is_relative() {
                *d = base.join(&*d);
            }
        }
        for p in [cfg.init_from.as_mut(), cfg.sample_captions.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(!self.data.is_empty(), "no data directories given");
        ensure!(
            self.sample_every == 0 || self.sample_captions.is_some(),
            "sample_every is set but sample_captions (a file of caption embeddings) is not"
        );
        ensure!(
            self.precision != Precision::F16,
            "precision f16 needs loss scaling, which training does not do: use bf16 or f32"
        );
        ensure!(
            self.micro_batch > 0 && self.global_batch.is_multiple_of(self.micro_batch),
            "global_batch {} must be a multiple of micro_batch {}",
            self.global_batch,
            self.micro_batch
        );
        ensure!(
            (0.0..1.0).contains(&self.mask_ratio),
            "mask_ratio must be in [0, 1)"
        );
        ensure!(
            (0.0..=1.0).contains(&self.caption_dropout),
            "caption_dropout must be in [0, 1]"
        );
        ensure!(
            self.checkpoint_every > 0 && self.keep_last > 0,
            "checkpoint_every and keep_last must be positive"
        );
        ensure!(
            self.resolution.is_multiple_of(8),
            "resolution must be a multiple of 8"
        );
        Ok(())
    }

    pub fn dit_config(&self) -> Result<DitConfig> {
        let path = Path::new(&self.model);
        let mut cfg = if path.exists() {
            DitConfig::from_file(path)?
        } else {
            DitConfig::preset(&self.model)?
        };
        cfg.in_channels = self.in_channels;
        if !path.exists() {
            cfg.input_size = self.resolution / 8;
            cfg.pos_interp_scale = (self.resolution as f64 / 256.0).max(1.0);
        }
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn edm(&self) -> crate::edm::EdmConfig {
        crate::edm::EdmConfig {
            p_mean: self.p_mean,
            p_std: self.p_std,
            ..Default::default()
        }
    }

    pub fn latents_column(&self) -> String {
        self.latents_column
            .clone()
            .unwrap_or_else(|| format!("latents_{}", self.resolution))
    }

    /// Composer's `CosineAnnealingWithWarmupScheduler`: linear warm-up to `lr`, then cosine
    /// decay to `alpha_f · lr` at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        let span = (self.steps - self.warmup_steps).max(1) as f64;
        let tau = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.lr
            * (self.alpha_f
                + (1.0 - self.alpha_f) * 0.5 * (1.0 + (std::f64::consts::PI * tau).cos()))
    }
}
