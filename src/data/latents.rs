//! The training samples: precomputed VAE latents (already scaled) and caption embeddings,
//! float16 in MDS `bytes` columns, from one or more dataset directories.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::mds::{f16_values, MdsDataset};

pub struct LatentsDataset {
    streams: Vec<MdsDataset>,
    starts: Vec<usize>,
    latents_column: String,
    caption_column: String,
}

/// One sample as f32: caption embedding [L·Cc] and latents [C·H·W], row-major.
pub struct LatentsSample {
    pub caption: Vec<f32>,
    pub latents: Vec<f32>,
}

impl LatentsDataset {
    pub fn open(dirs: &[PathBuf], latents_column: &str, caption_column: &str) -> Result<Self> {
        let streams = dirs
            .iter()
            .map(|d| MdsDataset::open(d))
            .collect::<Result<Vec<_>>>()?;
        let mut starts = vec![0];
        for (s, d) in streams.iter().zip(dirs) {
            for col in [latents_column, caption_column] {
                ensure!(
                    s.column_names().iter().any(|c| c == col),
                    "{}: no column {col:?} (has {:?})",
                    d.display(),
                    s.column_names()
                );
            }
            starts.push(starts.last().unwrap() + s.len());
        }
        ensure!(*starts.last().unwrap() > 0, "the datasets hold no samples");
        Ok(Self {
            streams,
            starts,
            latents_column: latents_column.into(),
            caption_column: caption_column.into(),
        })
    }

    pub fn len(&self) -> usize {
        *self.starts.last().unwrap()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Caption tokens per sample (the first readable sample's caption size over `channels`).
    pub fn caption_tokens(&self, channels: usize) -> Result<usize> {
        // The first sample that reads (a damaged shard may come first when skipping).
        let first = self
            .streams
            .iter()
            .flat_map(|s| (0..s.len()).map(move |i| s.get(i)))
            .find(|r| r.is_ok())
            .unwrap_or_else(|| {
                self.streams
                    .iter()
                    .find(|s| !s.is_empty())
                    .expect("non-empty")
                    .get(0)
            })?;
        let bytes = first[&self.caption_column]
            .as_bytes()
            .context("caption column is not bytes")?;
        let values = bytes.len() / 2;
        ensure!(
            values > 0 && values.is_multiple_of(channels),
            "a caption of {values} values is not L x {channels}"
        );
        Ok(values / channels)
    }

    /// Sample `i` of the concatenated streams, checked against the expected sizes.
    pub fn get(&self, i: usize, caption_len: usize, latent_len: usize) -> Result<LatentsSample> {
        let s = self.starts.partition_point(|&x| x <= i) - 1;
        let sample = self.streams[s].get(i - self.starts[s])?;
        let read = |col: &str, expected: usize| -> Result<Vec<f32>> {
            let bytes = sample[col]
                .as_bytes()
                .with_context(|| format!("column {col} is not bytes"))?;
            let v = f16_values(bytes)?;
            ensure!(
                v.len() == expected,
                "sample {i}: {col} holds {} values, the model expects {expected}",
                v.len()
            );
            Ok(v)
        };
        Ok(LatentsSample {
            caption: read(&self.caption_column, caption_len)?,
            latents: read(&self.latents_column, latent_len)?,
        })
    }

    /// The order of epoch `epoch`: a permutation fixed by (seed, epoch), so any position
    /// can be recomputed on resume.
    pub fn epoch_order(&self, seed: u64, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.len()).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
        order
    }
}
