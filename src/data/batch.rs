//! Training batches from the latents dataset: sample indices → caption embeddings (with
//! caption dropout drawn from the run's generator) and latents, on a device.

use anyhow::{Context, Result};
use burn::prelude::*;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::latents::LatentsDataset;
use crate::backend::MicroditBackend;

/// Turns sample indices into a batch: caption embeddings (with caption dropout) and latents.
pub struct BatchReader {
    /// Caption tokens and their width.
    pub caption_len: usize,
    pub caption_channels: usize,
    /// [C, H, W] of one sample's latents.
    pub latent_shape: [usize; 3],
    /// Probability that a caption is replaced by zeros (for classifier-free guidance).
    pub dropout: f64,
    /// Stand the next readable sample in for an unreadable one instead of failing.
    pub skip_bad: bool,
}

impl BatchReader {
    /// Draws what reading `n` samples would (their caption-dropout coins) without reading.
    pub fn skip(&self, n: usize, rng: &mut ChaCha8Rng) {
        for _ in 0..n {
            let _ = rng.random::<f64>();
        }
    }

    /// (caption embeddings [N, L, Cc], latents [N, C, H, W]) of `indices`, each caption
    /// dropped with its own coin from `rng`; skipped samples are counted in `skipped`.
    pub fn read<B: MicroditBackend>(
        &self,
        data: &LatentsDataset,
        indices: &[usize],
        skipped: &mut u64,
        rng: &mut ChaCha8Rng,
        device: &B::Device,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 4>)> {
        let [c, h, w] = self.latent_shape;
        let read = |i: usize| data.get(i, self.caption_len * self.caption_channels, c * h * w);
        let (mut captions, mut latents) = (Vec::new(), Vec::new());
        for &i in indices {
            let sample = match read(i) {
                Ok(sample) => sample,
                // Skipping: the next readable sample stands in, so the batch keeps its size
                // and the choice is the same on every run.
                Err(e) if self.skip_bad => {
                    eprintln!("skipping sample {i}: {e:#}");
                    *skipped += 1;
                    (1..data.len())
                        .find_map(|k| read((i + k) % data.len()).ok())
                        .context("no readable sample left in the dataset")?
                }
                Err(e) => {
                    return Err(e.context(
                        "a bad sample (set skip_bad_samples = true to skip such samples)",
                    ))
                }
            };
            let dropped = rng.random::<f64>() < self.dropout;
            captions.extend(
                sample
                    .caption
                    .into_iter()
                    .map(|v| if dropped { 0.0 } else { v }),
            );
            latents.extend(sample.latents);
        }
        let n = indices.len();
        Ok((
            Tensor::from_data(
                TensorData::new(captions, [n, self.caption_len, self.caption_channels]),
                device,
            ),
            Tensor::from_data(TensorData::new(latents, [n, c, h, w]), device),
        ))
    }
}
