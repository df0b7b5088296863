//! The training loop: data → model → EDM loss → clipped AdamW, with checkpoints that a
//! killed run resumes from exactly.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{AutodiffBackend, Backend};
use anyhow::ensure;
use anyhow::{bail, Context, Result};
use burn::collective::{self, CollectiveConfig, PeerId, ReduceOperation};
use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use indicatif::{ProgressBar, ProgressStyle};
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, TrainState};
use super::config::TrainConfig;
use super::optim::{clip_grad_norm, AdamWSettings, Ema, GroupedAdamW};
use super::preview::Preview;
use crate::data::latents::LatentsDataset;
use crate::edm::{edm_loss, LossNoise};
use crate::model::weights::load_weights;
use crate::model::{DitConfig, Init, MicroDit, Precision};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run directory's newest complete checkpoint.
    pub resume: bool,
    /// Fault injection for tests: abort the process (no clean-up) right after this step.
    pub abort_after_step: Option<usize>,
    /// No progress bar (tests, logs).
    pub quiet: bool,
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub step: usize,
    pub losses: Vec<f64>,
    pub interrupted: bool,
}

/// Turns sample indices into a batch: caption embeddings (with caption dropout) and latents.
struct BatchReader<'a> {
    data: &'a LatentsDataset,
    dit: &'a DitConfig,
    caption_len: usize,
    dropout: f64,
    skip_bad: bool,
}

impl BatchReader<'_> {
    /// Draws what reading `n` samples would (their caption-dropout coins) without reading.
    fn skip(&self, n: usize, rng: &mut ChaCha8Rng) {
        for _ in 0..n {
            let _ = rng.random::<f64>();
        }
    }

    fn read<B: Backend>(
        &self,
        indices: &[usize],
        skipped: &mut u64,
        rng: &mut ChaCha8Rng,
        device: &B::Device,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 4>)> {
        let (data, dit) = (self.data, self.dit);
        let (c, s) = (dit.in_channels, dit.input_size);
        let read = |i: usize| data.get(i, self.caption_len * dit.caption_channels, c * s * s);
        let (mut captions, mut latents) = (Vec::new(), Vec::new());
        for &i in indices {
            let sample = match read(i) {
                Ok(sample) => sample,
                // Skipping: the next readable sample stands in, so the batch keeps its size
                // and the choice is the same on every run.
                Err(e) if self.skip_bad => {
                    eprintln!("skipping sample {i}: {e:#}");
                    *skipped += 1;
                    (1..data.len())
                        .find_map(|k| read((i + k) % data.len()).ok())
                        .context("no readable sample left in the dataset")?
                }
                Err(e) => {
                    return Err(e.context(
                        "a bad sample (set skip_bad_samples = true to skip such samples)",
                    ))
                }
            };
            let dropped = rng.random::<f64>() < self.dropout;
            captions.extend(
                sample
                    .caption
                    .into_iter()
                    .map(|v| if dropped { 0.0 } else { v }),
            );
            latents.extend(sample.latents);
        }
        let n = indices.len();
        Ok((
            Tensor::from_data(
                TensorData::new(captions, [n, self.caption_len, dit.caption_channels]),
                device,
            ),
            Tensor::from_data(TensorData::new(latents, [n, c, s, s]), device),
        ))
    }
}

/// What only rank 0 keeps: the preview renderer and the metrics file.
type MainOnly<B> = (Option<Preview<B>>, Option<std::fs::File>);

/// Trains one stage on one device.
pub fn train<B: AutodiffBackend>(
    cfg: &TrainConfig,
    run: &Path,
    opts: &RunOptions,
    device: &B::Device,
) -> Result<Summary> {
    train_rank::<B>(cfg, run, opts, device, Rank::SOLE)
}

