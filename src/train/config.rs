//! A training stage, as a TOML file (`configs/*.toml` mirror the reference's four stages).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::optim::AdamWSettings;
use crate::edm::EdmConfig;
use crate::model::config::ModelChoice;
use crate::model::routing::{Routing, Sparsity};
use crate::model::DitConfig;
use crate::model::Precision;
use crate::pipeline::Sampling;

/// Absent fields take the recipe's values ([`TrainConfig::default`]); `model`, `data`,
/// `steps` and `global_batch` must be given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// A preset name (`MicroDiT_XL_2`, `MicroDiT_Tiny_2`) or a model config file (relative
    /// to this config's folder).
    pub model: String,
    /// Image resolution (SDXL-VAE latents of side resolution / 8): presets default to 256,
    /// a model config file to its own size ([`ModelChoice`]).
    pub resolution: Option<usize>,
    /// Latent channels of the dataset (default: the architecture's, 4 for the presets).
    pub in_channels: Option<usize>,
    /// MDS dataset directories, mixed (concatenated, then shuffled together).
    pub data: Vec<PathBuf>,
    /// Column holding the latents (`latents_256` / `latents_512`).
    pub latents_column: Option<String>,
    pub caption_column: String,
    /// What the forward and backward passes compute in: `f32`, or `bf16` with f32 master
    /// weights (the reference's `amp_bf16`; weights, optimiser state and the loss stay f32).
    pub precision: Precision,
    /// Probability that a caption is replaced by zeros (for classifier-free guidance).
    pub caption_dropout: f64,
    /// Fraction of patches hidden from the backbone.
    pub mask_ratio: f64,
    /// Route a share of the backbone's tokens past a span of its blocks (TREAD): a
    /// `[routing]` table of `share`, `first_block`, `last_block` (0-based, inclusive);
    /// absent keys take TREAD's recipe (0.5, the second block to the second-to-last).
    pub routing: Option<Routing>,
    /// Log-normal noise-level distribution of the EDM loss (the 512 px stages use 0 / 0.6).
    pub p_mean: f64,
    pub p_std: f64,
    pub steps: usize,
    /// Images per optimiser step, across all devices.
    pub global_batch: usize,
    /// Images per forward/backward pass; gradients are accumulated up to `global_batch`
    /// (default: all of it at once).
    pub micro_batch: usize,
    pub lr: f64,
    pub weight_decay: f32,
    pub betas: [f32; 2],
    pub eps: f32,
    pub grad_clip: f64,
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of `lr` (cosine decay ends there); 1 = constant.
    pub alpha_f: f64,
    pub seed: u64,
    pub checkpoint_every: usize,
    /// How many checkpoints to keep (oldest removed first).
    pub keep_last: usize,
    pub log_every: usize,
    /// Train the expert-choice MoE parameters at `lr · expert_lr_scale` (the reference
    /// intended 0.5 but applied 1; unset = one rate for all).
    pub expert_lr_scale: Option<f64>,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.99975).
    pub ema_decay: Option<f64>,
    /// Step from which the average starts (it starts as a copy of the weights then).
    pub ema_start: usize,
    /// Skip unreadable or wrongly shaped samples (counted in metrics.jsonl) instead of stopping.
    pub skip_bad_samples: bool,
    /// Every this many steps, sample a grid for the preview captions (0 = never).
    pub sample_every: usize,
    /// safetensors file with `caption_latents` [N, L, Cc] for the preview grid.
    pub sample_captions: Option<PathBuf>,
    /// VAE to decode previews with (directory or Hub repo); without one the grid shows latents.
    pub sample_vae: Option<String>,
    pub sample_steps: usize,
    pub sample_guidance: f64,
    /// Start from these weights (a previous stage's run directory or a weights file).
    pub init_from: Option<PathBuf>,
    /// With `init_from` a run directory: also continue its optimiser state (AdamW moments),
    /// as the reference does when a stage loads the previous stage's checkpoint (its
    /// learning rate and schedule come from this stage's config).
    pub carry_optimizer: bool,
}

