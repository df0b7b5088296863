//! The `microdit` command line: thin; each subcommand lives in `commands/`.

use clap::{Parser, Subcommand};
use microdit::commands::{bench, info, ModelArgs};

/// MicroDiT: train and sample the Sparse Elucidated Latent Diffusion Transformer.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print an architecture's parameter count, part by part (no weights are allocated).
    Info(ModelArgs),
    /// Time one training step and one guided sampler step.
    Bench(bench::BenchArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Info(args) => info::run(args),
        Command::Bench(args) => bench::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
