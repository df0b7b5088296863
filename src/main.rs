//! The `microdit` command line: thin; each subcommand lives in `commands/`.

use clap::{Parser, Subcommand};
use microdit::commands::{
    bench, bench_frozen, demo, eval, generate, info, plot, precompute, quantize, serve, train,
    ModelArgs,
};

/// MicroDiT: train and sample the Sparse Elucidated Latent Diffusion Transformer.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from prompts with a MicroDiT checkpoint (PNG files with their settings).
    Generate(Box<generate::GenerateArgs>),
    /// Write a checkpoint's denoiser with its transformer blocks' weights in int8, for
    /// `--dtype int8` generation in a quarter of the memory.
    Quantize(quantize::QuantizeArgs),
    /// Serve a model to a web page and a JSON API on this machine (loaded once).
    Serve(Box<serve::ServeArgs>),
    /// Measure a model: FID and CLIP score of images generated from captions (COCO-30K), and
    /// FID statistics of image folders.
    Eval(Box<eval::EvalArgs>),
    /// Turn image–caption pairs into MDS shards of VAE latents and caption embeddings.
    Precompute(Box<precompute::PrecomputeArgs>),
    /// Train a MicroDiT on MDS latent shards: one stage config, or several in sequence.
    Train(train::TrainArgs),
    /// Plot a training run's loss curve (from its metrics.jsonl), or several demos' held-out
    /// adherence (--adherence), as a PNG.
    Plot(plot::PlotArgs),
    /// Watch a small text-to-image model learn captioned shapes on a CPU (no downloads).
    Demo(demo::DemoArgs),
    /// Print an architecture's parameter count, part by part (no weights are allocated).
    Info(ModelArgs),
    /// Time the networks on random weights: `bench` (the denoiser's training and sampler
    /// steps), `bench text`, `bench vae`, `bench encode`, `bench eval`.
    Bench(bench::BenchCommand),
    /// The earlier names of `bench text|vae|eval|encode`.
    #[command(hide = true)]
    BenchText(bench_frozen::TextBenchArgs),
    #[command(hide = true)]
    BenchVae(bench_frozen::VaeBenchArgs),
    #[command(hide = true)]
    BenchEval(bench_frozen::EvalBenchArgs),
    #[command(hide = true)]
    BenchEncode(bench_frozen::EncodeBenchArgs),
}

fn main() {
    microdit::memory::keep_freed();
    let cli = Cli::parse();
    let result = match &cli.command {
        // Both wait on threads of their own that use rayon's pool, so they stay off it.
        command @ (Command::Serve(_) | Command::Precompute(_)) => run(command),
        command => microdit::backend::on_pool(|| run(command)),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: &Command) -> anyhow::Result<()> {
    match command {
        Command::Generate(args) => generate::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Info(args) => info::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Precompute(args) => precompute::run(args),
        Command::Train(args) => train::run(args),
        Command::Plot(args) => plot::run(args),
        Command::Bench(args) => bench::run_command(args),
        Command::BenchText(args) => bench_frozen::run_text(args),
        Command::BenchVae(args) => bench_frozen::run_vae(args),
        Command::BenchEncode(args) => bench_frozen::run_encode(args),
        Command::BenchEval(args) => bench_frozen::run_eval(args),
    }
}