impl Default for TrainConfig {
    /// The reference recipe's values (`configs/res_256_pretrain.yaml`) where it has them.
    fn default() -> Self {
        let edm = EdmConfig::default();
        let adamw = AdamWSettings::default();
        let sampling = Sampling::default();
        Self {
            model: String::new(),
            resolution: None,
            in_channels: None,
            data: Vec::new(),
            latents_column: None,
            caption_column: "caption_latents".into(),
            precision: Precision::F32,
            caption_dropout: 0.1,
            mask_ratio: 0.0,
            routing: None,
            p_mean: edm.p_mean,
            p_std: edm.p_std,
            steps: 0,
            global_batch: 0,
            micro_batch: 0,
            lr: 2.4e-4,
            weight_decay: adamw.weight_decay,
            betas: [adamw.beta1, adamw.beta2],
            eps: adamw.eps,
            grad_clip: 0.25,
            warmup_steps: 0,
            alpha_f: 1.0,
            seed: 0,
            checkpoint_every: 1000,
            keep_last: 3,
            log_every: 10,
            expert_lr_scale: None,
            ema_decay: None,
            ema_start: 0,
            skip_bad_samples: false,
            sample_every: 0,
            sample_captions: None,
            sample_vae: None,
            sample_steps: sampling.steps,
            sample_guidance: sampling.guidance,
            init_from: None,
            carry_optimizer: true,
        }
    }
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut cfg: Self =
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        if cfg.micro_batch == 0 {
            cfg.micro_batch = cfg.global_batch;
        }
        // Every path in a config is relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        let model = base.join(&cfg.model);
        if Path::new(&cfg.model).is_relative() && model.is_file() {
            cfg.model = model.display().to_string();
        }
        let paths = cfg
            .data
            .iter_mut()
            .chain(cfg.init_from.as_mut())
            .chain(cfg.sample_captions.as_mut());
        for p in paths {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let vae = cfg.sample_vae.as_ref().map(|v| base.join(v));
        if let Some(vae) = vae.filter(|v| v.is_dir()) {
            cfg.sample_vae = Some(vae.display().to_string());
        }
        cfg.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(cfg)
    }

