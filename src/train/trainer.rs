//! The training loop: data → model → EDM loss → clipped AdamW, with checkpoints that a
//! killed run resumes from exactly.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{host_sync, AutodiffBackend, MicroditBackend};
use anyhow::ensure;
use anyhow::{bail, Context, Result};
use burn::module::{AutodiffModule, ModuleMapper, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use indicatif::ProgressBar;
use rand_chacha::ChaCha8Rng;

use super::checkpoint::{self, Restored, TrainState};
use super::config::TrainConfig;
use super::distributed::{Rank, Threads};
use super::optim::{clip_grad_norm, Ema, GroupedAdamW};
use super::preview::Preview;
use crate::data::batch::BatchReader;
use crate::data::latents::LatentsDataset;
use crate::edm::{edm_loss, LossNoise};
use crate::model::routing::Sparsity;
use crate::model::weights::load_weights;
use crate::model::{DitConfig, Init, MicroDit};
use crate::run_dir;

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from the run directory's newest complete checkpoint.
    pub resume: bool,
    /// Fault injection for tests: abort the process (no clean-up) right after this step.
    pub abort_after_step: Option<usize>,
    /// No progress bar (tests, logs).
    pub quiet: bool,
    /// Finish by then: the planned steps are re-fitted to the pace measured as training
    /// goes (a busier or faster machine), until [`REPLAN_UNTIL`] of them are done.
    pub deadline: Option<Instant>,
    /// Checkpoint after this step and return, unfinished (a later call with `resume`
    /// continues exactly): how the demo scores its model part-way.
    pub pause_after: Option<usize>,
}

/// What a finished (or interrupted) run reports.
#[derive(Debug, Clone)]
pub struct Summary {
    pub step: usize,
    /// The steps the run is planned for (the config's, or re-planned to a deadline).
    pub planned_steps: usize,
    pub losses: Vec<f64>,
    /// Stopped by Ctrl-C or by `pause_after` before the planned steps.
    pub interrupted: bool,
}

/// A run with a deadline re-plans every this many steps…
const REPLAN_EVERY: usize = 10;
/// …while less than this share of its planned steps is done; the rest of the cosine decay
/// then runs as planned.
pub const REPLAN_UNTIL: f64 = 0.8;

/// The steps a run with a deadline should plan for: those `done`, plus as many as fit in
/// the `left` seconds at the pace of the `done_here` steps this process took in `elapsed`
/// seconds; `planned` unchanged when there is too little to measure or the plan is frozen.
pub fn replanned_steps(
    done: usize,
    planned: usize,
    done_here: usize,
    elapsed: f64,
    left: f64,
) -> usize {
    let frozen = done as f64 >= REPLAN_UNTIL * planned as f64;
    if done_here < REPLAN_EVERY || frozen || elapsed <= 0.0 {
        return planned;
    }
    let per_step = elapsed / done_here as f64;
    done + ((left.max(0.0) / per_step) as usize).max(1)
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
    train_as::<B>(cfg, run, opts, device, Rank::sole())
}

/// Trains one stage data-parallel over `devices` (DDP, `distributed.rs`): one thread and
/// model replica per device. Every rank draws the step's full randomness (caption dropout,
/// noise levels, noise, masks) from the same generator, so the global batch and its
/// randomness are those of a one-device run; only the order in which micro-batch
/// gradients are summed differs. Rank 0 logs and writes checkpoints, which resume on any
/// number of devices.
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
    check_split(cfg, world)?;
    let group = Threads::new(world);
    let pools = (0..world)
        .map(|_| replica_pool(world))
        .collect::<Result<Vec<_>>>()?;
    std::thread::scope(|scope| {
        let workers: Vec<_> = (1..world)
            .map(|index| {
                let (device, group, pool) = (&devices[index], group.clone(), &pools[index]);
                scope.spawn(move || {
                    pool.install(|| {
                        train_as::<B>(cfg, run, opts, device, Rank::new(index, world, group))
                    })
                })
            })
            .collect();
        let main = pools[0]
            .install(|| train_as::<B>(cfg, run, opts, &devices[0], Rank::new(0, world, group)));
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

/// A replica's share of this process's threads. On the CPU backend every operation runs
/// on the rayon pool it is called from, and replicas sharing one pool wait on each other's
/// work; a small model also runs faster on one thread than on two (docs/BENCHMARKS.md).
fn replica_pool(world: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads((rayon::current_num_threads() / world).max(1))
        .build()
        .context("starting a replica's threads")
}

/// Gives parameters the ids 0, 1, 2… in module order. Fresh ids are random, and
/// data-parallel replicas must agree on them: gradients are all-reduced in id order.
#[derive(Default)]
struct NumberedParams {
    next: u64,
}

impl<B: MicroditBackend> ModuleMapper<B> for NumberedParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (_, tensor, mapper) = param.consume();
        self.next += 1;
        Param::from_mapped_value(ParamId::from(self.next - 1), tensor, mapper)
    }
}

