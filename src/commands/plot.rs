//! `microdit plot`: a training run's loss curve as a PNG (`train::plot`).

use std::path::PathBuf;

use anyhow::Result;

#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// The run directory.
    pub run: PathBuf,
    /// Output file (default: RUN/loss.png).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &PlotArgs) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.run.join("loss.png"));
    crate::train::plot::plot(&args.run, &out)
}
