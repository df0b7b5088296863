//! The demo run, step by step, each step skipped when its output already exists (so a
//! stopped demo resumes): captioned shapes → a random CLIP-architecture text tower →
//! `precompute` (space-to-depth latents) → `train` (a masked stage with the patch-mixer,
//! then an unmasked finetune, or an ablation variant) → sampling held-out and seen prompts
//! → adherence scores, a Fréchet distance, a grid, loss plots and a report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::{AutodiffBackend, MicroditBackend};
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::budget::Budget;
use super::curve::{Curve, CurvePoint, CURVE, CURVE_PLOT};
use super::evaluation::{evaluate, Scores};
use super::options::{DemoOptions, StageKind, Variant, GUIDANCE, SAMPLER_STEPS};
use super::report::{routing_note, write_report, TrainedStage};
use super::shapes::{scene_and_image, Scene};
use crate::data::sources::ImageCaptionSource;
use crate::hub::Hub;
use crate::model::routing::Sparsity;
use crate::model::DitConfig;
use crate::pipeline::load::Components;
use crate::precompute::{precompute, Encoders, PrecomputeOptions};
use crate::state_dict::{reference_tensors, CLIP_TEXT_KEYS};
use crate::text::{ClipTextConfig, ClipTextEncoder, TextEncoder};
use crate::train::config::TrainConfig;
use crate::train::trainer::{train_data_parallel, RunOptions, Summary};
use crate::vae::{LatentCodec, SpaceToDepth};

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
/// Where in the first stage (shares of its planned steps) the model is scored part-way,
/// besides the end of every stage.
const CURVE_POINTS: [f64; 2] = [1.0 / 3.0, 2.0 / 3.0];
/// The part-way scorings sample the final scoring's prompts divided by this: enough to
/// show the curve's trend, in a quarter of the time.
const PART_WAY_PROMPTS_DIVISOR: usize = 4;
/// The weights' exponential average forgets half of itself in this share of a stage's
/// planned steps (EDM's half-life is a share of training, too); samples use the average.
const EMA_HALF_LIFE: f64 = 0.1;
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
    let shares: Vec<f64> = stages.iter().map(|s| s.share).collect();
    for (k, stage) in stages.iter().enumerate() {
        eprintln!(
            "stage {}: {} steps planned, mask ratio {}{}",
            k + 1,
            stage.cfg.steps,
            stage.cfg.mask_ratio,
            routing_note(stage.sparsity.route)
        );
        // Re-read at every pause: the final scoring's reserve shrinks once it is timed.
        let deadline = || budget.stage_deadline(&shares, k);
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
            sparsity: stage.sparsity,
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
        crate::io::write_json(&file, &asked)?;
    }
    Ok(())
}

/// One training stage of the demo: its run folder, config, and share of the training time.
struct Stage {
    dir: PathBuf,
    cfg: TrainConfig,
    share: f64,
    /// The config's masking and routing, checked against the model.
    sparsity: Sparsity,
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
        crate::png_io::write_png(&path, image.as_raw(), size, size, &[])?;
        std::fs::write(path.with_extension("txt"), scene.caption())?;
        anyhow::Ok(())
    })
}

/// A small CLIP-architecture text tower with random, frozen weights (the real tokenizer),
/// saved as an open_clip directory the first time so that every later step encodes with
/// the same weights.
fn text_tower<B: MicroditBackend>(
    dir: &Path,
    seed: u64,
    device: &B::Device,
) -> Result<TextEncoder<B>> {
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
        let tower = ClipTextEncoder::<B>::random(&cfg, device);
        let config = serde_json::json!({"model_cfg": {"quick_gelu": false, "text_cfg": {
            "context_length": TEXT_CONTEXT, "vocab_size": 49408, "width": TEXT_WIDTH, "heads": 2,
            "layers": 2}}});
        crate::io::write_json(&dir.join("open_clip_config.json"), &config)?;
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
        // The recipe's noise levels, MicroDiT's ln σ ~ N(−0.6, 1.2²): EDM's P_mean −1.2 for
        // 32 px images trained the high noise levels too little here (docs/DEMO.md).
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
    crate::io::write_json(&model, &dit)?;
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
            crate::io::write_json(&plan_path, &plan)?;
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
    runs.into_iter()
        .zip(&kinds)
        .map(|((dir, cfg), kind)| {
            Ok(Stage {
                sparsity: cfg.sparsity(dit.depth)?,
                dir,
                cfg,
                share: kind.share,
            })
        })
        .collect()
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

fn example_scene() -> Scene {
    use rand::SeedableRng;
    Scene::random(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0), false)
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
        // A caption of the kind the model trains on (a seen colour and shape).
        example_prompt: Some(example_scene().caption()),
    }
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

    /// The demo's random tower gives each caption its own states, on the scale of its
    /// final norm (a tower of zeros gave every caption the same zeros, and the demo learnt
    /// no prompt at all).
    #[test]
    fn the_random_text_tower_tells_captions_apart() {
        use crate::backend::{test_device, TestBackend};
        let dir = tempfile::tempdir().unwrap();
        let device = test_device();
        let tower = text_tower::<TestBackend>(dir.path(), 0, &device).unwrap();
        let captions = ["a small red circle", "three large blue squares on the left"];
        let states = tower.encode(&captions, &device).states;
        let [a, b] = [0, 1].map(|i| states.clone().narrow(0, i, 1));
        let rms = |t: burn::tensor::Tensor<TestBackend, 3>| {
            t.powf_scalar(2.0).mean().sqrt().into_scalar()
        };
        assert!(rms(a.clone()) > 0.5, "states of scale {}", rms(a.clone()));
        assert!(rms(a - b) > 0.1, "two captions encode alike");
    }
}