/// The micro-batches of a step must split evenly over the ranks.
fn check_split(cfg: &TrainConfig, world: usize) -> Result<()> {
    let micro_batches = cfg.global_batch / cfg.micro_batch;
    ensure!(
        micro_batches.is_multiple_of(world),
        "global_batch / micro_batch = {micro_batches} micro-batches cannot be split evenly over {world} ranks"
    );
    Ok(())
}

/// One stage's training as `rank` of a data-parallel group (one process of an MPI launch,
/// or one thread of [`train_data_parallel`]), step by step: [`Trainer::start`] (data,
/// model, resume, rank 0's files), then [`Trainer::step`] (one optimiser step) and
/// [`Trainer::after_step`] (metrics, checkpoints, previews) until done.
pub fn train_as<B: AutodiffBackend>(
    cfg: &TrainConfig,
    run: &Path,
    opts: &RunOptions,
    device: &B::Device,
    rank: Rank,
) -> Result<Summary> {
    check_split(cfg, rank.world)?;
    let mut trainer = Trainer::<B>::start(cfg, run, opts, device, rank)?;
    while !trainer.done() {
        let step = trainer.step()?;
        if trainer.after_step(&step)? == Flow::Stop {
            return Ok(trainer.summary(true));
        }
    }
    Ok(trainer.summary(false))
}

/// What one optimiser step did.
struct StepReport {
    loss: f64,
    lr: f64,
    grad_norm: f64,
    /// Ctrl-C was pressed on some rank: checkpoint and stop.
    stop: bool,
}

#[derive(Debug, PartialEq)]
enum Flow {
    Continue,
    Stop,
}

struct Trainer<'a, B: AutodiffBackend> {
    cfg: &'a TrainConfig,
    run: &'a Path,
    opts: &'a RunOptions,
    device: &'a B::Device,
    rank: Rank,
    dit: DitConfig,
    /// The stage's masking and routing, checked against the backbone.
    sparsity: Sparsity,
    data: LatentsDataset,
    reader: BatchReader,
    /// `None` only while an optimiser step consumes it.
    model: Option<MicroDit<B>>,
    optim: GroupedAdamW<B>,
    ema: Option<Ema<B::InnerBackend>>,
    state: TrainState,
    rng: ChaCha8Rng,
    /// Epoch → sample order, for the epochs the current step reads from.
    orders: HashMap<u64, Vec<usize>>,
    preview: Option<Preview<B::InnerBackend>>,
    metrics: Option<std::fs::File>,
    interrupted: Arc<AtomicBool>,
    bar: ProgressBar,
    losses: Vec<f64>,
    started: Instant,
    first_step: usize,
}

impl<'a, B: AutodiffBackend> Trainer<'a, B> {
    /// Opens the data, builds the model (resumed, or initialised from `init_from`), and
    /// sets up rank 0's files; every rank learns whether rank 0's setup failed.
    fn start(
        cfg: &'a TrainConfig,
        run: &'a Path,
        opts: &'a RunOptions,
        device: &'a B::Device,
        rank: Rank,
    ) -> Result<Self> {
        let dit = cfg.dit_config()?;
        let sparsity = cfg.sparsity(dit.depth)?;
        let data = LatentsDataset::open(&cfg.data, &cfg.latents_column()?, &cfg.caption_column)?;
        let reader = BatchReader {
            caption_len: data.caption_tokens(dit.caption_channels)?,
            caption_channels: dit.caption_channels,
            latent_shape: [dit.in_channels, dit.input_size, dit.input_size],
            dropout: cfg.caption_dropout,
            skip_bad: cfg.skip_bad_samples,
        };
        std::fs::create_dir_all(run)
            .with_context(|| format!("creating run directory {}", run.display()))?;
        let fresh = run_dir::latest(run).is_none();
        let Restored {
            model,
            optim,
            ema,
            state,
        } = Self::initial_state(cfg, &dit, run, opts, device, &rank)?;
        let rng = state.rng()?;

        // Rank 0's own setup (the config copy, previews, the metrics file) can fail where
        // the other ranks' cannot; they learn of it before waiting on rank 0 in a step's
        // all-reduce.
        let setup = Self::main_setup(cfg, run, device, &rank, fresh);
        let main_failed = rank.sum(&[setup.is_err() as u8 as f64])?[0] > 0.0;
        let (preview, metrics) = setup?;
        ensure!(!main_failed, "rank 0 could not start");
        let interrupted = Arc::new(AtomicBool::new(false));
        {
            let flag = interrupted.clone();
            // A second handler cannot be installed in the same process (tests run several
            // trainings): then Ctrl-C keeps its default meaning.
            let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
        }
        let quiet = opts.quiet || !rank.is_main();
        let steps = state.planned_steps.unwrap_or(cfg.steps);
        let bar = crate::progress::bar_unless(quiet, steps, "train", "step");
        bar.set_position(state.step as u64);
        let first_step = state.step;
        Ok(Self {
            cfg,
            run,
            opts,
            device,
            rank,
            dit,
            sparsity,
            data,
            reader,
            model: Some(model),
            optim,
            ema,
            state,
            rng,
            orders: HashMap::new(),
            preview,
            metrics,
            interrupted,
            bar,
            losses: Vec::new(),
            started: Instant::now(),
            first_step,
        })
    }

