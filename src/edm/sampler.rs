//! EDM samplers (Karras et al. 2022, Algorithm 2; NVlabs `edm_sampler`): Heun's 2nd-order
//! method (or plain Euler) on the probability-flow ODE, with optional Langevin-like "churn".

use burn::prelude::*;

use super::config::EdmConfig;

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
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Solver {
    /// First order: one network call per step.
    Euler,
    /// Second-order correction on every step but the last: two calls per step.
    Heun,
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
/// `denoise(x, σ)` is the preconditioned model `D(x; σ)`; `churn_noise(i)` gives step i's
/// standard normal draw (asked for only on steps that churn); `on_step(i)` reports progress
/// and returns whether to go on (a caller can stop early; the latents so far come back).
pub fn sample<B: Backend>(
    latents: Tensor<B, 4>,
    sigmas: &[f64],
    solver: Solver,
    churn: Churn,
    mut denoise: impl FnMut(Tensor<B, 4>, f64) -> Tensor<B, 4>,
    mut churn_noise: impl FnMut(usize) -> Tensor<B, 4>,
    mut on_step: impl FnMut(usize) -> bool,
) -> Tensor<B, 4> {
    let steps = sigmas.len() - 1;
    let mut x = latents * sigmas[0];
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
        if solver == Solver::Heun && i < steps - 1 {
            let d_prime = (x.clone() - denoise(x.clone(), t_next)) / t_next;
            x = x_hat + (d_cur + d_prime) * (0.5 * (t_next - t_hat));
        }
        if !on_step(i) {
            break;
        }
    }
    x
}
