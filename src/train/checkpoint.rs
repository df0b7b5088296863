//! Training checkpoints that lose nothing: weights, optimiser state, schedule position, RNG
//! state and data position, written to a temporary directory that is renamed into place,
//! so a checkpoint directory either exists whole or not at all.

use std::path::{Path, PathBuf};

use crate::backend::AutodiffBackend;
use anyhow::{Context, Result};
use burn::module::AutodiffModule;
use burn::optim::Optimizer;
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::optim::{AdamWSettings, Ema, GroupedAdamW};
use crate::model::weights::{check_weights_fit, load_weights, save_weights};
use crate::model::MicroDit;
use crate::run_dir;

/// Everything besides the tensors that a run needs to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps taken.
    pub step: usize,
    /// Samples consumed (the data position: epoch and offset follow from it).
    pub samples_seen: u64,
    /// Unreadable samples skipped so far (with `skip_bad_samples`).
    #[serde(default)]
    pub skipped_samples: u64,
    /// The steps a run with a deadline was last re-planned to (`None`: the config's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_steps: Option<usize>,
    /// The training RNG (noise levels, noise, masks, caption dropout): seed and position.
    pub rng_seed: [u8; 32],
    /// ChaCha word position, as a decimal string (JSON numbers cannot hold a u128).
    pub rng_word_pos: String,
}

impl TrainState {
    pub fn new(seed: u64) -> (Self, ChaCha8Rng) {
        let rng = ChaCha8Rng::seed_from_u64(seed);
        (
            Self {
                step: 0,
                samples_seen: 0,
                skipped_samples: 0,
                planned_steps: None,
                rng_seed: rng.get_seed(),
                rng_word_pos: "0".into(),
            },
            rng,
        )
    }

    pub fn capture(&mut self, rng: &ChaCha8Rng) {
        self.rng_seed = rng.get_seed();
        self.rng_word_pos = rng.get_word_pos().to_string();
    }

    pub fn rng(&self) -> Result<ChaCha8Rng> {
        let mut rng = ChaCha8Rng::from_seed(self.rng_seed);
        rng.set_word_pos(
            self.rng_word_pos
                .parse()
                .context("bad rng_word_pos in state.json")?,
        );
        Ok(rng)
    }
}

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

/// Writes `step-NNNNNNNN/` under the run's `checkpoints/` and keeps the newest `keep`.
pub fn save<B: AutodiffBackend>(
    run: &Path,
    model: &MicroDit<B>,
    optim: &GroupedAdamW<B>,
    ema: Option<&Ema<B::InnerBackend>>,
    state: &TrainState,
    keep: usize,
) -> Result<PathBuf> {
    let target = run_dir::checkpoint(run, state.step);
    let name = target
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .to_string();
    let tmp = run_dir::checkpoints(run).join(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let write = || -> Result<()> {
        recorder().record(model.clone().into_record(), tmp.join("model"))?;
        recorder().record(optim.main.to_record(), tmp.join("optimizer"))?;
        if let Some(group) = &optim.experts {
            recorder().record(group.optim.to_record(), tmp.join("optimizer-experts"))?;
        }
        save_weights(&model.valid(), &tmp.join(run_dir::WEIGHTS))?;
        if let Some(ema) = ema {
            save_weights(&ema.model, &tmp.join(run_dir::EMA_WEIGHTS))?;
        }
        crate::io::write_json(&tmp.join(run_dir::STATE), state)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "writing checkpoint {name} (the previous checkpoints are intact)"
        )));
    }
    let _ = std::fs::remove_dir_all(&target);
    std::fs::rename(&tmp, &target)
        .with_context(|| format!("moving {} into place", target.display()))?;
    prune(run, keep);
    Ok(target)
}

fn prune(run: &Path, keep: usize) {
    let all = run_dir::complete_checkpoints(run);
    for old in &all[..all.len().saturating_sub(keep)] {
        let _ = std::fs::remove_dir_all(old);
    }
}

/// A run as a checkpoint left it.
pub struct Restored<B: AutodiffBackend> {
    pub model: MicroDit<B>,
    pub optim: GroupedAdamW<B>,
    pub ema: Option<Ema<B::InnerBackend>>,
    pub state: TrainState,
}

/// The optimiser state (AdamW moments and step counts, per parameter id) of a checkpoint.
/// Parameters are numbered in module order, so the state fits any model of the same
/// architecture, such as the next stage's at another resolution.
pub fn load_optimizer<B: AutodiffBackend>(
    checkpoint: &Path,
    mut optim: GroupedAdamW<B>,
    device: &B::Device,
) -> Result<GroupedAdamW<B>> {
    let ctx = || format!("reading the optimiser state of {}", checkpoint.display());
    optim.main = optim.main.load_record(
        recorder()
            .load(checkpoint.join("optimizer"), device)
            .with_context(ctx)?,
    );
    if let Some(group) = optim.experts.as_mut() {
        let record = recorder()
            .load(checkpoint.join("optimizer-experts"), device)
            .with_context(ctx)?;
        group.optim = std::mem::replace(&mut group.optim, AdamWSettings::default().init())
            .load_record(record);
    }
    Ok(optim)
}

/// Restores model, optimiser(s), EMA (when the checkpoint has one) and state.
pub fn load<B: AutodiffBackend>(
    checkpoint: &Path,
    model: MicroDit<B>,
    optim: GroupedAdamW<B>,
    ema_decay: Option<f64>,
    device: &B::Device,
) -> Result<Restored<B>> {
    let ctx = || format!("reading checkpoint {}", checkpoint.display());
    check_weights_fit(&model, &checkpoint.join(run_dir::WEIGHTS)).with_context(ctx)?;
    let model = model.load_record(
        recorder()
            .load(checkpoint.join("model"), device)
            .with_context(ctx)?,
    );
    let optim = load_optimizer(checkpoint, optim, device)?;
    let ema_path = checkpoint.join(run_dir::EMA_WEIGHTS);
    let ema = match ema_decay.filter(|_| ema_path.exists()) {
        // Built from the model so that its parameters share the model's ids.
        Some(decay) => Some(Ema {
            decay,
            model: load_weights(model.valid(), &ema_path).with_context(ctx)?,
        }),
        None => None,
    };
    let state: TrainState =
        serde_json::from_slice(&std::fs::read(checkpoint.join(run_dir::STATE)).with_context(ctx)?)
            .with_context(ctx)?;
    Ok(Restored {
        model,
        optim,
        ema,
        state,
    })
}
