//! An evaluation run: generate one image per caption into a folder (resumable, shareable
//! between workers), then score the folder (FID against reference statistics, CLIP score
//! against the captions) and write a report.
//!
//! Layout of the run folder:
//!   eval.json            what is being generated (settings, captions, seeds): a resumed or
//!                        parallel run must match it
//!   images/NNNNNN.png    image k: caption k, seed + k, its settings in PNG text chunks
//!   generated.npz        FID statistics of images/ (pytorch-fid's format)
//!   report.json, report.md

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::captions::{load_rgb, Caption};
use super::clip::{clip_score, ClipScorer};
use super::fid::FidStatistics;
use super::inception::FidInception;
use super::stats::frechet_distance;
use super::{progress, Report};
use crate::backend::MicroditBackend;
use crate::hub::Hub;
use crate::pipeline::{GenerationSettings, TextToImage};

/// Worker `index` of `count` makes images k with k mod count = index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    fn owns(&self, k: usize) -> bool {
        k % self.count == self.index
    }
}

/// What a run generates; stored as `eval.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Shared settings (prompt and seed empty: image k has caption k and seed + k).
    pub settings: GenerationSettings,
    pub seed: u64,
    pub captions: Vec<Caption>,
}

/// Where the metrics come from.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// FID against these statistics (`.npz`) or images (a folder); none: no FID.
    pub reference: Option<PathBuf>,
    /// pytorch-fid's Inception weights (file, folder or Hub repo; default torch.hub's cache).
    pub inception: Option<String>,
    /// OpenCLIP model for the CLIP score (folder or Hub repo); none: no CLIP score.
    pub clip: Option<String>,
    /// Images per Inception / CLIP batch.
    pub batch: usize,
}

pub struct EvalRun {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl EvalRun {
    /// Opens `dir` for `manifest`: a new run writes `eval.json`; an existing one must have
    /// been started with the same settings, captions and seed (images are never mixed).
    pub fn open(dir: &Path, manifest: Manifest) -> Result<Self> {
        let path = dir.join("eval.json");
        if path.exists() {
            let text = std::fs::read_to_string(&path)?;
            let existing: Manifest = serde_json::from_str(&text)
                .with_context(|| format!("{} is not an eval manifest", path.display()))?;
            let differs = differences(&existing, &manifest);
            ensure!(
                differs.is_empty(),
                "{} was started with other settings ({}); resume with the same ones or pass \
                 another --out",
                dir.display(),
                differs.join(", ")
            );
        } else {
            crate::io::write_json(&path, &manifest)?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
        })
    }

    pub fn image_path(&self, k: usize) -> PathBuf {
        self.dir.join("images").join(format!("{k:06}.png"))
    }

    /// Images of `shard` not yet written.
    pub fn pending(&self, shard: Shard) -> Vec<usize> {
        (0..self.manifest.captions.len())
            .filter(|&k| shard.owns(k) && !self.image_path(k).exists())
            .collect()
    }