    /// A fresh model and optimiser, the newest checkpoint's (with `--resume`), or the
    /// weights (and optimiser state) of `init_from`.
    fn initial_state(
        cfg: &TrainConfig,
        dit: &DitConfig,
        run: &Path,
        opts: &RunOptions,
        device: &B::Device,
        rank: &Rank,
    ) -> Result<Restored<B>> {
        let mut model = MicroDit::<B>::new(dit, &mut Init::reference(cfg.seed, device))
            .map(&mut NumberedParams::default());
        let mut optim = GroupedAdamW::new(&cfg.adamw(), cfg.expert_lr_scale);
        let (state, _) = TrainState::new(cfg.seed.wrapping_add(1));
        match run_dir::latest(run) {
            Some(ckpt) if opts.resume => {
                let restored = checkpoint::load(&ckpt, model, optim, cfg.ema_decay, device)?;
                if rank.is_main() {
                    eprintln!(
                        "resuming from {} (step {})",
                        ckpt.display(),
                        restored.state.step
                    );
                }
                return Ok(restored);
            }
            Some(ckpt) => bail!(
                "{} already holds checkpoints (newest {}): pass --resume to continue it, or choose another run directory",
                run.display(),
                ckpt.display()
            ),
            None => {}
        }
        if let Some(init) = &cfg.init_from {
            let previous = run_dir::latest(init);
            let weights = match &previous {
                Some(ckpt) => ckpt.join(run_dir::WEIGHTS),
                None => init.clone(),
            };
            // The weights first: loading them checks the architecture, which the
            // optimiser's record (moments per parameter id) would not.
            model = load_weights(model, &weights)
                .with_context(|| format!("initialising from {}", init.display()))?;
            if let Some(ckpt) = previous.as_ref().filter(|_| cfg.carry_optimizer) {
                optim = checkpoint::load_optimizer(ckpt, optim, device)?;
            }
            if rank.is_main() {
                eprintln!("initialised from {}", weights.display());
            }
        }
        Ok(Restored {
            model,
            optim,
            ema: None,
            state,
        })
    }

