//! The demo run, step by step, each step skipped when its output already exists (so a
//! stopped demo resumes): captioned shapes → a random CLIP-architecture text tower →
//! `precompute` (space-to-depth latents) → `train` (a masked stage with the patch-mixer,
//! then an unmasked finetune, or an ablation variant) → sampling held-out and seen prompts
//! → adherence scores, a Fréchet distance, a grid, loss plots and a report.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backend::{AutodiffBackend, Backend};
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::curve::{percent, Curve, CurvePoint, LINE_COLOURS};
use super::score::{accuracies, features, frechet_distance, judge, Accuracy, Tally};
use super::shapes::{scene_and_image, Scene};
use crate::data::sources::ImageCaptionSource;
use crate::hub::Hub;
use crate::model::routing::{RouteSpan, Sparsity};
use crate::model::{DitConfig, Precision, Routing};
use crate::pipeline::load::Components;
use crate::pipeline::{Sampling, TextToImage};
use crate::precompute::{precompute, Encoders, PrecomputeOptions};
use crate::state_dict::{reference_tensors, CLIP_TEXT_KEYS};
use crate::text::{ClipTextConfig, ClipTextEncoder, TextEncoder};
use crate::train::config::TrainConfig;
use crate::train::trainer::{train_data_parallel, RunOptions, Summary};
use crate::vae::{LatentCodec, SpaceToDepth};

/// How the training budget is spent (the paper's central comparison, in miniature).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Variant {
    /// 75% of patches masked, with the patch-mixer, then an unmasked finetune (MicroDiT).
    Masked,
    /// No masking at all.
    Unmasked,
    /// 75% masked without the patch-mixer, then an unmasked finetune.
    MaskedNoMixer,
    /// No masking; half the backbone's tokens routed past its middle blocks (TREAD).
    Routed,
    /// MicroDiT's masked stage and unmasked finetune, both with TREAD's routing.
    MaskedRouted,
}

impl Variant {
    /// Its stages, in order.
    fn stages(self) -> Vec<StageKind> {
        let routing =
            matches!(self, Variant::Routed | Variant::MaskedRouted).then(Routing::default);
        let stage = |name: &str, mask_ratio, share| StageKind {
            name: format!("{name}{}", if routing.is_some() { "-routed" } else { "" }),
            mask_ratio,
            routing,
            share,
        };
        match self {
            Variant::Unmasked | Variant::Routed => vec![stage("unmasked", 0.0, 1.0)],
            Variant::Masked | Variant::MaskedNoMixer | Variant::MaskedRouted => vec![
                stage("masked", MASK_RATIO, 1.0 - FINETUNE_SHARE),
                stage("finetune", 0.0, FINETUNE_SHARE),
            ],
        }
    }
}

/// One stage of a variant: its folder's name, what it masks and routes, and its share of
/// the training time.
#[derive(Debug, Clone)]
struct StageKind {
    name: String,
    mask_ratio: f64,
    routing: Option<Routing>,
    share: f64,
}

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub out: PathBuf,
    /// Wall-clock budget for the whole run, data and evaluation included.
    pub minutes: f64,
    pub variant: Variant,
    /// Side of the generated images in pixels ([`DEFAULT_IMAGE_SIZE`] unless told).
    pub image_size: usize,
    pub train_images: usize,
    /// Prompts sampled per group (seen and held-out combinations).
    pub eval_prompts: usize,
    pub seed: u64,
    pub quiet: bool,
    /// How the scored samples are drawn ([`DemoOptions::default_sampling`] unless told).
    pub sampling: Sampling,
    /// The denoiser's architecture, [`default_model`] unless told.
    pub model: Option<DitConfig>,
}

impl DemoOptions {
    /// The demo's sampler: 18 Heun steps at guidance 5.
    pub fn default_sampling() -> Sampling {
        Sampling::heun(SAMPLER_STEPS, GUIDANCE)
    }

    /// Prompts per group for a budget of `minutes`: [`EVAL_PROMPTS`] from ten minutes up,
    /// fewer in shorter runs so that scoring stays about a twentieth of the budget.
    pub fn default_eval_prompts(minutes: f64) -> usize {
        ((minutes * EVAL_PROMPTS as f64 / 10.0).round() as usize)
            .clamp(MIN_EVAL_PROMPTS, EVAL_PROMPTS)
    }
}

