//! `microdit plot`: a training run's loss curve as a PNG (`train::plot`), or several demos'
//! held-out adherence in one plot (`demo::curve::plot_runs`: an ablation's arms and seeds).

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};

use crate::demo::curve::{plot_runs, Curve, CURVE};

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// The run directory; with --adherence, demo folders (one line each).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Plot the demo folders' held-out adherence against steps, one colour per arm (folder
    /// names that differ only in a trailing -SEED), instead of a run's loss.
    #[arg(long)]
    pub adherence: bool,
    /// Output file (default: RUN/loss.png; adherence.png with --adherence).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &PlotArgs) -> Result<()> {
    if args.adherence {
        return adherence(args);
    }
    let [run] = args.runs.as_slice() else {
        anyhow::bail!("a loss plot is of one run; --adherence plots several demo folders");
    };
    let out = args.out.clone().unwrap_or_else(|| run.join("loss.png"));
    crate::train::plot::plot(run, &out)
}

fn adherence(args: &PlotArgs) -> Result<()> {
    let mut runs = Vec::new();
    for dir in &args.runs {
        let file = dir.join(CURVE);
        ensure!(
            file.is_file(),
            "{} has no {CURVE}: not a demo folder, or one not yet scored",
            dir.display()
        );
        let name = dir
            .file_name()
            .with_context(|| format!("{} names no folder", dir.display()))?;
        runs.push((name.to_string_lossy().into_owned(), Curve::load(&file)?));
    }
    let out = args.out.clone().unwrap_or_else(|| "adherence.png".into());
    let legend = plot_runs(&runs, &out)?;
    let described: Vec<String> = legend.iter().map(|(a, c)| format!("{c} {a}")).collect();
    println!("wrote {}: {}", out.display(), described.join(", "));
    Ok(())
}
