//! The layout of a training run's folder, in one place for the trainer that writes it and
//! the pipeline, the commands and the demo that read it:
//!
//! ```text
//! RUN/config.toml                      the stage's config as it ran
//! RUN/metrics.jsonl                    one line per logged step
//! RUN/samples/step-NNNNNNNN.png        preview grids
//! RUN/checkpoints/step-NNNNNNNN/       one complete checkpoint (written as
//!     weights.safetensors              .step-NNNNNNNN.tmp/, then renamed)
//!     ema.safetensors, state.json, model, optimizer[-experts]
//! ```
//!
//! A folder of stages (`microdit train A.toml B.toml --run DIR`, or the demo's) holds one
//! run per sub-folder; [`newest_stage`] picks the one trained last.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

pub const CONFIG: &str = "config.toml";
pub const METRICS: &str = "metrics.jsonl";
pub const SAMPLES: &str = "samples";
const CHECKPOINTS: &str = "checkpoints";
/// In a checkpoint: the denoiser's weights (reference key names), and its EMA's.
pub const WEIGHTS: &str = "weights.safetensors";
pub const EMA_WEIGHTS: &str = "ema.safetensors";
/// In a checkpoint: the training state; a checkpoint is complete once it exists.
pub const STATE: &str = "state.json";

pub fn checkpoints(run: &Path) -> PathBuf {
    run.join(CHECKPOINTS)
}

/// The checkpoint folder of `step` (`step-NNNNNNNN`, so that names sort by step).
pub fn checkpoint(run: &Path, step: usize) -> PathBuf {
    checkpoints(run).join(format!("step-{step:08}"))
}

/// The run's complete checkpoints, oldest first (temporary, half-written ones are ignored).
pub fn complete_checkpoints(run: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(checkpoints(run))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("step-"))
                && p.join(STATE).exists()
        })
        .collect();
    found.sort();
    found
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run: &Path) -> Option<PathBuf> {
    complete_checkpoints(run).pop()
}

/// The run in `dir`: `dir` itself when it holds checkpoints, else its sub-folder (a stage)
/// whose newest checkpoint was written last.
pub fn newest_stage(dir: &Path) -> Result<PathBuf> {
    if latest(dir).is_some() {
        return Ok(dir.to_path_buf());
    }
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|stage| {
            let newest = latest(&stage)?;
            let written = std::fs::metadata(&newest).and_then(|m| m.modified()).ok()?;
            Some((written, stage))
        })
        .max()
        .map(|(_, stage)| stage)
        .with_context(|| {
            format!(
                "{} is a folder without training checkpoints (in it or in its stages)",
                dir.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(run: &Path, step: usize) {
        let dir = checkpoint(run, step);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(STATE), "{}").unwrap();
    }

    #[test]
    fn newest_complete_checkpoint_of_a_run_or_of_its_newest_stage() {
        let root = tempfile::tempdir().unwrap();
        let run = root.path().join("stage-1");
        complete(&run, 2);
        complete(&run, 10);
        std::fs::create_dir_all(checkpoint(&run, 20)).unwrap(); // no state: half-written
        assert_eq!(latest(&run), Some(checkpoint(&run, 10)));
        assert_eq!(newest_stage(&run).unwrap(), run);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let later = root.path().join("stage-2");
        complete(&later, 1);
        assert_eq!(newest_stage(root.path()).unwrap(), later);
        let empty = root.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let error = newest_stage(&empty).unwrap_err().to_string();
        assert!(
            error.contains("a folder without training checkpoints"),
            "{error}"
        );
    }
}