/// Images of 16 px: at 32 px the model did not learn shapes in ten minutes (nor in 30), at
/// 16 px it began to (docs/DEMO.md, "Shapes: the image's size, …").
pub const DEFAULT_IMAGE_SIZE: usize = 16;
const MIN_IMAGE_SIZE: usize = 16;
/// 1,024 patches at 64 px: beyond that a CPU step takes seconds.
const MAX_IMAGE_SIZE: usize = 64;
const CODEC: SpaceToDepth = SpaceToDepth { factor: 2 };
/// Files in the demo folder: the denoiser's architecture, the options the folder was made
/// with, and the text tower.
const MODEL: &str = "dit.json";
const MADE: &str = "demo.json";
const TEXT_TOWER: &str = "text-tower";
const TEXT_WIDTH: usize = 64;
/// Caption tokens: the longest caption ("a yellow circle left of a purple triangle") is 10
/// with its start and end, and the denoiser attends to every position, so CLIP's 77 would
/// make caption tokens most of a masked step's work (docs/DEMO.md).
const TEXT_CONTEXT: usize = 16;
/// Images per step for each replica (one per CPU thread, so the global batch is this times
/// the replicas), and the peak learning rate (AdamW, warm-up then cosine decay): 2e-3
/// followed the captions better than 1e-3 in a measured comparison (docs/DEMO.md).
const REPLICA_BATCH: usize = 32;
const LR: f64 = 2e-3;
/// MicroDiT's share of patches masked in the first stage.
const MASK_RATIO: f64 = 0.75;
/// Share of the training time given to the unmasked finetune after a masked stage: 60%
/// drew shapes better than 40% on each of three seeds, and 40% better than 20%, in
/// measured comparisons (docs/DEMO.md).
const FINETUNE_SHARE: f64 = 0.6;
/// Share of the budget kept for the final sampling and scoring until a part-way scoring has
/// been timed.
const EVAL_SHARE: f64 = 0.12;
/// Where in the first stage (shares of its planned steps) the model is scored part-way,
/// besides the end of every stage.
const CURVE_POINTS: [f64; 2] = [1.0 / 3.0, 2.0 / 3.0];
/// The part-way scorings sample the final scoring's prompts divided by this: enough to
/// show the curve's trend, in a quarter of the time.
const PART_WAY_PROMPTS_DIVISOR: usize = 4;
/// Files in the demo folder: the adherence curve and its plot.
const CURVE: &str = "curve.json";
const CURVE_PLOT: &str = "adherence.png";
/// The weights' exponential average forgets half of itself in this share of a stage's
/// planned steps (EDM's half-life is a share of training, too); samples use the average.
const EMA_HALF_LIFE: f64 = 0.1;
/// The EDM loss's noise levels: ln σ ~ N(P_MEAN, P_STD²), MicroDiT's; EDM's −1.2 for
/// 32 px images trains the high noise levels too little here (docs/DEMO.md).
const P_MEAN: f64 = -0.6;
const P_STD: f64 = 1.2;
/// The scored samples: 18 Heun steps at guidance 5 (MicroDiT's own default), which drew
/// shapes better than 3 on the same weights (docs/DEMO.md).
const SAMPLER_STEPS: usize = 18;
const GUIDANCE: f64 = 5.0;
/// Side in pixels of each image in `samples.png` (enlarged without smoothing).
const GRID_CELL: u32 = 128;
/// Prompts per group scored at the end of a run of ten minutes or more: with 192 a
/// group's accuracy is within about ±4 points (a count's, about a quarter of the prompts,
/// ±7); with 48 the same weights scored up to 13 points apart on another draw of prompts
/// (docs/DEMO.md). Shorter runs score fewer, at least [`MIN_EVAL_PROMPTS`].
const EVAL_PROMPTS: usize = 192;
const MIN_EVAL_PROMPTS: usize = 48;
/// Prompts sampled together when scoring.
const EVAL_BATCH: usize = 16;

/// The steps chosen for the budget, saved so that a resumed run keeps them.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Plan {
    stages: Vec<PlannedStage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PlannedStage {
    name: String,
    steps: usize,
}