    /// Makes the shard's missing images, `batch` at a time; each PNG is written atomically,
    /// so an interrupted run loses at most the batch in flight.
    pub fn generate<B: MicroditBackend>(
        &self,
        shard: Shard,
        batch: usize,
        device: &B::Device,
    ) -> Result<()> {
        let pending = self.pending(shard);
        if pending.is_empty() {
            return Ok(());
        }
        let m = &self.manifest;
        let pipeline = TextToImage::<B>::load(&m.settings.parts(), &Hub::from_env(), device)?;
        let settings = GenerationSettings {
            vae: pipeline.to_image.codec.name(),
            ..m.settings.clone()
        };
        let done = m.captions.len() - self.pending(Shard::ALL).len();
        eprintln!(
            "generating {} images ({} of {} already in {})",
            pending.len(),
            done,
            m.captions.len(),
            self.dir.display()
        );
        let bar = progress(pending.len(), "images");
        for chunk in pending.chunks(batch.max(1)) {
            let prompts: Vec<&str> = chunk
                .iter()
                .map(|&k| m.captions[k].caption.as_str())
                .collect();
            let seeds: Vec<u64> = chunk.iter().map(|&k| m.seed + k as u64).collect();
            let images = pipeline.generate(&prompts, &seeds, &settings.sampling, |_| {})?;
            for ((&k, image), seed) in chunk.iter().zip(images).zip(seeds) {
                let settings = GenerationSettings {
                    prompt: m.captions[k].caption.clone(),
                    seed,
                    ..settings.clone()
                };
                let (rgb, side) = (&image.rgb, image.side);
                crate::png_io::write_png(
                    &self.image_path(k),
                    rgb,
                    side,
                    side,
                    &settings.to_png_text()?,
                )?;
            }
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// FID and CLIP score of the finished folder; writes `generated.npz` and the reports.
    pub fn score<B: MicroditBackend>(
        &self,
        metrics: &Metrics,
        device: &B::Device,
    ) -> Result<Report> {
        let missing = self.pending(Shard::ALL);
        if !missing.is_empty() {
            bail!(
                "{} of {} images are still missing (first: {}); run without --worker to make them",
                missing.len(),
                self.manifest.captions.len(),
                self.image_path(missing[0]).display()
            );
        }
        let started = Instant::now();
        let files: Vec<PathBuf> = (0..self.manifest.captions.len())
            .map(|k| self.image_path(k))
            .collect();
        let mut report = Report::new(&self.manifest, metrics);
        if let Some(reference) = &metrics.reference {
            let fid = fid_statistics::<B>(metrics, device)?;
            let generated = fid.of_files(&files)?;
            generated.write(&self.dir.join("generated.npz"))?;
            let reference_stats = fid.of_path(reference)?;
            report.fid = Some(frechet_distance(&generated, &reference_stats)?);
        }
        if let Some(clip) = &metrics.clip {
            let scorer = ClipScorer::<B>::from_source(clip, &Hub::from_env(), device)?;
            report.clip_score = Some(self.clip_score(&scorer, &files, metrics.batch)?);
        }
        report.scoring_seconds = started.elapsed().as_secs_f64();
        report.write(&self.dir)?;
        Ok(report)
    }

    fn clip_score<B: MicroditBackend>(
        &self,
        scorer: &ClipScorer<B>,
        files: &[PathBuf],
        batch: usize,
    ) -> Result<f64> {
        let bar = progress(files.len(), "CLIP score");
        let mut scores = Vec::with_capacity(files.len());
        for (n, chunk) in files.chunks(batch.max(1)).enumerate() {
            let images = chunk
                .iter()
                .map(|p| load_rgb(p))
                .collect::<Result<Vec<_>>>()?;
            let first = n * batch.max(1);
            let captions: Vec<&str> = (first..first + chunk.len())
                .map(|k| self.manifest.captions[k].caption.as_str())
                .collect();
            scores.extend(scorer.pair_scores(&images, &captions)?);
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(clip_score(&scores))
    }
}

/// The Inception, loaded from where `metrics` says.
pub fn fid_statistics<B: MicroditBackend>(
    metrics: &Metrics,
    device: &B::Device,
) -> Result<FidStatistics<B>> {
    let weights = super::inception::weights_path(metrics.inception.as_deref(), &Hub::from_env())?;
    Ok(FidStatistics {
        inception: FidInception::load(&weights, device)?,
        batch: metrics.batch,
    })
}

/// Which parts of two manifests differ, by name.
fn differences(a: &Manifest, b: &Manifest) -> Vec<String> {
    let (mut sa, mut sb) = (a.settings.clone(), b.settings.clone());
    // The software version may change between a run and its resumption.
    sa.software.clear();
    sb.software.clear();
    let mut out = Vec::new();
    let (ja, jb) = (
        serde_json::to_value(&sa).unwrap_or_default(),
        serde_json::to_value(&sb).unwrap_or_default(),
    );
    if let (Some(ma), Some(mb)) = (ja.as_object(), jb.as_object()) {
        out.extend(ma.keys().filter(|k| ma.get(*k) != mb.get(*k)).cloned());
    }
    if a.seed != b.seed {
        out.push("seed".into());
    }
    if a.captions != b.captions {
        out.push("captions".into());
    }
    out
}
