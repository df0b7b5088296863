//! The model worker: one thread that owns the pipeline, takes the queue's next batch (jobs
//! with the same sampling settings, together), samples them as one batch and files each
//! job's images, with their settings in the PNG as `generate` writes them.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::jobs::{JobId, JobSpec, Store};
use crate::backend::MicroditBackend;
use crate::model::{DitConfig, MicroDit};
use crate::pipeline::{sample_batch, GenerationSettings, Image, TextToImage};

/// What every image's settings share: the model's parts (as `generate` records them).
#[derive(Debug, Clone)]
pub struct ModelRecord {
    pub checkpoint: String,
    pub model: String,
    pub vae: String,
    pub text_encoder: String,
    pub dtype: crate::model::Precision,
}

pub struct Worker<B: MicroditBackend> {
    pub pipeline: TextToImage<B>,
    pub record: ModelRecord,
    pub store: Arc<Store>,
    /// Images per batch at most.
    pub max_batch: usize,
    /// The denoiser at each resolution asked for so far (positions differ).
    sizes: HashMap<usize, (DitConfig, MicroDit<B>)>,
}

impl<B: MicroditBackend> Worker<B> {
    pub fn new(
        pipeline: TextToImage<B>,
        record: ModelRecord,
        store: Arc<Store>,
        max_batch: usize,
    ) -> Self {
        Self {
            pipeline,
            record,
            store,
            max_batch,
            sizes: HashMap::new(),
        }
    }

    /// Serves batches until the store closes. A batch that fails, or panics, fails its
    /// jobs with the reason; the worker goes on with the next.
    pub fn run(mut self) {
        while let Some(batch) = self.store.next_batch(self.max_batch) {
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_batch(&batch)));
            let error = match outcome {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => format!("{e:#}"),
                Err(panic) => panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the model worker panicked".into()),
            };
            for (id, _) in &batch {
                self.store.fail(id, error.clone());
            }
        }
    }

    /// Prepares the denoiser for images of `resolution` pixels.
    fn size(&mut self, resolution: usize) -> Result<()> {
        if !self.sizes.contains_key(&resolution) {
            let sized = self.pipeline.to_image.denoiser_at(resolution)?;
            self.sizes.insert(resolution, sized);
        }
        Ok(())
    }

    fn run_batch(&mut self, batch: &[(JobId, JobSpec)]) -> Result<()> {
        let spec = batch[0].1.clone();
        // Row r of the batch: image k of one job, seeded seed + k as `generate` seeds it.
        let rows: Vec<(&JobSpec, u64)> = batch
            .iter()
            .flat_map(|(_, s)| (0..s.num_images).map(move |k| (s, s.seed + k as u64)))
            .collect();
        let prompts: Vec<&str> = rows.iter().map(|(s, _)| s.prompt.as_str()).collect();
        let seeds: Vec<u64> = rows.iter().map(|(_, seed)| *seed).collect();
        let device = self.pipeline.to_image.device.clone();
        let y = self.pipeline.text.encode(&prompts, &device).states;
        let store = self.store.clone();
        self.size(spec.resolution)?;
        let (dit, denoiser) = &self.sizes[&spec.resolution];
        let shape = [dit.in_channels, dit.input_size, dit.input_size];
        let mut live = true;
        let latents = sample_batch(
            denoiser,
            &self.pipeline.to_image.edm,
            y,
            &seeds,
            shape,
            &spec.sampling,
            |i| {
                // Every job reports; the batch stops when all of them were cancelled.
                live = batch.iter().fold(false, |any, (id, _)| {
                    store.progress(id, i + 1, spec.sampling.steps) | any
                });
                live
            },
        );
        if !live {
            return Ok(());
        }
        let mut images =
            Image::batch_from_tensor(self.pipeline.to_image.codec.decode(latents))?.into_iter();
        for (id, job) in batch {
            let mut pngs = Vec::new();
            for k in 0..job.num_images {
                let image = images.next().context("a decoded image per row")?;
                let settings = self.settings(job, job.seed + k as u64);
                pngs.push(crate::png_io::encode_png(
                    &image.rgb,
                    image.side,
                    image.side,
                    &settings.to_png_text()?,
                )?);
            }
            self.store.complete(id, pngs);
        }
        Ok(())
    }

    /// The image's settings, as `generate` would record them.
    fn settings(&self, job: &JobSpec, seed: u64) -> GenerationSettings {
        let r = &self.record;
        GenerationSettings {
            prompt: job.prompt.clone(),
            seed,
            sampling: job.sampling.clone(),
            resolution: job.resolution,
            checkpoint: r.checkpoint.clone(),
            model: r.model.clone(),
            vae: r.vae.clone(),
            text_encoder: r.text_encoder.clone(),
            dtype: r.dtype,
            software: format!("microdit {} serve", env!("CARGO_PKG_VERSION")),
        }
    }
}
