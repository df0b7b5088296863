//! `microdit train`: one stage, or the whole sequence of stages, each resumable.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::DeviceChoice;
use crate::backend::Trainable;
use crate::train::checkpoint;
use crate::train::config::TrainConfig;
use crate::train::trainer::{train_data_parallel, RunOptions};

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Stage configs (TOML), run in order; each later stage starts from the previous
    /// stage's final weights unless it names `init_from` itself.
    #[arg(required = true)]
    pub configs: Vec<PathBuf>,
    /// Run directory (checkpoints, metrics.jsonl); with several stages, one subdirectory each.
    #[arg(long)]
    pub run: PathBuf,
    /// Continue where the run stopped: finished stages are skipped, the interrupted one
    /// resumes from its newest complete checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Device, or a comma-separated list for data-parallel training (`cuda:0,cuda:1,…`;
    /// `cpu,cpu` runs two CPU replicas, which only tests the code path).
    #[arg(long, default_value = "cpu", value_delimiter = ',')]
    pub device: Vec<DeviceChoice>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Testing aid: abort the process right after this step, as a crash would.
    #[arg(long, hide = true)]
    pub abort_after_step: Option<usize>,
}

fn stage_dir(args: &TrainArgs, k: usize, config: &Path) -> PathBuf {
    if args.configs.len() == 1 {
        return args.run.clone();
    }
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    args.run.join(format!("stage-{}-{stem}", k + 1))
}

pub fn run(args: &TrainArgs) -> Result<()> {
    super::same_kind(&args.device)?;
    let mut previous: Option<PathBuf> = None;
    for (k, path) in args.configs.iter().enumerate() {
        let mut cfg = TrainConfig::from_file(path)?;
        let dir = stage_dir(args, k, path);
        if cfg.init_from.is_none() {
            cfg.init_from = previous.clone();
        }
        previous = Some(dir.clone());
        let finished = crate::run_dir::latest(&dir)
            .and_then(|c| std::fs::read(c.join(crate::run_dir::STATE)).ok())
            .and_then(|b| serde_json::from_slice::<checkpoint::TrainState>(&b).ok())
            .is_some_and(|s| s.step >= cfg.steps);
        if finished && args.resume {
            eprintln!("stage {} ({}) already finished", k + 1, path.display());
            continue;
        }
        eprintln!(
            "stage {} ({}): {} steps into {}",
            k + 1,
            path.display(),
            cfg.steps,
            dir.display()
        );
        let opts = RunOptions {
            resume: args.resume,
            abort_after_step: args.abort_after_step,
            quiet: args.quiet,
        };
        let summary = crate::with_backend_devices!(&args.device, |Bk, devices| {
            train_data_parallel::<Trainable<Bk>>(&cfg, &dir, &opts, &devices)
        })
        .with_context(|| format!("stage {} ({})", k + 1, path.display()))?;
        if summary.interrupted {
            eprintln!("stopped at step {}; continue with --resume", summary.step);
            return Ok(());
        }
        println!(
            "stage {} finished at step {}: final loss {:.4}",
            k + 1,
            summary.step,
            summary.losses.last().copied().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
