//! `microdit train`: one stage, or the whole sequence of stages, each resumable.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::DeviceChoice;
use crate::backend::Trainable;
use crate::train::config::TrainConfig;
use crate::train::stages;
use crate::train::trainer::{train_data_parallel, RunOptions, Summary};

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
    /// `cpu,cpu` runs two CPU replicas, each on its share of the threads: faster than one
    /// for small models, whose operations are too small to share).
    #[arg(long, default_value = "cpu", value_delimiter = ',')]
    pub device: Vec<DeviceChoice>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Under an MPI launch: seconds a rank waits for the others at an exchange before it
    /// stops the whole job (a rank died or hangs).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
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

/// How this process trains: alone (over its `--device` list, one thread per device), or
/// as one rank of an MPI launch (one device each).
enum Launch {
    Local,
    #[cfg(feature = "mpi")]
    Mpi(crate::train::distributed::MpiLaunch),
}

impl Launch {
    fn detect(args: &TrainArgs) -> Result<Self> {
        let processes = crate::train::distributed::launched_processes().unwrap_or(1);
        if processes < 2 {
            return Ok(Self::Local);
        }
        anyhow::ensure!(
            args.device.len() == 1,
            "under an MPI launch each process trains on one device: pass --device cpu, or \
             --device cuda (each process takes the GPU of its local rank)"
        );
        #[cfg(feature = "mpi")]
        {
            let launch = crate::train::distributed::MpiLaunch::from_environment()?
                .context("the MPI launcher's environment says several processes, MPI one")?;
            Ok(Self::Mpi(launch))
        }
        #[cfg(not(feature = "mpi"))]
        anyhow::bail!(
            "started as one of {processes} MPI processes, but this microdit was built without \
             MPI: rebuild with `cargo build --release --features mpi`"
        )
    }

    fn is_main(&self) -> bool {
        match self {
            Self::Local => true,
            #[cfg(feature = "mpi")]
            Self::Mpi(mpi) => mpi.rank == 0,
        }
    }

    /// One stage's training, on this launch's devices.
    fn train(
        &self,
        args: &TrainArgs,
        cfg: &TrainConfig,
        dir: &Path,
        opts: &RunOptions,
    ) -> Result<Summary> {
        match self {
            Self::Local => crate::with_backend_devices!(&args.device, |Bk, devices| {
                train_data_parallel::<Trainable<Bk>>(cfg, dir, opts, &devices)
            }),
            #[cfg(feature = "mpi")]
            Self::Mpi(mpi) => {
                let device = match args.device[0] {
                    DeviceChoice::Cuda(_) => DeviceChoice::Cuda(mpi.local_rank),
                    cpu => cpu,
                };
                let timeout = std::time::Duration::from_secs(args.timeout);
                let rank = match device {
                    #[cfg(feature = "cuda")]
                    DeviceChoice::Cuda(gpu) => mpi.nccl_rank(gpu, timeout)?,
                    _ => mpi.rank(timeout),
                };
                crate::with_backend!(device, |Bk, device| {
                    crate::train::trainer::train_as::<Trainable<Bk>>(cfg, dir, opts, &device, rank)
                })
            }
        }
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    super::same_kind(&args.device)?;
    let launch = Launch::detect(args)?;
    // Only rank 0 of an MPI launch reports.
    let say = |line: String| {
        if launch.is_main() {
            eprintln!("{line}");
        }
    };
    let gpus = args
        .device
        .iter()
        .filter(|d| matches!(d, DeviceChoice::Cuda(_)))
        .count();
    if cfg!(feature = "cuda") && gpus > 1 {
        say(format!(
            "note: {gpus} GPUs in one process sum their gradients through host memory; for \
             NCCL, launch one process per GPU: mpirun -np {gpus} microdit train … --device cuda \
             (built with --features cuda,mpi)"
        ));
    }
    let mut stages = Vec::new();
    for (k, path) in args.configs.iter().enumerate() {
        stages.push((stage_dir(args, k, path), TrainConfig::from_file(path)?));
    }
    stages::chain(&mut stages);
    for (k, ((dir, cfg), path)) in stages.iter().zip(&args.configs).enumerate() {
        if args.resume && stages::finished(dir, cfg) {
            say(format!(
                "stage {} ({}) already finished",
                k + 1,
                path.display()
            ));
            continue;
        }
        say(format!(
            "stage {} ({}): {} steps into {}",
            k + 1,
            path.display(),
            cfg.steps,
            dir.display()
        ));
        let opts = RunOptions {
            resume: args.resume,
            abort_after_step: args.abort_after_step,
            quiet: args.quiet,
            ..RunOptions::default()
        };
        let summary = launch
            .train(args, cfg, dir, &opts)
            .with_context(|| format!("stage {} ({})", k + 1, path.display()))?;
        if summary.interrupted {
            say(format!(
                "stopped at step {}; continue with --resume",
                summary.step
            ));
            return Ok(());
        }
        if !launch.is_main() {
            continue;
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