/// Trains one stage data-parallel over `devices` (DDP): one thread and model replica per
/// device, each computing its share of every step's micro-batches (micro-batch `m` goes to
/// rank `m mod devices`); burn's collective all-reduce sums the gradients, and every rank
/// takes the same clipped AdamW step, so the replicas stay equal. Every rank draws the
/// step's full randomness (caption dropout, noise levels, noise, masks) from the same
/// generator, so the global batch and its randomness are those of a one-device run; only
/// the order in which micro-batch gradients are summed differs. Rank 0 logs and writes
/// checkpoints, which resume on any number of devices.
pub fn train_data_parallel<B: AutodiffBackend>(
    cfg: &TrainConfig,
    run: &Path,
    opts: &RunOptions,
    devices: &[B::Device],
) -> Result<Summary> {
    let world = devices.len();
    if world <= 1 {
        let device = devices.first().context("no device given")?;
        return train::<B>(cfg, run, opts, device);
    }
    let micro_batches = cfg.global_batch / cfg.micro_batch;
    ensure!(
        micro_batches.is_multiple_of(world),
        "global_batch / micro_batch = {micro_batches} micro-batches cannot be split evenly over {world} devices"
    );
    std::thread::scope(|scope| {
        let workers: Vec<_> = (1..world)
            .map(|index| {
                let device = &devices[index];
                scope.spawn(move || train_rank::<B>(cfg, run, opts, device, Rank { index, world }))
            })
            .collect();
        let main = train_rank::<B>(cfg, run, opts, &devices[0], Rank { index: 0, world });
        for (k, worker) in workers.into_iter().enumerate() {
            let result = worker
                .join()
                .map_err(|_| anyhow::anyhow!("rank {} panicked", k + 1))?;
            if main.is_ok() {
                result.with_context(|| format!("rank {}", k + 1))?;
            }
        }
        main
    })
}

/// Gives parameters the ids 0, 1, 2… in module order. Fresh ids are random, and
/// data-parallel replicas must agree on them: gradients are all-reduced in id order.
#[derive(Default)]
struct NumberedParams {
    next: u64,
}

impl<B: Backend> ModuleMapper<B> for NumberedParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        self.next += 1;
        Param::from_mapped_value(ParamId::from(self.next - 1), tensor, mapper)
    }
}

/// A data-parallel rank: `index` of `world`.
#[derive(Debug, Clone, Copy)]
struct Rank {
    index: usize,
    world: usize,
}

impl Rank {
    const SOLE: Rank = Rank { index: 0, world: 1 };

    fn is_main(&self) -> bool {
        self.index == 0
    }

    fn owns(&self, micro_batch: usize) -> bool {
        micro_batch % self.world == self.index
    }

    fn peer(&self) -> PeerId {
        PeerId::from(self.index)
    }

    /// Sums `values` over all ranks (identity on one device).
    fn sum<B: Backend>(&self, values: &[f64], device: &B::Device) -> Result<Vec<f64>> {
        if self.world == 1 {
            return Ok(values.to_vec());
        }
        let data: Vec<f32> = values.iter().map(|&v| v as f32).collect();
        let tensor = Tensor::<B, 1>::from_data(TensorData::new(data, [values.len()]), device);
        let summed = collective::all_reduce::<B>(
            self.peer(),
            tensor.into_primitive().tensor(),
            ReduceOperation::Sum,
        )
        .map_err(|e| anyhow::anyhow!("all-reduce failed: {e:?}"))?;
        let summed = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(summed));
        Ok(summed
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    }
}

fn train_rank<B: AutodiffBackend>(
    cfg: &TrainConfig,
    run: &Path,
    opts: &RunOptions,
    device: &B::Device,
    rank: Rank,
) -> Result<Summary> {
    if rank.world > 1 {
        collective::register::<B::InnerBackend>(
            rank.peer(),
            device.clone(),
            CollectiveConfig::default().with_num_devices(rank.world),
        )
        .map_err(|e| anyhow::anyhow!("joining the data-parallel group: {e:?}"))?;
    }
    let result = train_steps::<B>(cfg, run, opts, device, rank);
    if rank.world > 1 {
        let _ = collective::finish_collective::<B::InnerBackend>(rank.peer());
    }
    result
}

