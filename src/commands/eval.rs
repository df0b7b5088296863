//! `microdit eval`: generate from captions and report FID and CLIP score; `eval stats`,
//! `eval fid` and `eval coco` for reference statistics and the COCO-30K protocol.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

use super::{DeviceChoice, PipelineArgs};
use crate::backend::MicroditBackend;
use crate::eval::captions::{self, prepare_coco, CocoSubset};
use crate::eval::run::{fid_statistics, EvalRun, Manifest, Metrics, Shard};
use crate::eval::stats::frechet_distance;
use crate::eval::DEFAULT_CLIP;

#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum EvalCommand {
    /// FID statistics of a folder of images, as a pytorch-fid `.npz` (mu, sigma).
    Stats {
        /// The images (bmp, jpg, jpeg, pgm, png, ppm, tif, tiff, webp; any size).
        dir: PathBuf,
        /// Output statistics file.
        #[arg(long, short)]
        out: PathBuf,
        #[command(flatten)]
        scoring: ScoringArgs,
    },
    /// The FID between two image folders or statistics files (`.npz`).
    Fid {
        a: PathBuf,
        b: PathBuf,
        #[command(flatten)]
        scoring: ScoringArgs,
    },
    /// COCO-30K: pick image–caption pairs from COCO captions and prepare the real images
    /// (centre crop, bicubic resize); then `eval stats OUT/images -o OUT/stats.npz`.
    Coco(CocoSubset),
}

/// The feature extractor's weights and how to run it.
#[derive(Debug, Clone, clap::Args)]
pub struct ScoringArgs {
    /// pytorch-fid's Inception weights (pt_inception-2015-12-05-6726825d.pth): a file, a
    /// folder holding it, or a Hub repo [default: torch.hub's cache, where pytorch-fid
    /// keeps it].
    #[arg(long)]
    pub inception: Option<String>,
    /// Images per network batch.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Captions to generate from: JSON lines with a "caption" (see `eval coco`).
    #[arg(long = "prompts", value_name = "CAPTIONS.jsonl", required = true)]
    pub captions: Option<PathBuf>,
    /// Images to generate (image k uses caption k, cycling when there are fewer) [default:
    /// one per caption].
    #[arg(long)]
    pub num: Option<usize>,
    /// FID reference: pytorch-fid statistics (.npz) or a folder of real images; without
    /// it no FID is computed.
    #[arg(long, value_name = "STATS.npz|DIR")]
    pub reference_stats: Option<PathBuf>,
    /// OpenCLIP model for the CLIP score (folder or Hub repo with open_clip_config.json),
    /// or `none`.
    #[arg(long, default_value = DEFAULT_CLIP)]
    pub clip: String,
    /// The run folder: eval.json, images/, report.json and report.md. Rerunning the same
    /// command resumes it.
    #[arg(long, default_value = "eval")]
    pub out: PathBuf,
    /// Image k uses seed + k.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Images per sampling batch.
    #[arg(long, default_value_t = 8)]
    pub gen_batch: usize,
    /// Share the generation: this process makes images k with k mod WORKERS = WORKER and
    /// exits; a run without --worker scores once all are made.
    #[arg(long, requires = "workers")]
    pub worker: Option<usize>,
    /// How many workers share the generation.
    #[arg(long, requires = "worker")]
    pub workers: Option<usize>,
    /// pytorch-fid's Inception weights (see `eval stats --help`).
    #[arg(long)]
    pub inception: Option<String>,
    /// Images per Inception / CLIP batch.
    #[arg(long, default_value_t = 16)]
    pub score_batch: usize,
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    #[command(flatten)]
    pub sampling: crate::pipeline::SamplingArgs,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    match &args.command {
        Some(EvalCommand::Stats { dir, out, scoring }) => stats(dir, out, scoring),
        Some(EvalCommand::Fid { a, b, scoring }) => fid(a, b, scoring),
        Some(EvalCommand::Coco(subset)) => coco(subset),
        None => evaluate(&args.run),
    }
}

fn metrics(inception: &Option<String>, batch: usize) -> Metrics {
    Metrics {
        inception: inception.clone(),
        batch,
        ..Metrics::default()
    }
}

