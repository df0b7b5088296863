//! `microdit bench`: one training step (forward + backward + clip + AdamW) at each mask
//! ratio and one guided Heun sampler step, timed. `bench/pytorch_bench.py` does the same
//! work in PyTorch, so the two can be run side by side on one machine.

use std::time::Instant;

use anyhow::Result;
use burn::module::AutodiffModule;
use burn::optim::{GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{DeviceChoice, ModelArgs};
use crate::backend::Trainable;
use crate::edm::loss::standard_normal;
use crate::edm::{denoise, edm_loss, karras_sigmas, EdmConfig, Guidance, LossNoise};
use crate::model::{DitConfig, Init, MicroDit};
use crate::train::optim::{clip_grad_norm, AdamWSettings};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Images per step.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Caption tokens (77 for the OpenCLIP text tower).
    #[arg(long, default_value_t = 77)]
    pub caption_len: usize,
    /// Mask ratios of the timed training steps.
    #[arg(long, value_delimiter = ',', default_value = "0.75,0")]
    pub mask_ratios: Vec<f64>,
    /// Time only the sampler step (what `generate` spends its time on).
    #[arg(long)]
    pub sampler_only: bool,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Guidance scale of the timed sampler step.
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// Timed repetitions of each measurement (after one untimed warm-up).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceChoice,
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let cfg = args.model.config()?;
    crate::with_backend!(args.device, |Bk, device| bench::<Trainable<Bk>>(
        &cfg, args, &device
    ))
}

/// Median of `iters` timed runs after `warmup` untimed ones.
pub fn time(warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f();
    }
    let mut t: Vec<f64> = (0..iters.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

pub fn report(what: &str, seconds: f64, count: usize, unit: &str) {
    println!(
        "{what:<40} {seconds:>9.3} s   {:>8.2} {unit}/s",
        count as f64 / seconds
    );
}

fn bench<B: AutodiffBackend>(cfg: &DitConfig, args: &BenchArgs, device: &B::Device) -> Result<()> {
    let edm = EdmConfig::default();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let shape = [args.batch, cfg.in_channels, cfg.input_size, cfg.input_size];
    let x0: Tensor<B, 4> = standard_normal(&mut rng, shape, device);
    let y: Tensor<B, 3> = standard_normal(
        &mut rng,
        [args.batch, args.caption_len, cfg.caption_channels],
        device,
    );
    let mut model = Some(MicroDit::<B>::new(cfg, &mut Init::reference(0, device)));
    let mut optim = AdamWSettings::default().init::<B, MicroDit<B>>();
    println!(
        "{} parameters, batch {}, latents {:?}, captions {}x{}, {:?}",
        crate::model::params::param_count(cfg),
        args.batch,
        shape,
        args.caption_len,
        cfg.caption_channels,
        args.device
    );

    let ratios: &[f64] = if args.sampler_only {
        &[]
    } else {
        &args.mask_ratios
    };
    for &ratio in ratios {
        let seconds = time(args.warmup, args.iters, || {
            let m = model.take().expect("model");
            let draws = LossNoise::draw(&mut rng, shape, cfg.patch_size, ratio, device);
            let loss = edm_loss(&m, &edm, x0.clone(), y.clone(), &draws, cfg.patch_size);
            let mut grads = GradientsParams::from_grads(loss.backward(), &m);
            clip_grad_norm(&m, &mut grads, 0.25);
            model = Some(optim.step(2.4e-4, m, grads));
            B::sync(device).expect("device sync");
        });
        report(
            &format!("train step, mask ratio {ratio}"),
            seconds,
            args.batch,
            "images",
        );
    }

    let inference = model.take().expect("model").valid();
    let dev = device.clone();
    let y = y.inner();
    let sigmas = karras_sigmas(&edm, 30);
    let (t_cur, t_next) = (sigmas[0], sigmas[1]);
    let x = x0.inner() * t_cur;
    let guidance = Guidance::from_scale(args.guidance);
    let call = |x: Tensor<B::InnerBackend, 4>, sigma: f64| {
        denoise(
            &inference,
            &edm,
            x,
            Tensor::from_floats([sigma as f32], &dev),
            y.clone(),
            None,
            guidance,
        )
    };
    let seconds = time(args.warmup, args.iters, || {
        let d_cur = (x.clone() - call(x.clone(), t_cur)) / t_cur;
        let x_next = x.clone() + d_cur.clone() * (t_next - t_cur);
        let d_prime = (x_next.clone() - call(x_next, t_next)) / t_next;
        let _ = x.clone() + (d_cur + d_prime) * (0.5 * (t_next - t_cur));
        B::InnerBackend::sync(&dev).expect("device sync");
    });
    report(
        &format!("Heun step, guidance {}", args.guidance),
        seconds,
        args.batch,
        "images",
    );
    Ok(())
}
