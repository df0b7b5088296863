//! FID statistics of image folders and statistics files, as pytorch-fid's
//! `compute_statistics_of_path` makes them.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::RgbImage;
use rayon::prelude::*;

use super::captions::{image_files, load_rgb};
use super::inception::FidInception;
use super::progress;
use super::stats::{Statistics, StatisticsAccumulator};
use crate::backend::MicroditBackend;

pub struct FidStatistics<B: MicroditBackend> {
    pub inception: FidInception<B>,
    /// Images per Inception batch.
    pub batch: usize,
}

impl<B: MicroditBackend> FidStatistics<B> {
    /// A `.npz` read as it is, or a folder's images through the Inception.
    pub fn of_path(&self, path: &Path) -> Result<Statistics> {
        if path.is_dir() {
            self.of_files(&image_files(path)?)
        } else {
            Statistics::read(path)
        }
    }

    pub fn of_files(&self, files: &[PathBuf]) -> Result<Statistics> {
        let bar = progress(files.len(), "Inception features");
        let mut acc = StatisticsAccumulator::new(super::inception::FEATURES);
        for chunk in files.chunks(self.batch.max(1)) {
            let images: Vec<RgbImage> = chunk
                .par_iter()
                .map(|p| load_rgb(p))
                .collect::<Result<_>>()?;
            acc.add(&self.inception.features(&images)?)?;
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        acc.finish()
            .with_context(|| format!("{} images are too few for FID statistics", files.len()))
    }
}