/// What a finished stage did, for the report.
struct TrainedStage {
    dir: PathBuf,
    steps: usize,
    sparsity: Sparsity,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Scores {
    pub accuracy: Vec<Accuracy>,
    pub frechet_distance: f64,
    pub frechet_distance_between_real_sets: f64,
    pub scorer_accuracy_on_real_images: f64,
}

/// The demo on `devices`: one replica of the denoiser each while training (data-parallel,
/// one thread each on the CPU), the first alone for everything else.
pub fn run<B: AutodiffBackend>(opts: &DemoOptions, devices: &[B::Device]) -> Result<Scores> {
    let device = devices.first().context("no device given")?;
    let budget = Budget::starting_now(opts.minutes);
    check_image_size(opts)?;
    check_folder(opts)?;
    pipeline_components(opts.image_size).write(&opts.out)?;
    let tower = opts.out.join(TEXT_TOWER);
    let data = opts.out.join("data");
    if !data.join("index.json").exists() {
        write_images(opts)?;
        let encoders = Encoders {
            text: text_tower::<B::InnerBackend>(&tower, opts.seed, device)?,
            images: LatentCodec::SpaceToDepth(CODEC),
        };
        let source = ImageCaptionSource::open(&opts.out.join("images"))?;
        let options = PrecomputeOptions {
            resolutions: vec![opts.image_size],
            min_size: opts.image_size,
            batch_size: 256,
            part_size: 2000,
            quiet: opts.quiet,
            ..Default::default()
        };
        eprintln!("precomputing {} pairs", source.len());
        precompute(&source, &data, &encoders, &options, device)?;
    }
    let stages = stage_configs::<B>(opts, &data, &budget, devices)?;
    let curve_path = opts.out.join(CURVE);
    let mut curve = Curve::load(&curve_path)?;
    let mut trained = Vec::new();
    let mut steps_before = 0;
    let depth = dit_config(opts)?.depth;
    for (k, stage) in stages.iter().enumerate() {
        let sparsity = stage.cfg.sparsity(depth)?;
        eprintln!(
            "stage {}: {} steps planned, mask ratio {}{}",
            k + 1,
            stage.cfg.steps,
            stage.cfg.mask_ratio,
            routing_note(sparsity.route)
        );
        // Re-read at every pause: the final scoring's reserve shrinks once it is timed.
        let deadline = || budget.stage_deadline(&stages, k);
        let pauses: Vec<usize> = match k {
            0 => CURVE_POINTS
                .iter()
                .map(|f| (f * stage.cfg.steps as f64) as usize)
                .collect(),
            _ => Vec::new(),
        };
        let last_stage = k + 1 == stages.len();
        let summary = train_stage::<B>(opts, stage, deadline, &pauses, devices, |step| {
            // The last stage's end is scored in full below.
            if (last_stage && !pauses.contains(&step)) || curve.has(steps_before + step) {
                return Ok(());
            }
            let prompts = (opts.eval_prompts / PART_WAY_PROMPTS_DIVISOR).max(1);
            let began = Instant::now();
            let scores = evaluate::<B::InnerBackend>(opts, &stage.dir, prompts, None, device)?;
            budget.scored(began.elapsed().as_secs_f64(), prompts, opts.eval_prompts);
            curve.record(curve_point(
                &stage.dir,
                steps_before + step,
                prompts,
                scores,
            ));
            curve.save(&curve_path)
        })?;
        steps_before += summary.step;
        trained.push(TrainedStage {
            dir: stage.dir.clone(),
            steps: summary.step,
            sparsity,
        });
        crate::train::plot::plot(
            &stage.dir,
            &opts.out.join(format!("loss-stage{}.png", k + 1)),
        )?;
    }
    let last = stages.last().context("no stages")?;
    let grid = opts.out.join("samples.png");
    let scores =
        evaluate::<B::InnerBackend>(opts, &last.dir, opts.eval_prompts, Some(&grid), device)?;
    curve.record(curve_point(
        &last.dir,
        steps_before,
        opts.eval_prompts,
        scores.clone(),
    ));
    curve.save(&curve_path)?;
    curve.plot(&opts.out.join(CURVE_PLOT))?;
    write_report(opts, &trained, &scores, &curve, budget.elapsed())?;
    Ok(scores)
}

/// A size the shapes fit in (three small copies apart, sides of the image) and the codec
/// divides.
fn check_image_size(opts: &DemoOptions) -> Result<()> {
    let size = opts.image_size;
    anyhow::ensure!(
        (MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&size) && size.is_multiple_of(CODEC.factor),
        "image size {size}: the demo draws images of {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} px, \
         a multiple of {}",
        CODEC.factor
    );
    Ok(())
}

/// The options a demo folder's images, text tower, shards and evaluation prompts are made
/// from (`demo.json`): a re-run with others would mix two demos in one folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Made {
    image_size: usize,
    train_images: usize,
    seed: u64,
}

impl Made {
    fn of(opts: &DemoOptions) -> Self {
        Self {
            image_size: opts.image_size,
            train_images: opts.train_images,
            seed: opts.seed,
        }
    }

    fn options(&self) -> String {
        format!(
            "--image-size {} --train-images {} --seed {}",
            self.image_size, self.train_images, self.seed
        )
    }
}