fn train_steps<B: AutodiffBackend>(
    cfg: &TrainConfig,
    run: &Path,
    opts: &RunOptions,
    device: &B::Device,
    rank: Rank,
) -> Result<Summary> {
    let dit = cfg.dit_config()?;
    let data = LatentsDataset::open(&cfg.data, &cfg.latents_column(), &cfg.caption_column)?;
    let reader = BatchReader {
        data: &data,
        dit: &dit,
        caption_len: data.caption_tokens(dit.caption_channels)?,
        dropout: cfg.caption_dropout,
        skip_bad: cfg.skip_bad_samples,
    };
    std::fs::create_dir_all(run)
        .with_context(|| format!("creating run directory {}", run.display()))?;

    let mut model = MicroDit::<B>::new(&dit, &mut Init::reference(cfg.seed, device))
        .map(&mut NumberedParams::default());
    let settings = AdamWSettings {
        beta1: cfg.betas[0],
        beta2: cfg.betas[1],
        eps: cfg.eps,
        weight_decay: cfg.weight_decay,
    };
    let mut optim = GroupedAdamW::new(&settings, cfg.expert_lr_scale);
    let mut ema: Option<Ema<B::InnerBackend>> = None;
    let (mut state, mut rng) = TrainState::new(cfg.seed.wrapping_add(1));
    let fresh = checkpoint::latest(run).is_none();
    match checkpoint::latest(run) {
        Some(ckpt) if opts.resume => {
            let restored = checkpoint::load(&ckpt, model, optim, cfg.ema_decay, device)?;
            (model, optim, ema, state) = (restored.model, restored.optim, restored.ema, restored.state);
            rng = state.rng()?;
            if rank.is_main() {
                eprintln!("resuming from {} (step {})", ckpt.display(), state.step);
            }
        }
        Some(ckpt) => bail!(
            "{} already holds checkpoints (newest {}): pass --resume to continue it, or choose another run directory",
            run.display(),
            ckpt.display()
        ),
        None => {
            if let Some(init) = &cfg.init_from {
                let previous = checkpoint::latest(init);
                let weights = match &previous {
                    Some(ckpt) => ckpt.join("weights.safetensors"),
                    None => init.clone(),
                };
                if let Some(ckpt) = previous.as_ref().filter(|_| cfg.carry_optimizer) {
                    optim = checkpoint::load_optimizer(ckpt, optim, device)?;
                }
                model = load_weights(model, &weights).with_context(|| format!("initialising from {}", init.display()))?;
                if rank.is_main() {
                    eprintln!("initialised from {}", weights.display());
                }
            }
        }
    }

    // Rank 0's own setup (the config copy, previews, the metrics file) can fail where the
    // other ranks' cannot; they learn of it before waiting on rank 0 in a step's all-reduce.
    let main_setup = || -> Result<MainOnly<B::InnerBackend>> {
        if !rank.is_main() {
            return Ok((None, None));
        }
        if fresh {
            let config = toml::to_string(cfg)?;
            crate::io::write_atomic(&run.join("config.toml"), |f| f.write_all(config.as_bytes()))?;
        }
        let preview = match (cfg.sample_every, &cfg.sample_captions) {
            (every, Some(captions)) if every > 0 => Some(Preview::new(
                captions,
                cfg.sample_vae.as_deref(),
                cfg.sample_steps,
                cfg.sample_guidance,
                run,
                device,
            )?),
            _ => None,
        };
        let metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run.join("metrics.jsonl"))
            .with_context(|| format!("opening {}", run.join("metrics.jsonl").display()))?;
        Ok((preview, Some(metrics)))
    };
    let setup = main_setup();
    let main_failed = rank.sum::<B::InnerBackend>(&[setup.is_err() as u8 as f64], device)?[0] > 0.0;
    let (preview, mut metrics) = setup?;
    ensure!(!main_failed, "rank 0 could not start");
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupted.clone();
        // A second handler cannot be installed in the same process (tests run several
        // trainings): then Ctrl-C keeps its default meaning.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }
    let bar = if opts.quiet || !rank.is_main() {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(cfg.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_position(state.step as u64);

    let edm = cfg.edm();
    let mut orders: HashMap<u64, Vec<usize>> = HashMap::new();
    let micro_batches = cfg.global_batch / cfg.micro_batch;
    let mut losses = Vec::new();
    let started = Instant::now();
    let first_step = state.step;
    while state.step < cfg.steps {
        let lr = cfg.lr_at(state.step);
        let mut accumulated = GradientsAccumulator::<MicroDit<B>>::new();
        let mut step_loss = 0.0;
        // A failure on one rank must not leave the others waiting in an all-reduce: it is
        // recorded, the step's remaining work skipped, and every rank stops after the
        // status exchange below.
        let mut failure: Option<anyhow::Error> = None;
        let skipped_before = state.skipped_samples;
        // Mixed precision: a bf16 copy computes, and since the cast is part of the graph the
        // gradients arrive on the f32 master weights.
        let low_precision =
            (cfg.precision != Precision::F32).then(|| model.clone().cast(cfg.precision.dtype()));
        let compute = low_precision.as_ref().unwrap_or(&model);
        for m in 0..micro_batches {
            let indices: Vec<usize> = (0..cfg.micro_batch as u64)
                .map(|k| {
                    let cursor = state.samples_seen + k;
                    let epoch = cursor / data.len() as u64;
                    let order = orders
                        .entry(epoch)
                        .or_insert_with(|| data.epoch_order(cfg.seed, epoch));
                    order[(cursor % data.len() as u64) as usize]
                })
                .collect();
            orders.retain(|&e, _| e + 1 >= state.samples_seen / data.len() as u64);
            state.samples_seen += cfg.micro_batch as u64;
            if !rank.owns(m) || failure.is_some() {
                // Another rank's micro-batch: draw its randomness all the same.
                reader.skip(indices.len(), &mut rng);
                let shape = [
                    indices.len(),
                    dit.in_channels,
                    dit.input_size,
                    dit.input_size,
                ];
                LossNoise::<B>::draw(&mut rng, shape, dit.patch_size, cfg.mask_ratio, device);
                continue;
            }
            let (y, x0) =
                match reader.read::<B>(&indices, &mut state.skipped_samples, &mut rng, device) {
                    Ok(batch) => batch,
                    Err(e) => {
                        failure = Some(e);
                        continue;
                    }
                };
            let draws =
                LossNoise::draw(&mut rng, x0.dims(), dit.patch_size, cfg.mask_ratio, device);
            let loss =
                edm_loss(compute, &edm, x0, y, &draws, dit.patch_size) / micro_batches as f64;
            let value = loss.clone().into_scalar().elem::<f64>();
            step_loss += value;
            if !value.is_finite() {
                continue;
            }
            accumulated.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
        }
        let stop = interrupted.load(Ordering::SeqCst);
        let status = rank.sum::<B::InnerBackend>(
            &[
                step_loss,
                failure.is_some() as u8 as f64,
                stop as u8 as f64,
                (state.skipped_samples - skipped_before) as f64,
            ],
            device,
        )?;
        if let Some(e) = failure {
            return Err(e);
        }
        ensure!(
            status[1] == 0.0,
            "another rank failed at step {}",
            state.step + 1
        );
        let (step_loss, stop) = (status[0], status[2] > 0.0);
        state.skipped_samples = skipped_before + status[3] as u64;
        if !step_loss.is_finite() {
            bail!("the loss became {step_loss} at step {}: stopping; the last good checkpoint is kept", state.step + 1);
        }
        let mut grads = accumulated.grads();
        if rank.world > 1 {
            grads = grads
                .all_reduce::<B::InnerBackend>(rank.peer(), ReduceOperation::Sum)
                .map_err(|e| anyhow::anyhow!("all-reducing gradients: {e:?}"))?;
        }
        let grad_norm = clip_grad_norm(&model, &mut grads, cfg.grad_clip);
        if !grad_norm.is_finite() {
            bail!("the gradient norm became {grad_norm} at step {}: stopping; the last good checkpoint is kept", state.step + 1);
        }
        model = optim.step(lr, model, grads);
        state.step += 1;
        match (&mut ema, cfg.ema_decay) {
            _ if !rank.is_main() => {}
            (Some(e), _) => e.update(&model),
            (None, Some(decay)) if state.step >= cfg.ema_start => {
                ema = Some(Ema {
                    decay,
                    model: model.valid(),
                })
            }
            _ => {}
        }
        losses.push(step_loss);

        let elapsed = started.elapsed().as_secs_f64();
        let images_per_s = ((state.step - first_step) * cfg.global_batch) as f64 / elapsed;
        bar.set_position(state.step as u64);
        bar.set_message(format!(
            "loss {step_loss:.4} lr {lr:.2e} {images_per_s:.1} img/s"
        ));
        if let Some(metrics) = metrics
            .as_mut()
            .filter(|_| state.step.is_multiple_of(cfg.log_every) || state.step == cfg.steps)
        {
            let line = serde_json::json!({"step": state.step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                "images_per_s": images_per_s, "elapsed_s": elapsed, "skipped_samples": state.skipped_samples});
            writeln!(metrics, "{line}")?;
        }
        let scheduled = state.step.is_multiple_of(cfg.checkpoint_every) || state.step == cfg.steps;
        if rank.is_main() && (scheduled || stop) {
            state.capture(&rng);
            checkpoint::save(run, &model, &optim, ema.as_ref(), &state, cfg.keep_last)?;
        }
        if let Some(p) = preview
            .as_ref()
            .filter(|_| state.step.is_multiple_of(cfg.sample_every))
        {
            let path = p.render(
                &model.valid(),
                [dit.in_channels, dit.input_size, dit.input_size],
                state.step,
            )?;
            bar.println(format!(
                "step {}: samples in {}",
                state.step,
                path.display()
            ));
        }
        if rank.is_main() && opts.abort_after_step == Some(state.step) {
            std::process::abort();
        }
        if stop {
            bar.abandon_with_message(format!(
                "interrupted: checkpoint at step {} written",
                state.step
            ));
            return Ok(Summary {
                step: state.step,
                losses,
                interrupted: true,
            });
        }
    }
    bar.finish_with_message(format!("done: {} steps", state.step));
    Ok(Summary {
        step: state.step,
        losses,
        interrupted: false,
    })
}