    /// This stage's masking and routing for a backbone of `depth` blocks.
    pub fn sparsity(&self, depth: usize) -> Result<Sparsity> {
        let route = self.routing.map(|r| r.span(depth)).transpose();
        Ok(Sparsity {
            mask_ratio: self.mask_ratio,
            route: route.context("in [routing]")?,
        })
    }

    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.model.is_empty(),
            "no model given (a preset name or a model config file)"
        );
        ensure!(!self.data.is_empty(), "no data directories given");
        ensure!(
            self.steps > 0 && self.global_batch > 0,
            "steps and global_batch must be given and positive"
        );
        ensure!(
            self.sample_every == 0 || self.sample_captions.is_some(),
            "sample_every is set but sample_captions (a file of caption embeddings) is not"
        );
        ensure!(
            self.precision != Precision::Int8,
            "precision int8 is for generation (`generate --dtype int8`), not training"
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
        if self.routing.is_some() {
            self.sparsity(self.dit_config()?.depth)?;
        }
        ensure!(
            (0.0..=1.0).contains(&self.caption_dropout),
            "caption_dropout must be in [0, 1]"
        );
        ensure!(
            self.checkpoint_every > 0 && self.keep_last > 0,
            "checkpoint_every and keep_last must be positive"
        );
        self.validate_optimiser()
    }

    /// The optimiser's numbers: a negative learning rate would train by gradient ascent, a
    /// NaN one would be noticed only when the loss turns NaN.
    fn validate_optimiser(&self) -> Result<()> {
        let finite = |name: &str, value: f64, ok: bool, range: &str| {
            ensure!(
                value.is_finite() && ok,
                "{name} = {value}: must be a finite number {range}"
            );
            Ok(())
        };
        finite("lr", self.lr, self.lr >= 0.0, "≥ 0")?;
        finite("alpha_f", self.alpha_f, self.alpha_f >= 0.0, "≥ 0")?;
        finite("grad_clip", self.grad_clip, self.grad_clip > 0.0, "> 0")?;
        let wd = self.weight_decay as f64;
        finite("weight_decay", wd, wd >= 0.0, "≥ 0")?;
        let eps = self.eps as f64;
        finite("eps", eps, eps > 0.0, "> 0")?;
        for (k, beta) in self.betas.iter().enumerate() {
            let b = *beta as f64;
            finite(
                &format!("betas[{k}]"),
                b,
                (0.0..1.0).contains(&b),
                "in [0, 1)",
            )?;
        }
        if let Some(scale) = self.expert_lr_scale {
            finite("expert_lr_scale", scale, scale >= 0.0, "≥ 0")?;
        }
        if let Some(decay) = self.ema_decay {
            finite("ema_decay", decay, (0.0..1.0).contains(&decay), "in [0, 1)")?;
        }
        Ok(())
    }

    /// The architecture at this stage's resolution and latent channels.
    pub fn dit_config(&self) -> Result<DitConfig> {
        ModelChoice {
            resolution: self.resolution,
            in_channels: self.in_channels,
            ..ModelChoice::new(&self.model)
        }
        .resolve()
    }

    /// The optimiser's settings.
    pub fn adamw(&self) -> AdamWSettings {
        AdamWSettings {
            beta1: self.betas[0],
            beta2: self.betas[1],
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }

    pub fn edm(&self) -> EdmConfig {
        EdmConfig {
            p_mean: self.p_mean,
            p_std: self.p_std,
            ..Default::default()
        }
    }

    /// `latents_column`, by default `latents_<resolution>`.
    pub fn latents_column(&self) -> Result<String> {
        if let Some(column) = &self.latents_column {
            return Ok(column.clone());
        }
        let resolution = match self.resolution {
            Some(r) => r,
            None => self.dit_config()?.input_size * 8,
        };
        Ok(format!("latents_{resolution}"))
    }

    /// Composer's `CosineAnnealingWithWarmupScheduler`: linear warm-up to `lr`, then cosine
    /// decay to `alpha_f · lr` at the last step.
    pub fn lr_at(&self, step: usize) -> f64 {
        self.lr_at_over(step, self.steps)
    }

    /// The learning rate at `step` of a run planned for `steps` (a run re-planned against a
    /// deadline stretches or shortens its cosine decay; the warm-up stays).
    pub fn lr_at_over(&self, step: usize, steps: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * step as f64 / self.warmup_steps as f64;
        }
        let span = (steps.saturating_sub(self.warmup_steps)).max(1) as f64;
        let tau = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.lr
            * (self.alpha_f
                + (1.0 - self.alpha_f) * 0.5 * (1.0 + (std::f64::consts::PI * tau).cos()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> TrainConfig {
        TrainConfig {
            model: "MicroDiT_Tiny_2".into(),
            data: vec![PathBuf::from("data")],
            steps: 10,
            global_batch: 4,
            micro_batch: 4,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn optimiser_numbers_must_be_finite_and_in_range() {
        valid().validate().unwrap();
        let refused = |change: fn(&mut TrainConfig), says: &str| {
            let mut cfg = valid();
            change(&mut cfg);
            let error = cfg.validate().unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        };
        refused(|c| c.lr = -1e-3, "lr = -0.001: must be a finite number ≥ 0");
        refused(|c| c.lr = f64::NAN, "lr = NaN");
        refused(|c| c.lr = f64::INFINITY, "lr = inf");
        refused(|c| c.weight_decay = -0.1, "weight_decay");
        refused(|c| c.betas = [0.9, 1.0], "betas[1]");
        refused(|c| c.eps = 0.0, "eps");
        refused(|c| c.grad_clip = f64::NAN, "grad_clip");
        refused(|c| c.alpha_f = -1.0, "alpha_f");
        refused(|c| c.expert_lr_scale = Some(f64::NAN), "expert_lr_scale");
        refused(|c| c.ema_decay = Some(1.5), "ema_decay");
    }

    #[test]
    fn precisions_training_cannot_take_are_refused() {
        for (precision, says) in [
            (Precision::F16, "loss scaling"),
            (Precision::Int8, "generation"),
        ] {
            let cfg = TrainConfig {
                precision,
                ..valid()
            };
            let error = cfg.validate().unwrap_err().to_string();
            assert!(error.contains(says), "{error}");
        }
    }
}