/// The folder's own options and architecture when it holds a demo already (its
/// `demo.json` and `dit.json`): checked before anything is written, so that a re-run with
/// other options neither overwrites those files nor meets data or checkpoints made for
/// others. A new folder gets its `demo.json` here.
fn check_folder(opts: &DemoOptions) -> Result<()> {
    let resume = "resume it with the options it was made with, or give another --out";
    let file = opts.out.join(MADE);
    let asked = Made::of(opts);
    let new_folder = !file.is_file();
    if !new_folder {
        let made: Made = crate::io::read_json(&file, "a microdit demo.json")?;
        anyhow::ensure!(
            made == asked,
            "{} holds a demo made with {} ({resume})",
            opts.out.display(),
            made.options()
        );
    }
    let model = opts.out.join(MODEL);
    if model.is_file() {
        let made: DitConfig = crate::io::read_json(&model, "a DiT config")?;
        anyhow::ensure!(
            made == dit_config(opts)?,
            "{} holds a demo of another architecture (its {MODEL}; another --model or \
             --variant): {resume}",
            opts.out.display()
        );
    }
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    if new_folder {
        crate::io::write_atomic(&file, |f| {
            serde_json::to_writer_pretty(f, &asked).map_err(std::io::Error::other)
        })?;
    }
    Ok(())
}

/// The wall clock of one demo run: when it ends, how long the final sampling and scoring
/// will take (a share of the budget at first, then timed from the part-way scorings), and
/// the training time spent so far.
struct Budget {
    start: Instant,
    end: Instant,
    final_scoring: Cell<f64>,
    /// When the first stage asked for its deadline.
    training_began: Cell<Option<Instant>>,
    /// Seconds of part-way scoring since, which are not training time, and the last one's.
    part_way_scoring: Cell<f64>,
    last_part_way_scoring: Cell<f64>,
}

impl Budget {
    fn starting_now(minutes: f64) -> Self {
        let seconds = minutes.max(0.0) * 60.0;
        let start = Instant::now();
        Self {
            start,
            end: start + Duration::from_secs_f64(seconds),
            final_scoring: Cell::new(EVAL_SHARE * seconds),
            training_began: Cell::new(None),
            part_way_scoring: Cell::new(0.0),
            last_part_way_scoring: Cell::new(0.0),
        }
    }

    fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Seconds left for training.
    fn training_left(&self) -> f64 {
        let left = self
            .end
            .saturating_duration_since(Instant::now())
            .as_secs_f64();
        (left - self.final_scoring.get()).max(0.0)
    }

    /// When stage `k` should end (asked at its start and again at each pause).
    fn stage_deadline(&self, stages: &[Stage], k: usize) -> Instant {
        let now = Instant::now();
        let began = self.training_began.get().unwrap_or(now);
        self.training_began.set(Some(began));
        let spent = (now - began).as_secs_f64() - self.part_way_scoring.get();
        // Every stage but the last is scored at its end, after its deadline and before the
        // next stage starts: that time is not the next stage's to train.
        let scorings_ahead = (stages.len() - 1 - k) as f64 * self.last_part_way_scoring.get();
        let left = (self.training_left() - scorings_ahead).max(0.0);
        let shares: Vec<f64> = stages.iter().map(|s| s.share).collect();
        let seconds = seconds_to_stage_end(spent, left, &shares, k);
        now + Duration::from_secs_f64(seconds)
    }

    /// A part-way scoring of `prompts` prompts per group took `seconds`: the final one, of
    /// `final_prompts`, will take about as much per prompt (a tenth more for safety).
    fn scored(&self, seconds: f64, prompts: usize, final_prompts: usize) {
        self.part_way_scoring
            .set(self.part_way_scoring.get() + seconds);
        self.last_part_way_scoring.set(seconds);
        let seconds = 1.1 * seconds * final_prompts as f64 / prompts.max(1) as f64;
        self.final_scoring.set(seconds);
    }
}

/// Seconds from now until stage `k` ends, when training has taken `spent` seconds and has
/// `left` more: the whole training time is shared out by the stages' `shares`, so a stage
/// that asks again part-way keeps its share of the whole, not of what is left.
fn seconds_to_stage_end(spent: f64, left: f64, shares: &[f64], k: usize) -> f64 {
    let total: f64 = shares.iter().sum();
    let through_k: f64 = shares[..=k].iter().sum();
    ((spent + left) * through_k / total.max(1e-9) - spent).max(0.0)
}

/// One training stage of the demo: its run folder, config, and share of the training time.
struct Stage {
    dir: PathBuf,
    cfg: TrainConfig,
    share: f64,
}

/// Trains a stage to its deadline (asked again after each pause), pausing at `pauses`
/// (steps) to call `at_pause` with the step, and once more with the final step.
fn train_stage<B: AutodiffBackend>(
    opts: &DemoOptions,
    stage: &Stage,
    deadline: impl Fn() -> Instant,
    pauses: &[usize],
    devices: &[B::Device],
    mut at_pause: impl FnMut(usize) -> Result<()>,
) -> Result<Summary> {
    let done = crate::train::stages::steps_done(&stage.dir);
    let mut pauses = pauses.iter().copied().filter(|&p| p > done);
    loop {
        let pause_after = pauses.next();
        let run_opts = RunOptions {
            resume: true,
            quiet: opts.quiet,
            deadline: Some(deadline()),
            pause_after,
            ..Default::default()
        };
        let summary = train_data_parallel::<B>(&stage.cfg, &stage.dir, &run_opts, devices)?;
        let finished = summary.step >= summary.planned_steps;
        if !finished && Some(summary.step) != pause_after {
            anyhow::bail!(
                "interrupted at step {}: run the demo again with the same --out to continue",
                summary.step
            );
        }
        at_pause(summary.step)?;
        if finished {
            return Ok(summary);
        }
    }
}

