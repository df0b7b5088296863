//! One image's latents from a caption embedding: seeded noise, the EDM sampler, guidance
//! (optionally only inside a noise-level window). Shared by `microdit generate` and the
//! training previews.

use crate::backend::Backend;
use burn::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{denoise, sample, Churn, EdmConfig, Guidance, Solver};
use crate::model::MicroDit;
use crate::random::standard_normal;

#[derive(Debug, Clone)]
pub struct SamplerSettings {
    pub sigmas: Vec<f64>,
    pub solver: Solver,
    pub churn: Churn,
    pub guidance: f64,
    /// Guide only while σ is within this range (Kynkäänniemi et al. 2024).
    pub guidance_interval: (f64, f64),
}

/// Latents [1, C, S, S] for caption embedding `y` [1, L, Cc], from ChaCha8(`seed`) noise
/// (the starting latents, then any churn noise). `on_eval` is called after each network
/// evaluation with the step index.
pub fn sample_latents<B: Backend>(
    model: &MicroDit<B>,
    edm: &EdmConfig,
    y: Tensor<B, 3>,
    shape: [usize; 4],
    seed: u64,
    settings: &SamplerSettings,
    mut on_step: impl FnMut(usize),
) -> Tensor<B, 4> {
    let device = y.device();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let latents: Tensor<B, 4> = standard_normal(&mut rng, shape, &device);
    let (lo, hi) = settings.guidance_interval;
    sample(
        latents,
        &settings.sigmas,
        settings.solver,
        settings.churn,
        |x, sigma| {
            let guidance = if (lo..=hi).contains(&sigma) {
                Guidance::from_scale(settings.guidance)
            } else {
                Guidance::None
            };
            denoise(
                model,
                edm,
                x,
                Tensor::from_floats([sigma as f32], &device),
                y.clone(),
                None,
                guidance,
            )
        },
        |_| standard_normal(&mut rng, shape, &device),
        &mut on_step,
    )
}

/// Network evaluations a sampler run makes: one per step, plus Heun's correction on every
/// step but the last.
pub fn evaluations(steps: usize, solver: Solver) -> usize {
    match solver {
        Solver::Euler => steps,
        Solver::Heun => (2 * steps).saturating_sub(1),
    }
}
