//! A training recipe as a sequence of stages (the reference's four: 256 px masked, 256 px
//! unmasked, 512 px masked, 512 px unmasked), one run folder each: the one place that
//! chains them, for `microdit train A.toml B.toml …` and the demo alike.

use std::path::{Path, PathBuf};

use super::checkpoint::TrainState;
use super::config::TrainConfig;
use crate::run_dir;

/// Each stage after the first starts from the previous stage's run (its newest weights,
/// and its optimiser state with `carry_optimizer`) unless its config names `init_from`.
pub fn chain(stages: &mut [(PathBuf, TrainConfig)]) {
    for k in 1..stages.len() {
        let previous = stages[k - 1].0.clone();
        stages[k].1.init_from.get_or_insert(previous);
    }
}

/// The state of the run in `dir`'s newest checkpoint, if it has one.
fn newest_state(dir: &Path) -> Option<TrainState> {
    run_dir::latest(dir)
        .and_then(|c| std::fs::read(c.join(run_dir::STATE)).ok())
        .and_then(|b| serde_json::from_slice::<TrainState>(&b).ok())
}

/// The steps the run in `dir` has checkpointed (0 without a checkpoint).
pub fn steps_done(dir: &Path) -> usize {
    newest_state(dir).map_or(0, |s| s.step)
}

/// Whether the run in `dir` has a checkpoint at `cfg.steps` (or beyond), or at the steps
/// it was re-planned to against a deadline.
pub fn finished(dir: &Path, cfg: &TrainConfig) -> bool {
    newest_state(dir).is_some_and(|s| s.step >= s.planned_steps.unwrap_or(cfg.steps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_starts_from_the_previous_one_unless_it_says_otherwise() {
        let own = PathBuf::from("elsewhere");
        let mut stages = vec![
            (PathBuf::from("s1"), TrainConfig::default()),
            (PathBuf::from("s2"), TrainConfig::default()),
            (
                PathBuf::from("s3"),
                TrainConfig {
                    init_from: Some(own.clone()),
                    ..TrainConfig::default()
                },
            ),
            (PathBuf::from("s4"), TrainConfig::default()),
        ];
        chain(&mut stages);
        let from: Vec<Option<PathBuf>> = stages.iter().map(|(_, c)| c.init_from.clone()).collect();
        assert_eq!(
            from,
            vec![None, Some("s1".into()), Some(own), Some("s3".into())]
        );
    }
}