fn curve_point(stage: &Path, step: usize, prompts: usize, scores: Scores) -> CurvePoint {
    CurvePoint {
        stage: stage
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        step,
        prompts,
        accuracy: scores.accuracy,
    }
}

/// Training pairs as PNG + caption files, the input `precompute` expects.
fn write_images(opts: &DemoOptions) -> Result<()> {
    let dir = opts.out.join("images");
    std::fs::create_dir_all(&dir)?;
    (0..opts.train_images).into_par_iter().try_for_each(|i| {
        let (scene, image) = scene_and_image(opts.seed, i, opts.image_size, false);
        let path = dir.join(format!("{i:06}.png"));
        let size = opts.image_size;
        crate::image::write_png(&path, image.as_raw(), size, size, &[])?;
        std::fs::write(path.with_extension("txt"), scene.caption())?;
        anyhow::Ok(())
    })
}

/// A small CLIP-architecture text tower with random, frozen weights (the real tokenizer),
/// saved as an open_clip directory the first time so that every later step encodes with
/// the same weights.
fn text_tower<B: Backend>(dir: &Path, seed: u64, device: &B::Device) -> Result<TextEncoder<B>> {
    let weights = dir.join("open_clip_model.safetensors");
    if !weights.exists() {
        B::seed(device, seed);
        let cfg = ClipTextConfig {
            context_length: TEXT_CONTEXT,
            vocab_size: 49408,
            width: TEXT_WIDTH,
            heads: 2,
            layers: 2,
            mlp_ratio: 4.0,
            quick_gelu: false,
        };
        let tower = ClipTextEncoder::<B>::new(&cfg, device);
        let config = serde_json::json!({"model_cfg": {"quick_gelu": false, "text_cfg": {
            "context_length": TEXT_CONTEXT, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 2,
            "layers": 2}}});
        crate::io::write_atomic(&dir.join("open_clip_config.json"), |f| {
            serde_json::to_writer_pretty(f, &config).map_err(std::io::Error::other)
        })?;
        crate::io::write_safetensors(&weights, &reference_tensors(&tower, &CLIP_TEXT_KEYS)?)?;
    }
    let hub = Hub::new(dir.to_path_buf(), true);
    TextEncoder::from_source(dir.to_str().context("path")?, &hub, device)
}

/// The demo's denoiser for `image_size` px images: a MicroDiT with a patch per latent pixel
/// (64 patches of 2×2 px at 16 px; patches of 2×2 latent pixels did not learn shapes,
/// docs/DEMO.md), width 64, four blocks with an expert-choice MoE every second, one
/// patch-mixer block.
pub fn default_model(image_size: usize) -> DitConfig {
    let depth = 4;
    DitConfig {
        input_size: image_size / CODEC.factor,
        patch_size: 1,
        in_channels: CODEC.channels(),
        dim: 64,
        depth,
        head_dim: 32,
        multiple_of: 32,
        caption_channels: TEXT_WIDTH,
        pos_interp_scale: 1.0,
        norm_eps: 1e-6,
        depth_init: true,
        qkv_multipliers: crate::model::config::linspace(0.5, 1.0, depth),
        ffn_multipliers: crate::model::config::linspace(0.5, 4.0, depth),
        use_patch_mixer: true,
        patch_mixer_depth: 1,
        patch_mixer_dim: 64,
        patch_mixer_qkv_ratio: 1.0,
        patch_mixer_mlp_ratio: 2.0,
        use_bias: false,
        num_experts: 4,
        expert_capacity: 2.0,
        experts_every_n: 2,
    }
}

/// The architecture trained: `--model`'s or the demo's, without its patch-mixer for the
/// variant that has none. Its input and caption sizes are the demo data's.
fn dit_config(opts: &DemoOptions) -> Result<DitConfig> {
    let mut cfg = match &opts.model {
        Some(model) => model.clone(),
        None => default_model(opts.image_size),
    };
    let data = (opts.image_size / CODEC.factor, CODEC.channels(), TEXT_WIDTH);
    anyhow::ensure!(
        (cfg.input_size, cfg.in_channels, cfg.caption_channels) == data,
        "the demo's data needs input_size {}, in_channels {} and caption_channels {}; the model \
         has {}, {} and {}",
        data.0,
        data.1,
        data.2,
        cfg.input_size,
        cfg.in_channels,
        cfg.caption_channels
    );
    if opts.variant == Variant::MaskedNoMixer {
        cfg.use_patch_mixer = false;
    }
    Ok(cfg)
}

