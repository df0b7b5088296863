//! Samplers over the EDM denoiser on the Karras schedule: EDM's own (Karras et al. 2022,
//! Algorithm 2; NVlabs `edm_sampler`), Heun's 2nd-order method or plain Euler on the
//! probability-flow ODE with optional Langevin-like "churn", and DPM-Solver++(2M) with its
//! SDE form (`dpm_solver.rs`). The sampler is the scheduler, in diffusers' terms: it sees
//! the network only as `denoise(x, σ)`.

use burn::prelude::*;

use super::config::EdmConfig;
use super::dpm_solver::{dpm_solver_2m, dpm_solver_2m_sde};

/// Karras et al. eq. 5: `steps` noise levels from σ_max to σ_min evenly spaced in σ^(1/ρ),
/// then a final 0.
pub fn karras_sigmas(edm: &EdmConfig, steps: usize) -> Vec<f64> {
    let (lo, hi) = (
        edm.sigma_min.powf(1.0 / edm.rho),
        edm.sigma_max.powf(1.0 / edm.rho),
    );
    let denom = steps.saturating_sub(1).max(1) as f64;
    let mut sigmas: Vec<f64> = (0..steps)
        .map(|i| (hi + i as f64 / denom * (lo - hi)).powf(edm.rho))
        .collect();
    sigmas.push(0.0);
    sigmas
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Sampler {
    /// First order: one network call per step.
    #[serde(rename = "euler")]
    Euler,
    /// Second-order correction on every step but the last: two calls per step.
    #[serde(rename = "heun")]
    Heun,
    /// DPM-Solver++(2M) (Lu et al. 2022), k-diffusion's `sample_dpmpp_2m`: second order
    /// from the previous step's denoised estimate, one call per step.
    #[serde(rename = "dpmpp-2m")]
    #[value(name = "dpmpp-2m")]
    DpmSolver2M,
    /// Its stochastic form, k-diffusion's `sample_dpmpp_2m_sde` (η = 1, midpoint): fresh
    /// noise on every step but the last.
    #[serde(rename = "dpmpp-2m-sde")]
    #[value(name = "dpmpp-2m-sde")]
    DpmSolver2MSde,
}

impl std::fmt::Display for Sampler {
    /// The option name (`heun`, `dpmpp-2m`, …), as the command line, the API and PNGs
    /// spell it.
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        let value = clap::ValueEnum::to_possible_value(self).expect("no sampler is skipped");
        f.write_str(value.get_name())
    }
}

impl Sampler {
    /// Network calls for `steps` steps (Heun corrects every step but the last).
    pub fn evaluations(self, steps: usize) -> usize {
        match self {
            Self::Heun => (2 * steps).saturating_sub(1),
            Self::Euler | Self::DpmSolver2M | Self::DpmSolver2MSde => steps,
        }
    }

    /// Whether [`Churn`] applies (EDM's samplers only).
    pub fn churns(self) -> bool {
        matches!(self, Self::Euler | Self::Heun)
    }
}

/// Stochasticity (Karras et al. §4): at levels within [s_min, s_max], first raise the noise
/// from σ to σ(1 + γ), γ = min(s_churn / steps, √2 − 1), with fresh noise scaled by s_noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Churn {
    pub s_churn: f64,
    pub s_min: f64,
    pub s_max: f64,
    pub s_noise: f64,
}

impl Default for Churn {
    /// Deterministic sampling.
    fn default() -> Self {
        Self {
            s_churn: 0.0,
            s_min: 0.0,
            s_max: f64::INFINITY,
            s_noise: 1.0,
        }
    }
}

impl Churn {
    fn gamma(&self, sigma: f64, steps: usize) -> f64 {
        if self.s_churn > 0.0 && (self.s_min..=self.s_max).contains(&sigma) {
            (self.s_churn / steps as f64).min(std::f64::consts::SQRT_2 - 1.0)
        } else {
            0.0
        }
    }
}

/// Integrates from `latents` (standard normal, scaled here by σ_max) down to σ = 0.
/// `denoise(x, σ)` is the preconditioned model `D(x; σ)`; `noise(i)` gives step i's
/// standard normal draw (asked for only on steps that add noise: churn's, or the SDE's);
/// `on_step(i)` reports progress and returns whether to go on (a caller can stop early;
/// the latents so far come back).
pub fn sample<B: Backend>(
    latents: Tensor<B, 4>,
    sigmas: &[f64],
    sampler: Sampler,
    churn: Churn,
    denoise: impl FnMut(Tensor<B, 4>, f64) -> Tensor<B, 4>,
    noise: impl FnMut(usize) -> Tensor<B, 4>,
    on_step: impl FnMut(usize) -> bool,
) -> Tensor<B, 4> {
    let x = latents * sigmas[0];
    match sampler {
        Sampler::Euler | Sampler::Heun => {
            edm_sampler(x, sigmas, sampler, churn, denoise, noise, on_step)
        }
        Sampler::DpmSolver2M => dpm_solver_2m(x, sigmas, denoise, on_step),
        Sampler::DpmSolver2MSde => {
            dpm_solver_2m_sde(x, sigmas, churn.s_noise, denoise, noise, on_step)
        }
    }
}

/// EDM's Algorithm 2 from `x` at σ = sigmas[0].
fn edm_sampler<B: Backend>(
    mut x: Tensor<B, 4>,
    sigmas: &[f64],
    sampler: Sampler,
    churn: Churn,
    mut denoise: impl FnMut(Tensor<B, 4>, f64) -> Tensor<B, 4>,
    mut churn_noise: impl FnMut(usize) -> Tensor<B, 4>,
    mut on_step: impl FnMut(usize) -> bool,
) -> Tensor<B, 4> {
    let steps = sigmas.len() - 1;
    for i in 0..steps {
        let (t_cur, t_next) = (sigmas[i], sigmas[i + 1]);
        let t_hat = t_cur * (1.0 + churn.gamma(t_cur, steps));
        let x_hat = if t_hat > t_cur {
            x + churn_noise(i) * ((t_hat * t_hat - t_cur * t_cur).sqrt() * churn.s_noise)
        } else {
            x
        };
        let d_cur = (x_hat.clone() - denoise(x_hat.clone(), t_hat)) / t_hat;
        x = x_hat.clone() + d_cur.clone() * (t_next - t_hat);
        if sampler == Sampler::Heun && i < steps - 1 {
            let d_prime = (x.clone() - denoise(x.clone(), t_next)) / t_next;
            x = x_hat + (d_cur + d_prime) * (0.5 * (t_next - t_hat));
        }
        if !on_step(i) {
            break;
        }
    }
    x
}