    /// Rank 0 writes the config copy and opens the preview renderer and the metrics file.
    fn main_setup(
        cfg: &TrainConfig,
        run: &Path,
        device: &B::Device,
        rank: &Rank,
        fresh: bool,
    ) -> Result<MainOnly<B::InnerBackend>> {
        if !rank.is_main() {
            return Ok((None, None));
        }
        if fresh {
            let config = toml::to_string(cfg)?;
            crate::io::write_atomic(&run.join(run_dir::CONFIG), |f| {
                f.write_all(config.as_bytes())
            })?;
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
            .open(run.join(run_dir::METRICS))
            .with_context(|| format!("opening {}", run.join(run_dir::METRICS).display()))?;
        Ok((preview, Some(metrics)))
    }

    fn done(&self) -> bool {
        self.state.step >= self.planned_steps()
    }

    /// The steps this run is planned for: `cfg.steps`, unless re-planned to a deadline.
    fn planned_steps(&self) -> usize {
        self.state.planned_steps.unwrap_or(self.cfg.steps)
    }

    /// With a deadline: the planned steps re-fitted to the pace so far (rank 0's choice, so
    /// that every rank stops at the same step).
    fn replan(&mut self) -> Result<()> {
        let (Some(deadline), n) = (self.opts.deadline, self.state.step) else {
            return Ok(());
        };
        if !n.is_multiple_of(REPLAN_EVERY) {
            return Ok(());
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        let elapsed = self.started.elapsed().as_secs_f64();
        let planned = self.planned_steps();
        let mine = replanned_steps(n, planned, n - self.first_step, elapsed, left);
        let main = if self.rank.is_main() {
            mine as f64
        } else {
            0.0
        };
        let steps = self.rank.sum(&[main])?[0] as usize;
        if steps != planned {
            self.state.planned_steps = Some(steps);
            self.bar.set_length(steps as u64);
        }
        Ok(())
    }

    /// The next micro-batch's sample indices, advancing the data position.
    fn next_indices(&mut self) -> Vec<usize> {
        let (cfg, data) = (self.cfg, &self.data);
        let seen = self.state.samples_seen;
        let indices = (0..cfg.micro_batch as u64)
            .map(|k| {
                let cursor = seen + k;
                let epoch = cursor / data.len() as u64;
                let order = self
                    .orders
                    .entry(epoch)
                    .or_insert_with(|| data.epoch_order(cfg.seed, epoch));
                order[(cursor % data.len() as u64) as usize]
            })
            .collect();
        self.orders
            .retain(|&e, _| e + 1 >= seen / data.len() as u64);
        self.state.samples_seen += cfg.micro_batch as u64;
        indices
    }

    /// One optimiser step: every micro-batch's loss and gradients (this rank's share), the
    /// ranks' status exchange, the gradient all-reduce, global clipping and AdamW.
    fn step(&mut self) -> Result<StepReport> {
        let (cfg, device) = (self.cfg, self.device);
        let dit = self.dit.clone();
        let lr = cfg.lr_at_over(self.state.step, self.planned_steps());
        let model = self.model.take().expect("model between steps");
        let mut accumulated = GradientsAccumulator::<MicroDit<B>>::new();
        let mut step_loss = 0.0;
        // A failure on one rank must not leave the others waiting in an all-reduce: it is
        // recorded, the step's remaining work skipped, and every rank stops after the
        // status exchange below.
        let mut failure: Option<anyhow::Error> = None;
        let skipped_before = self.state.skipped_samples;
        // Mixed precision: a low-precision copy computes, the gradients arrive on the f32
        // master weights.
        let compute = &model.clone().in_precision(cfg.precision);
        let micro_batches = cfg.global_batch / cfg.micro_batch;
        for m in 0..micro_batches {
            let indices = self.next_indices();
            let shape = [
                indices.len(),
                dit.in_channels,
                dit.input_size,
                dit.input_size,
            ];
            if !self.rank.owns(m) || failure.is_some() {
                // Another rank's micro-batch: draw its randomness all the same.
                self.reader.skip(indices.len(), &mut self.rng);
                LossNoise::<B>::draw(&mut self.rng, shape, dit.patch_size, &self.sparsity, device);
                continue;
            }
            let batch = self.reader.read::<B>(
                &self.data,
                &indices,
                &mut self.state.skipped_samples,
                &mut self.rng,
                device,
            );
            let (y, x0) = match batch {
                Ok(batch) => batch,
                Err(e) => {
                    failure = Some(e);
                    continue;
                }
            };
            let draws =
                LossNoise::draw(&mut self.rng, shape, dit.patch_size, &self.sparsity, device);
            let loss =
                edm_loss(compute, &cfg.edm(), x0, y, &draws, dit.patch_size) / micro_batches as f64;
            let value = host_sync::scalar(loss.clone());
            step_loss += value;
            if !value.is_finite() {
                continue;
            }
            accumulated.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
        }
        let stop = self.interrupted.load(Ordering::SeqCst);
        let status = self.rank.sum(&[
            step_loss,
            failure.is_some() as u8 as f64,
            stop as u8 as f64,
            (self.state.skipped_samples - skipped_before) as f64,
        ])?;
        if let Some(e) = failure {
            return Err(e);
        }
        ensure!(
            status[1] == 0.0,
            "another rank failed at step {}",
            self.state.step + 1
        );
        let (loss, stop) = (status[0], status[2] > 0.0);
        self.state.skipped_samples = skipped_before + status[3] as u64;
        if !loss.is_finite() {
            bail!(
                "the loss became {loss} at step {}: stopping; the last good checkpoint is kept",
                self.state.step + 1
            );
        }
        let mut grads = self
            .rank
            .all_reduce_gradients(&model, accumulated.grads())?;
        let grad_norm = clip_grad_norm(&model, &mut grads, cfg.grad_clip);
        if !grad_norm.is_finite() {
            bail!("the gradient norm became {grad_norm} at step {}: stopping; the last good checkpoint is kept", self.state.step + 1);
        }
        let model = self.optim.step(lr, model, grads);
        self.state.step += 1;
        self.update_ema(&model);
        self.model = Some(model);
        self.losses.push(loss);
        Ok(StepReport {
            loss,
            lr,
            grad_norm,
            stop,
        })
    }

    /// Rank 0's average of the weights: started at `ema_start`, updated every step after.
    fn update_ema(&mut self, model: &MicroDit<B>) {
        match (&mut self.ema, self.cfg.ema_decay) {
            _ if !self.rank.is_main() => {}
            (Some(e), _) => e.update(model),
            (None, Some(decay)) if self.state.step >= self.cfg.ema_start => {
                self.ema = Some(Ema {
                    decay,
                    model: model.valid(),
                })
            }
            _ => {}
        }
    }

    /// Progress, metrics, checkpoints and previews after a step; `Stop` after Ctrl-C (with
    /// the checkpoint written).
    fn after_step(&mut self, step: &StepReport) -> Result<Flow> {
        self.replan()?;
        let (cfg, n, last) = (self.cfg, self.state.step, self.planned_steps());
        let elapsed = self.started.elapsed().as_secs_f64();
        let images_per_s = ((n - self.first_step) * cfg.global_batch) as f64 / elapsed;
        self.bar.set_position(n as u64);
        self.bar.set_message(format!(
            "loss {:.4} lr {:.2e} {images_per_s:.1} img/s",
            step.loss, step.lr
        ));
        if let Some(metrics) = self
            .metrics
            .as_mut()
            .filter(|_| n.is_multiple_of(cfg.log_every) || n == last)
        {
            let line = serde_json::json!({"step": n, "loss": step.loss, "lr": step.lr,
                "grad_norm": step.grad_norm, "images_per_s": images_per_s, "elapsed_s": elapsed,
                "skipped_samples": self.state.skipped_samples});
            writeln!(metrics, "{line}")?;
        }
        let model = self.model.as_ref().expect("model after a step");
        let scheduled = n.is_multiple_of(cfg.checkpoint_every) || n == last;
        let pause = self.opts.pause_after == Some(n) && n < last;
        if self.rank.is_main() && (scheduled || step.stop || pause) {
            self.state.capture(&self.rng);
            checkpoint::save(
                self.run,
                model,
                &self.optim,
                self.ema.as_ref(),
                &self.state,
                cfg.keep_last,
            )?;
        }
        if let Some(p) = self
            .preview
            .as_ref()
            .filter(|_| n.is_multiple_of(cfg.sample_every))
        {
            let dit = &self.dit;
            let shape = [dit.in_channels, dit.input_size, dit.input_size];
            let path = p.render(&model.valid(), shape, n)?;
            self.bar
                .println(format!("step {n}: samples in {}", path.display()));
        }
        // The last rank crashes: under MPI that is another process than the one writing
        // checkpoints.
        if self.rank.index + 1 == self.rank.world && self.opts.abort_after_step == Some(n) {
            std::process::abort();
        }
        if step.stop {
            self.bar
                .abandon_with_message(format!("interrupted: checkpoint at step {n} written"));
            return Ok(Flow::Stop);
        }
        if pause {
            self.bar.abandon_with_message(format!("paused at step {n}"));
            return Ok(Flow::Stop);
        }
        Ok(Flow::Continue)
    }

    fn summary(self, interrupted: bool) -> Summary {
        if !interrupted {
            self.bar
                .finish_with_message(format!("done: {} steps", self.state.step));
        }
        Summary {
            step: self.state.step,
            planned_steps: self.planned_steps(),
            losses: self.losses,
            interrupted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_refits_the_steps_to_the_measured_pace() {
        // 20 steps in 10 s here, 30 s left: 60 more fit.
        assert_eq!(replanned_steps(20, 100, 20, 10.0, 30.0), 80);
        // A resumed run measures only its own steps (10 in 10 s).
        assert_eq!(replanned_steps(50, 100, 10, 10.0, 30.0), 80);
        // Past the deadline: one more step, then the plan ends.
        assert_eq!(replanned_steps(20, 100, 20, 10.0, -5.0), 21);
        // Too few steps to measure, or most of the plan done: unchanged.
        assert_eq!(replanned_steps(5, 100, 5, 2.0, 300.0), 100);
        assert_eq!(replanned_steps(80, 100, 80, 10.0, 300.0), 100);
    }
}
