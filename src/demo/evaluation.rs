//! Scoring a demo model: prompts with seen and held-out (colour, shape) combinations sampled
//! through the pipeline `microdit generate` builds, each image judged against its caption,
//! a Fréchet distance to the generator's own images, and the samples beside real ones.

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

use super::options::DemoOptions;
use super::score::{accuracies, features, frechet_distance, judge, Accuracy, Tally};
use super::shapes::{scene_and_image, Scene};
use crate::backend::MicroditBackend;
use crate::hub::Hub;
use crate::pipeline::load::Components;
use crate::pipeline::TextToImage;

/// Side in pixels of each image in `samples.png` (enlarged without smoothing).
const GRID_CELL: u32 = 128;
/// Prompts sampled together when scoring.
const EVAL_BATCH: usize = 16;

/// A model's scores on one draw of prompts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scores {
    pub accuracy: Vec<Accuracy>,
    pub frechet_distance: f64,
    pub frechet_distance_between_real_sets: f64,
    pub scorer_accuracy_on_real_images: f64,
}

/// One scored prompt: its scene, whether its (colour, shape) combination was held out of
/// training, and the generator's own image of it.
pub(super) struct EvalPrompt {
    held_out: bool,
    scene: Scene,
    real: image::RgbImage,
}

/// The evaluation prompts: `prompts` with seen (colour, shape) combinations and as many
/// held out, each with the generator's own image for it (fewer prompts: the first of the
/// full set's).
pub(super) fn eval_prompts(opts: &DemoOptions, prompts: usize) -> Vec<EvalPrompt> {
    let seed = opts.seed.wrapping_add(1);
    let mut all = Vec::new();
    for held_out in [false, true] {
        for i in 0..prompts {
            let stream = i + if held_out { opts.eval_prompts } else { 0 };
            let (scene, real) = scene_and_image(seed, stream, opts.image_size, held_out);
            all.push(EvalPrompt {
                held_out,
                scene,
                real,
            });
        }
    }
    all
}

/// Samples `prompts` evaluation prompts per group with a stage's newest weights, through
/// the same pipeline `microdit generate` builds from `pipeline.json`, scores the images,
/// and draws them beside real ones into `grid`.
pub(super) fn evaluate<B: MicroditBackend>(
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
    let parts = components.parts(opts.dtype)?;
    let pipeline = TextToImage::<B>::load(&parts, &Hub::new(opts.out.clone(), true), device)?;
    let sampling = &opts.sampling;
    let scenes = eval_prompts(opts, prompts);
    let bar = crate::progress::bar_unless(opts.quiet, scenes.len(), "scoring", "image");
    let mut generated = Vec::new();
    for (n, batch) in scenes.chunks(EVAL_BATCH).enumerate() {
        let captions: Vec<String> = batch.iter().map(|p| p.scene.caption()).collect();
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
    scenes: &[EvalPrompt],
    generated: &[image::RgbImage],
) -> Result<Scores> {
    let (mut seen, mut held, mut real) = (Tally::default(), Tally::default(), Tally::default());
    for (prompt, image) in scenes.iter().zip(generated) {
        let verdict = judge(&prompt.scene, image);
        if prompt.held_out {
            held.add(&verdict)
        } else {
            seen.add(&verdict)
        }
        real.add(&judge(&prompt.scene, &prompt.real));
    }
    let accuracy = accuracies(&seen, &held);
    let real_features: Vec<Vec<f64>> = scenes.iter().map(|p| features(&p.real)).collect();
    let generated_features: Vec<Vec<f64>> = generated.iter().map(features).collect();
    // A second draw of real images for the same prompts: the distance's floor at this size.
    let other_real: Vec<Vec<f64>> = (0..scenes.len())
        .map(|i| {
            let held_out = scenes[i].held_out;
            features(&scene_and_image(opts.seed.wrapping_add(2), i, opts.image_size, held_out).1)
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
fn write_grid(path: &Path, scenes: &[EvalPrompt], generated: &[image::RgbImage]) -> Result<()> {
    let size = GRID_CELL;
    let enlarge = |im: &image::RgbImage| {
        image::imageops::resize(im, size, size, image::imageops::FilterType::Nearest).into_raw()
    };
    let tiles: Vec<Vec<u8>> = scenes
        .iter()
        .zip(generated)
        .flat_map(|(prompt, fake)| [enlarge(fake), enlarge(&prompt.real)])
        .collect();
    let refs: Vec<&[u8]> = tiles.iter().map(|t| t.as_slice()).collect();
    crate::png_io::write_grid(path, &refs, size as usize)
}
