//! How close each sampler gets to the exact trajectory for a given number of network
//! evaluations: the MicroDiT denoiser with random (reference-initialised, then perturbed)
//! weights and a random caption, sampled from the same seeds by Heun, Euler, DPM-Solver++(2M)
//! and its SDE form, each compared with a many-step Heun reference (relative L2 of the final
//! latents). The numbers in docs/SAMPLERS.md come from
//!
//! `cargo run --release --example sampler_study -- [PRESET|CONFIG] [RESOLUTION] [GUIDANCE]`
//!
//! (defaults MicroDiT_Tiny_2, 256, 5). A trained model's curves differ in level, not in
//! kind: the ODE is the same, only the denoiser is sharper.

use std::time::Instant;

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::Distribution;
use microdit::backend::{Cpu, CpuDevice};
use microdit::edm::{EdmConfig, Sampler};
use microdit::model::config::ModelChoice;
use microdit::model::{Init, MicroDit};
use microdit::pipeline::{sample_latents, Sampling};

/// Adds N(0, 0.05²) to every weight: the reference init zeroes the output layers, which
/// would make the denoiser a constant scaling.
struct Perturb;

impl ModuleMapper<Cpu> for Perturb {
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<Cpu, D>>) -> Param<Tensor<Cpu, D>> {
        p.map(|t| {
            let noise = Tensor::random(t.shape(), Distribution::Normal(0.0, 0.05), &t.device());
            t + noise
        })
    }
}

const SEEDS: [u64; 2] = [0, 1];
const REFERENCE_STEPS: usize = 200;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or_else(|| "MicroDiT_Tiny_2".into());
    let resolution: usize = args.next().map_or(Ok(256), |r| r.parse())?;
    let guidance: f64 = args.next().map_or(Ok(5.0), |g| g.parse())?;
    let device = CpuDevice::default();
    let cfg = ModelChoice {
        resolution: Some(resolution),
        ..ModelChoice::new(model.clone())
    }
    .resolve()?;
    <Cpu as burn::tensor::backend::Backend>::seed(&device, 7);
    let denoiser = MicroDit::<Cpu>::new(&cfg, &mut Init::reference(7, &device)).map(&mut Perturb);
    let y = Tensor::<Cpu, 3>::random(
        [1, 77, cfg.caption_channels],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let shape = [1, cfg.in_channels, cfg.input_size, cfg.input_size];
    let edm = EdmConfig::default();
    let run = |sampling: &Sampling, seed: u64| {
        sample_latents(&denoiser, &edm, y.clone(), shape, seed, sampling, |_| {})
    };
    let reference: Vec<Tensor<Cpu, 4>> = SEEDS
        .iter()
        .map(|&seed| run(&Sampling::heun(REFERENCE_STEPS, guidance), seed))
        .collect();
    println!(
        "{model} at {resolution} px, guidance {guidance}, random weights; mean over seeds \
         {SEEDS:?} of ‖x − x_ref‖/‖x_ref‖, x_ref = Heun with {REFERENCE_STEPS} steps\n"
    );
    println!("| evaluations | sampler | steps | error vs reference | s per image |");
    println!("| --- | --- | --- | --- | --- |");
    for evaluations in [10usize, 20, 40] {
        for sampler in [
            Sampler::Heun,
            Sampler::Euler,
            Sampler::DpmSolver2M,
            Sampler::DpmSolver2MSde,
        ] {
            // Heun makes 2·steps − 1 evaluations.
            let steps = match sampler {
                Sampler::Heun => evaluations.div_ceil(2),
                _ => evaluations,
            };
            let sampling = Sampling {
                sampler,
                ..Sampling::heun(steps, guidance)
            };
            let started = Instant::now();
            let mut error = 0.0;
            for (seed, exact) in SEEDS.iter().zip(&reference) {
                let x = run(&sampling, *seed);
                let diff = (x - exact.clone())
                    .powi_scalar(2)
                    .sum()
                    .sqrt()
                    .into_scalar();
                let norm = exact.clone().powi_scalar(2).sum().sqrt().into_scalar();
                error += (diff / norm) as f64 / SEEDS.len() as f64;
            }
            let seconds = started.elapsed().as_secs_f64() / SEEDS.len() as f64;
            println!(
                "| {} | {sampler} | {steps} | {error:.4} | {seconds:.2} |",
                sampling.evaluations()
            );
        }
    }
    Ok(())
}
