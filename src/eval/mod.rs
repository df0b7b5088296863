//! Evaluation: FID as pytorch-fid computes it and CLIP score as torchmetrics defines it,
//! over images a [`run::EvalRun`] generates from captions (COCO-30K: docs/EVALUATION.md).
//!
//! `inception` (the FID network) → `stats` (mean, covariance, Fréchet distance, with
//! `linalg` and `.npz` files) ← `fid` (statistics of folders); `clip` (OpenCLIP vision
//! tower beside our text tower); `captions` (what to generate); `run` (generate, score,
//! report).

pub mod captions;
pub mod clip;
pub mod fid;
pub mod inception;
pub mod linalg;
pub mod npz;
pub mod run;
pub mod stats;

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use run::{Manifest, Metrics};

/// A progress bar over `len` images.
pub fn progress(len: usize, label: &str) -> indicatif::ProgressBar {
    crate::progress::bar(len, label, "image")
}

/// The OpenCLIP model CLIP scores use unless told otherwise: OpenAI's ViT-L/14, the model
/// torchmetrics' `CLIPScore` defaults to, in open_clip's format.
pub const DEFAULT_CLIP: &str = "timm/vit_large_patch14_clip_224.openai";

/// What an evaluation measured and with what.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub fid: Option<f64>,
    pub clip_score: Option<f64>,
    pub images: usize,
    pub checkpoint: String,
    pub resolution: usize,
    pub steps: usize,
    pub guidance: f64,
    pub sampler: String,
    pub seed: u64,
    pub reference: Option<String>,
    pub clip_model: Option<String>,
    pub scoring_seconds: f64,
    pub software: String,
}

impl Report {
    pub fn new(manifest: &Manifest, metrics: &Metrics) -> Self {
        let s = &manifest.settings;
        Self {
            fid: None,
            clip_score: None,
            images: manifest.captions.len(),
            checkpoint: s.checkpoint.clone(),
            resolution: s.resolution,
            steps: s.sampling.steps,
            guidance: s.sampling.guidance,
            sampler: s.sampling.sampler.to_string(),
            seed: manifest.seed,
            reference: metrics.reference.as_ref().map(|p| p.display().to_string()),
            clip_model: metrics.clip.clone(),
            scoring_seconds: 0.0,
            software: format!("microdit {}", env!("CARGO_PKG_VERSION")),
        }
    }

    pub fn markdown(&self) -> String {
        let metric = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
        format!(
            "| metric | value |\n|---|---|\n| FID-{n} | {fid} |\n| CLIP score | {clip} |\n\n\
             {n} images of `{checkpoint}` at {res} px: {sampler} sampler, {steps} steps, \
             guidance {guidance}, seeds {seed}…{last}. FID against `{reference}` (pytorch-fid's \
             Inception); CLIP score with `{clip_model}` (torchmetrics' definition). \
             {software}.\n",
            n = self.images,
            fid = metric(self.fid),
            clip = metric(self.clip_score),
            checkpoint = self.checkpoint,
            res = self.resolution,
            sampler = self.sampler,
            steps = self.steps,
            guidance = self.guidance,
            seed = self.seed,
            last = self.seed + self.images.saturating_sub(1) as u64,
            reference = self.reference.as_deref().unwrap_or("(none)"),
            clip_model = self.clip_model.as_deref().unwrap_or("(none)"),
            software = self.software,
        )
    }

    /// `report.json` and `report.md` in `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        crate::io::write_json(&dir.join("report.json"), self)?;
        let md = self.markdown();
        crate::io::write_atomic(&dir.join("report.md"), |f| {
            std::io::Write::write_all(f, md.as_bytes())
        })
    }
}