fn train_config(
    opts: &DemoOptions,
    model: &Path,
    data: &Path,
    kind: &StageKind,
    steps: usize,
    replicas: usize,
) -> Result<TrainConfig> {
    let cfg = TrainConfig {
        model: model.display().to_string(),
        in_channels: Some(CODEC.channels()),
        data: vec![data.to_path_buf()],
        latents_column: Some(format!("latents_{}", opts.image_size)),
        mask_ratio: kind.mask_ratio,
        routing: kind.routing,
        steps,
        global_batch: REPLICA_BATCH * replicas,
        micro_batch: REPLICA_BATCH,
        lr: LR,
        warmup_steps: (steps / 10).min(100),
        alpha_f: 0.33,
        grad_clip: 1.0,
        seed: opts.seed,
        checkpoint_every: 100,
        keep_last: 2,
        ema_decay: Some(0.5f64.powf(1.0 / (EMA_HALF_LIFE * steps as f64).max(1.0))),
        p_mean: P_MEAN,
        p_std: P_STD,
        ..TrainConfig::default()
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The stages and their first plan of steps: chosen once from timed trial steps so that
/// training fits the budget left after the data, then read back from `plan.json`. (While
/// training, each stage re-plans its steps to its deadline from the pace it measures.)
fn stage_configs<B: AutodiffBackend>(
    opts: &DemoOptions,
    data: &Path,
    budget: &Budget,
    devices: &[B::Device],
) -> Result<Vec<Stage>> {
    let model = opts.out.join(MODEL);
    let dit = dit_config(opts)?;
    crate::io::write_atomic(&model, |f| {
        serde_json::to_writer_pretty(f, &dit).map_err(std::io::Error::other)
    })?;
    let kinds = opts.variant.stages();
    let plan_path = opts.out.join("plan.json");
    let plan: Plan = match std::fs::read(&plan_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).context("reading plan.json")?,
        Err(_) => {
            let per_step = kinds
                .iter()
                .map(|kind| time_step::<B>(opts, &model, data, kind, devices))
                .collect::<Result<Vec<f64>>>()?;
            let seconds = budget.training_left();
            let mut stages = Vec::new();
            for (kind, per_step) in kinds.iter().zip(per_step) {
                let steps = ((seconds * kind.share / per_step) as usize).max(20);
                eprintln!("{}: {per_step:.3} s per step → {steps} steps", kind.name);
                stages.push(PlannedStage {
                    name: kind.name.clone(),
                    steps,
                });
            }
            let plan = Plan { stages };
            crate::io::write_atomic(&plan_path, |f| {
                serde_json::to_writer_pretty(f, &plan).map_err(std::io::Error::other)
            })?;
            plan
        }
    };
    anyhow::ensure!(
        plan.stages
            .iter()
            .map(|s| &s.name)
            .eq(kinds.iter().map(|k| &k.name)),
        "plan.json was made for other stages (another variant?): remove the folder or pick another"
    );
    let mut runs = Vec::new();
    for (k, (planned, kind)) in plan.stages.iter().zip(&kinds).enumerate() {
        let dir = opts.out.join(format!("stage{}-{}", k + 1, planned.name));
        let cfg = train_config(opts, &model, data, kind, planned.steps, devices.len())?;
        runs.push((dir, cfg));
    }
    crate::train::stages::chain(&mut runs);
    Ok(runs
        .into_iter()
        .zip(&kinds)
        .map(|((dir, cfg), kind)| Stage {
            dir,
            cfg,
            share: kind.share,
        })
        .collect())
}

/// Seconds per training step, from a short throw-away run (the first step is not counted).
fn time_step<B: AutodiffBackend>(
    opts: &DemoOptions,
    model: &Path,
    data: &Path,
    kind: &StageKind,
    devices: &[B::Device],
) -> Result<f64> {
    let dir = opts.out.join("timing");
    let quiet = RunOptions {
        quiet: true,
        ..Default::default()
    };
    let mut elapsed = Vec::new();
    for steps in [1, 6] {
        let _ = std::fs::remove_dir_all(&dir);
        let t = Instant::now();
        let cfg = train_config(opts, model, data, kind, steps, devices.len())?;
        train_data_parallel::<B>(&cfg, &dir, &quiet, devices)?;
        elapsed.push(t.elapsed().as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(((elapsed[1] - elapsed[0]) / 5.0).max(1e-3))
}

/// The evaluation prompts: `prompts` with seen (colour, shape) combinations and as many
/// held out, each with the generator's own image for it (fewer prompts: the first of the
/// full set's).
fn eval_scenes(opts: &DemoOptions, prompts: usize) -> Vec<(bool, Scene, image::RgbImage)> {
    let seed = opts.seed.wrapping_add(1);
    let mut all = Vec::new();
    for held_out in [false, true] {
        for i in 0..prompts {
            let stream = i + if held_out { opts.eval_prompts } else { 0 };
            let (scene, image) = scene_and_image(seed, stream, opts.image_size, held_out);
            all.push((held_out, scene, image));
        }
    }
    all
}

/// What `microdit generate` needs to sample a model trained here (`pipeline.json`).
fn pipeline_components(image_size: usize) -> Components {
    Components {
        checkpoint: None,
        model: Some(MODEL.into()),
        vae: Some(CODEC.name()),
        text_encoder: Some(TEXT_TOWER.into()),
        resolution: Some(image_size),
        steps: Some(SAMPLER_STEPS),
        guidance: Some(GUIDANCE),
    }
}

/// Samples `prompts` evaluation prompts per group with a stage's newest weights, through
/// the same pipeline `microdit generate` builds from `pipeline.json`, scores the images,
/// and draws them beside real ones into `grid`.
fn evaluate<B: Backend>(
    opts: &DemoOptions,
    stage: &Path,
    prompts: usize,
    grid: Option<&Path>,
    device: &B::Device,
) -> Result<Scores> {
    let components = Components {
        checkpoint: Some(stage.display().to_string()),
        ..Components::default()
    }
    .or(Components::beside(stage)?.context("the demo folder has no pipeline.json")?);
    let parts = components.parts(Precision::F32)?;
    let pipeline = TextToImage::<B>::load(&parts, &Hub::new(opts.out.clone(), true), device)?;
    let sampling = &opts.sampling;
    let scenes = eval_scenes(opts, prompts);
    let bar = crate::progress::bar_unless(opts.quiet, scenes.len(), "scoring", "image");
    let mut generated = Vec::new();
    for (n, batch) in scenes.chunks(EVAL_BATCH).enumerate() {
        let captions: Vec<String> = batch.iter().map(|(_, scene, _)| scene.caption()).collect();
        let prompts: Vec<&str> = captions.iter().map(String::as_str).collect();
        let first = (n * EVAL_BATCH) as u64;
        let seeds: Vec<u64> = (0..batch.len() as u64)
            .map(|i| opts.seed + first + i)
            .collect();
        for image in pipeline.generate(&prompts, &seeds, sampling, |_| {})? {
            generated.push(image.to_rgb_image()?);
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    if let Some(grid) = grid {
        write_grid(grid, &scenes, &generated)?;
    }
    score(opts, &scenes, &generated)
}

fn score(
    opts: &DemoOptions,
    scenes: &[(bool, Scene, image::RgbImage)],
    generated: &[image::RgbImage],
) -> Result<Scores> {
    let (mut seen, mut held, mut real) = (Tally::default(), Tally::default(), Tally::default());
    for ((held_out, scene, reference), image) in scenes.iter().zip(generated) {
        let verdict = judge(scene, image);
        if *held_out {
            held.add(&verdict)
        } else {
            seen.add(&verdict)
        }
        real.add(&judge(scene, reference));
    }
    let accuracy = accuracies(&seen, &held);
    let real_features: Vec<Vec<f64>> = scenes.iter().map(|s| features(&s.2)).collect();
    let generated_features: Vec<Vec<f64>> = generated.iter().map(features).collect();
    // A second draw of real images for the same prompts: the distance's floor at this size.
    let other_real: Vec<Vec<f64>> = (0..scenes.len())
        .map(|i| {
            features(&scene_and_image(opts.seed.wrapping_add(2), i, opts.image_size, scenes[i].0).1)
        })
        .collect();
    Ok(Scores {
        accuracy,
        frechet_distance: frechet_distance(&real_features, &generated_features)?,
        frechet_distance_between_real_sets: frechet_distance(&real_features, &other_real)?,
        scorer_accuracy_on_real_images: real.overall(),
    })
}

/// Each prompt's generated image beside the generator's own, enlarged to [`GRID_CELL`] px.
fn write_grid(
    path: &Path,
    scenes: &[(bool, Scene, image::RgbImage)],
    generated: &[image::RgbImage],
) -> Result<()> {
    let size = GRID_CELL;
    let enlarge = |im: &image::RgbImage| {
        image::imageops::resize(im, size, size, image::imageops::FilterType::Nearest).into_raw()
    };
    let tiles: Vec<Vec<u8>> = scenes
        .iter()
        .zip(generated)
        .flat_map(|((_, _, real), fake)| [enlarge(fake), enlarge(real)])
        .collect();
    let refs: Vec<&[u8]> = tiles.iter().map(|t| t.as_slice()).collect();
    crate::image::write_grid(path, &refs, size as usize)
}

/// ", routing 50% past blocks 1..=2", or nothing.
fn routing_note(route: Option<RouteSpan>) -> String {
    route.map_or(String::new(), |span| {
        format!(
            ", routing {:.0}% past blocks {}..={}",
            100.0 * span.share,
            span.first_block,
            span.last_block
        )
    })
}

fn write_report(
    opts: &DemoOptions,
    trained: &[TrainedStage],
    scores: &Scores,
    curve: &Curve,
    seconds: f64,
) -> Result<()> {
    let mut md = format!(
        "# microdit demo: {:?}\n\nBudget {} min, this run {:.1} min. {} training images ({} px), {} \
         prompts per group.\n\n",
        opts.variant,
        opts.minutes,
        seconds / 60.0,
        opts.train_images,
        opts.image_size,
        opts.eval_prompts
    );
    for stage in trained {
        md += &format!(
            "- {}: {} steps, mask ratio {}{}\n",
            stage.dir.display(),
            stage.steps,
            stage.sparsity.mask_ratio,
            routing_note(stage.sparsity.route)
        );
    }
    let s = &opts.sampling;
    md += &format!(
        "- samples: {} {} steps ({} network evaluations), guidance {}\n",
        s.steps,
        s.sampler,
        s.evaluations(),
        s.guidance
    );
    md += "\n| attribute | seen combinations | held-out combinations | chance |\n| --- | ---: | ---: | ---: |\n";
    for a in &scores.accuracy {
        md += &format!(
            "| {} | {} | {} | {} |\n",
            a.attribute,
            percent(a.seen),
            percent(a.held_out),
            percent(Some(a.chance))
        );
    }
    md += &format!(
        "\nFréchet distance to the generator's images (scorer features): {:.4} (two draws of \
         real images: {:.4}). The scorer reads the generator's own images right {:.0}% of the \
         time.\n\n`samples.png`: each prompt's sample beside a real image for it (seen prompts \
         first, then held-out); `loss-stage*.png`: training losses.\n",
        scores.frechet_distance,
        scores.frechet_distance_between_real_sets,
        100.0 * scores.scorer_accuracy_on_real_images
    );
    let lines: Vec<String> = scores
        .accuracy
        .iter()
        .zip(LINE_COLOURS)
        .map(|(a, (colour, _))| format!("{} {colour}", a.attribute))
        .collect();
    md += &format!(
        "\n## Learning\n\nHeld-out accuracy as training went (`{CURVE}`; plotted in \
         `{CURVE_PLOT}`: {}, chance as faint lines; the points before the last are scored on \
         the first quarter of the prompts):\n\n{}",
        lines.join(", "),
        curve.table()
    );
    crate::io::write_atomic(&opts.out.join("report.md"), |f| {
        std::io::Write::write_all(f, md.as_bytes())
    })?;
    crate::io::write_atomic(&opts.out.join("report.json"), |f| {
        serde_json::to_writer_pretty(f, scores).map_err(std::io::Error::other)
    })?;
    eprintln!("{md}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::ClipTokenizer;

    #[test]
    fn every_caption_fits_the_text_towers_context() {
        use rand::SeedableRng;
        let tokenizer = ClipTokenizer::new().with_context_length(TEXT_CONTEXT);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        for k in 0..4000 {
            let caption = Scene::random(&mut rng, k % 2 == 0).caption();
            assert!(!tokenizer.tokenize(&caption).1, "{caption:?} is cut");
        }
    }

    #[test]
    fn short_runs_score_fewer_prompts() {
        let prompts = DemoOptions::default_eval_prompts;
        assert_eq!(prompts(10.0), EVAL_PROMPTS);
        assert_eq!(prompts(30.0), EVAL_PROMPTS);
        assert_eq!(prompts(3.0), 58);
        assert_eq!(prompts(1.0), MIN_EVAL_PROMPTS);
    }

    #[test]
    fn a_stage_keeps_its_share_of_the_whole_training_time() {
        let shares = [0.8, 0.2];
        // At the start: 80% of 300 s.
        assert_eq!(seconds_to_stage_end(0.0, 300.0, &shares, 0), 240.0);
        // Asked again after 100 s with 200 s left: it still ends at 240 s, not 100 + 160.
        assert_eq!(seconds_to_stage_end(100.0, 200.0, &shares, 0), 140.0);
        // The finetune gets the rest; a stage already past its end gets nothing more.
        assert_eq!(seconds_to_stage_end(250.0, 50.0, &shares, 1), 50.0);
        assert_eq!(seconds_to_stage_end(250.0, 50.0, &shares, 0), 0.0);
    }
}