fn stats(dir: &Path, out: &Path, s: &ScoringArgs) -> Result<()> {
    ensure!(dir.is_dir(), "{} is not a folder of images", dir.display());
    crate::with_backend!(s.device, |Bk, device| {
        let stats = fid_statistics::<Bk>(&metrics(&s.inception, s.batch), &device)?.of_path(dir)?;
        stats.write(out)?;
        println!(
            "wrote FID statistics of {} images ({} features) to {}",
            stats.count,
            stats.dims(),
            out.display()
        );
        Ok(())
    })
}

fn fid(a: &Path, b: &Path, s: &ScoringArgs) -> Result<()> {
    for p in [a, b] {
        ensure!(p.exists(), "{} does not exist", p.display());
    }
    let needs_network = a.is_dir() || b.is_dir();
    let value = if needs_network {
        crate::with_backend!(s.device, |Bk, device| {
            let f = fid_statistics::<Bk>(&metrics(&s.inception, s.batch), &device)?;
            frechet_distance(&f.of_path(a)?, &f.of_path(b)?)
        })?
    } else {
        use crate::eval::stats::Statistics;
        frechet_distance(&Statistics::read(a)?, &Statistics::read(b)?)?
    };
    println!("FID: {value:.6}");
    Ok(())
}

fn coco(subset: &CocoSubset) -> Result<()> {
    let prepared = prepare_coco(subset)?;
    let (out, size) = (&subset.out, subset.size);
    let dir = out.join("images");
    println!(
        "wrote {prepared} captions to {} and their images, {size}² px, to {}; next: microdit eval stats {} -o {}",
        out.join("captions.jsonl").display(),
        dir.display(),
        dir.display(),
        out.join("stats.npz").display()
    );
    Ok(())
}

fn evaluate(args: &RunArgs) -> Result<()> {
    let path = args
        .captions
        .as_ref()
        .context("--prompts CAPTIONS.jsonl is required")?;
    let all = captions::read(path)?;
    let num = args.num.unwrap_or(all.len());
    ensure!(num > 0, "--num must be at least 1");
    if num > all.len() {
        eprintln!(
            "note: {num} images from {} captions: captions repeat",
            all.len()
        );
    }
    let shard = match (args.worker, args.workers) {
        (Some(index), Some(count)) => {
            ensure!(
                count > 0 && index < count,
                "--worker must be below --workers"
            );
            Some(Shard { index, count })
        }
        _ => None,
    };
    let manifest = Manifest {
        settings: args.pipeline.settings(&args.sampling)?,
        seed: args.seed,
        captions: (0..num).map(|k| all[k % all.len()].clone()).collect(),
    };
    let metrics = Metrics {
        reference: args.reference_stats.clone(),
        inception: args.inception.clone(),
        clip: (args.clip != "none").then(|| args.clip.clone()),
        batch: args.score_batch,
    };
    if shard.is_none() {
        check_metric_sources(&metrics)?;
    }
    let run = EvalRun::open(&args.out, manifest)?;
    crate::with_backend!(args.pipeline.device, |Bk, device| {
        run.generate::<Bk>(shard.unwrap_or(Shard::ALL), args.gen_batch, &device)?;
        if let Some(s) = shard {
            println!(
                "worker {}/{}: its images are in {}; when every worker is done, run the same \
                 command without --worker/--workers to score",
                s.index,
                s.count,
                run.dir.display()
            );
            return Ok(());
        }
        score::<Bk>(&run, &metrics, &device)
    })
}

/// Fails before hours of sampling when a metric's weights or reference are not there.
fn check_metric_sources(metrics: &Metrics) -> Result<()> {
    let hub = crate::hub::Hub::from_env();
    if let Some(reference) = &metrics.reference {
        ensure!(
            reference.exists(),
            "--reference-stats {} does not exist",
            reference.display()
        );
        crate::eval::inception::weights_path(metrics.inception.as_deref(), &hub)?;
    }
    if let Some(clip) = &metrics.clip {
        hub.file(clip, "open_clip_config.json").with_context(|| {
            format!("the CLIP score needs the OpenCLIP model {clip} (or pass --clip none)")
        })?;
    }
    Ok(())
}

fn score<B: MicroditBackend>(run: &EvalRun, metrics: &Metrics, device: &B::Device) -> Result<()> {
    let report = run.score::<B>(metrics, device)?;
    print!("{}", report.markdown());
    println!("report: {}", run.dir.join("report.json").display());
    Ok(())
}
