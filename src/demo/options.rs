//! What a demo run is asked to do: the variant (which stages train how), the budget, the
//! data's and images' sizes, the seed and how the scored samples are drawn.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::model::{DitConfig, Precision, Routing};
use crate::pipeline::Sampling;

/// How the training budget is spent (the paper's central comparison, in miniature).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Variant {
    /// 75% of patches masked, with the patch-mixer, then an unmasked finetune (MicroDiT).
    Masked,
    /// No masking at all.
    Unmasked,
    /// 75% masked without the patch-mixer, then an unmasked finetune.
    MaskedNoMixer,
    /// No masking; half the backbone's tokens routed past its middle blocks (TREAD).
    Routed,
    /// MicroDiT's masked stage and unmasked finetune, both with TREAD's routing.
    MaskedRouted,
}

impl Variant {
    /// Its stages, in order.
    pub(super) fn stages(self) -> Vec<StageKind> {
        let routing =
            matches!(self, Variant::Routed | Variant::MaskedRouted).then(Routing::default);
        let stage = |name: &str, mask_ratio, share| StageKind {
            name: format!("{name}{}", if routing.is_some() { "-routed" } else { "" }),
            mask_ratio,
            routing,
            share,
        };
        match self {
            Variant::Unmasked | Variant::Routed => vec![stage("unmasked", 0.0, 1.0)],
            Variant::Masked | Variant::MaskedNoMixer | Variant::MaskedRouted => vec![
                stage("masked", MASK_RATIO, 1.0 - FINETUNE_SHARE),
                stage("finetune", 0.0, FINETUNE_SHARE),
            ],
        }
    }
}

/// One stage of a variant: its folder's name, what it masks and routes, and its share of
/// the training time.
#[derive(Debug, Clone)]
pub(super) struct StageKind {
    pub name: String,
    pub mask_ratio: f64,
    pub routing: Option<Routing>,
    pub share: f64,
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// Wall-clock budget for the whole run, data and evaluation included.
    pub minutes: f64,
    pub variant: Variant,
    /// Side of the generated images in pixels ([`DEFAULT_IMAGE_SIZE`] unless told).
    pub image_size: usize,
    pub train_images: usize,
    /// Prompts sampled per group (seen and held-out combinations).
    pub eval_prompts: usize,
    pub seed: u64,
    pub quiet: bool,
    /// How the scored samples are drawn ([`DemoOptions::default_sampling`] unless told).
    pub sampling: Sampling,
    /// The denoiser's precision when it draws them (training is always f32).
    pub dtype: Precision,
    /// The denoiser's architecture, the demo's own (`run::default_model`) unless told.
    pub model: Option<DitConfig>,
}

impl DemoOptions {
    /// The demo's sampler: 18 Heun steps at guidance 5.
    pub fn default_sampling() -> Sampling {
        Sampling::heun(SAMPLER_STEPS, GUIDANCE)
    }

    /// Prompts per group for a budget of `minutes`: [`EVAL_PROMPTS`] from ten minutes up,
    /// fewer in shorter runs so that scoring stays about a twentieth of the budget.
    pub fn default_eval_prompts(minutes: f64) -> usize {
        ((minutes * EVAL_PROMPTS as f64 / 10.0).round() as usize)
            .clamp(MIN_EVAL_PROMPTS, EVAL_PROMPTS)
    }
}

/// Images of 16 px: at 32 px the model did not learn shapes in ten minutes (nor in 30), at
/// 16 px it began to (docs/DEMO.md, "Shapes: the image's size, …").
pub const DEFAULT_IMAGE_SIZE: usize = 16;
/// MicroDiT's share of patches masked in the first stage.
const MASK_RATIO: f64 = 0.75;
/// Share of the training time given to the unmasked finetune after a masked stage: 60%
/// drew shapes better than 40% on each of three seeds, and 40% better than 20%, in
/// measured comparisons (docs/DEMO.md).
const FINETUNE_SHARE: f64 = 0.6;
/// The scored samples: 18 Heun steps at guidance 5 (MicroDiT's own default), which drew
/// shapes better than 3 on the same weights (docs/DEMO.md).
pub(super) const SAMPLER_STEPS: usize = 18;
pub(super) const GUIDANCE: f64 = 5.0;
/// Prompts per group scored at the end of a run of ten minutes or more: with 192 a
/// group's accuracy is within about ±4 points (a count's, about a quarter of the prompts,
/// ±7); with 48 the same weights scored up to 13 points apart on another draw of prompts
/// (docs/DEMO.md). Shorter runs score fewer, at least [`MIN_EVAL_PROMPTS`].
const EVAL_PROMPTS: usize = 192;
const MIN_EVAL_PROMPTS: usize = 48;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_runs_score_fewer_prompts() {
        let prompts = DemoOptions::default_eval_prompts;
        assert_eq!(prompts(10.0), EVAL_PROMPTS);
        assert_eq!(prompts(30.0), EVAL_PROMPTS);
        assert_eq!(prompts(3.0), 58);
        assert_eq!(prompts(1.0), MIN_EVAL_PROMPTS);
    }
}
