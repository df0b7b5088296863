//! DPM-Solver++(2M) and its SDE form (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided
//! Sampling of Diffusion Probabilistic Models", Algorithm 2), step for step as k-diffusion's
//! `sample_dpmpp_2m` and `sample_dpmpp_2m_sde` (η = 1, midpoint) write them.
//!
//! Both integrate in log-σ time t = −ln σ, where the EDM/VE ODE is exactly solvable for a
//! denoised estimate held constant over a step: x' = (σ'/σ) x + (1 − e^{−h}) D, h = t' − t.
//! The multistep correction replaces D by a linear extrapolation from the previous step's
//! estimate, D + (D − D_prev)/(2r), r = h_prev/h, so one network call per step gives second
//! order. The first step has no previous estimate, and the last step (to σ = 0) returns
//! the denoised estimate itself. Coefficients are computed in f64 on the host.

use burn::prelude::*;

/// One step's coefficients: the new state is `x_scale · x + d_scale · D + old_scale · D_prev`
/// (plus `noise_scale · z` for the SDE).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepCoefficients {
    pub x_scale: f64,
    pub d_scale: f64,
    pub old_scale: f64,
    pub noise_scale: f64,
}

impl StepCoefficients {
    /// The step to σ = 0: the denoised estimate.
    const DENOISED: Self = Self {
        x_scale: 0.0,
        d_scale: 1.0,
        old_scale: 0.0,
        noise_scale: 0.0,
    };

    /// DPM-Solver++(2M) from `sigmas[i]` to `sigmas[i + 1]`; `multistep`: a previous
    /// estimate (from `sigmas[i - 1]`) exists.
    pub fn ode(sigmas: &[f64], i: usize, multistep: bool) -> Self {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        if s_next == 0.0 {
            return Self::DENOISED;
        }
        let h = (s / s_next).ln();
        let gain = -(-h).exp_m1();
        let (d, old) = if multistep {
            let r = (sigmas[i - 1] / s).ln() / h;
            (1.0 + 1.0 / (2.0 * r), -1.0 / (2.0 * r))
        } else {
            (1.0, 0.0)
        };
        Self {
            x_scale: s_next / s,
            d_scale: gain * d,
            old_scale: gain * old,
            noise_scale: 0.0,
        }
    }

    /// DPM-Solver++(2M) SDE (η = 1, midpoint), fresh noise scaled by `s_noise`.
    pub fn sde(sigmas: &[f64], i: usize, multistep: bool, s_noise: f64) -> Self {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        if s_next == 0.0 {
            return Self::DENOISED;
        }
        let h = (s / s_next).ln();
        // η = 1: the step's exponent doubles (−h − ηh).
        let gain = -(-2.0 * h).exp_m1();
        let correction = if multistep {
            let r = (sigmas[i - 1] / s).ln() / h;
            0.5 * gain / r
        } else {
            0.0
        };
        Self {
            x_scale: s_next / s * (-h).exp(),
            d_scale: gain + correction,
            old_scale: -correction,
            noise_scale: s_next * gain.sqrt() * s_noise,
        }
    }

    fn apply<B: Backend>(
        &self,
        x: Tensor<B, 4>,
        denoised: &Tensor<B, 4>,
        old: Option<&Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        if *self == Self::DENOISED {
            return denoised.clone();
        }
        let mut next = x * self.x_scale + denoised.clone() * self.d_scale;
        if let Some(old) = old.filter(|_| self.old_scale != 0.0) {
            next = next + old.clone() * self.old_scale;
        }
        next
    }
}

/// DPM-Solver++(2M) from `x` at σ = sigmas[0] down to the last σ (0).
pub fn dpm_solver_2m<B: Backend>(
    x: Tensor<B, 4>,
    sigmas: &[f64],
    denoise: impl FnMut(Tensor<B, 4>, f64) -> Tensor<B, 4>,
    on_step: impl FnMut(usize) -> bool,
) -> Tensor<B, 4> {
    multistep(x, sigmas, denoise, on_step, |i, multistep| {
        (StepCoefficients::ode(sigmas, i, multistep), None)
    })
}

/// DPM-Solver++(2M) SDE; `noise(i)` is step i's standard normal draw (every step but the
/// last to σ = 0).
pub fn dpm_solver_2m_sde<B: Backend>(
    x: Tensor<B, 4>,
    sigmas: &[f64],
    s_noise: f64,
    denoise: impl FnMut(Tensor<B, 4>, f64) -> Tensor<B, 4>,
    mut noise: impl FnMut(usize) -> Tensor<B, 4>,
    on_step: impl FnMut(usize) -> bool,
) -> Tensor<B, 4> {
    multistep(x, sigmas, denoise, on_step, |i, multistep| {
        let c = StepCoefficients::sde(sigmas, i, multistep, s_noise);
        let z = (c.noise_scale != 0.0).then(|| noise(i));
        (c, z)
    })
}

/// The loop both share: denoise, step with `coefficients(i, multistep)` (and the noise
/// draw it returns, if any), keep the estimate for the next step.
fn multistep<B: Backend>(
    mut x: Tensor<B, 4>,
    sigmas: &[f64],
    mut denoise: impl FnMut(Tensor<B, 4>, f64) -> Tensor<B, 4>,
    mut on_step: impl FnMut(usize) -> bool,
    mut coefficients: impl FnMut(usize, bool) -> (StepCoefficients, Option<Tensor<B, 4>>),
) -> Tensor<B, 4> {
    let mut old: Option<Tensor<B, 4>> = None;
    for (i, &sigma) in sigmas[..sigmas.len() - 1].iter().enumerate() {
        let denoised = denoise(x.clone(), sigma);
        let (c, z) = coefficients(i, old.is_some());
        x = c.apply(x, &denoised, old.as_ref());
        if let Some(z) = z {
            x = x + z * c.noise_scale;
        }
        old = Some(denoised);
        if !on_step(i) {
            break;
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    /// k-diffusion's arithmetic, written out as its Python does it (t = −ln σ).
    fn reference_ode(sigmas: &[f64], i: usize, multistep: bool) -> (f64, f64, f64) {
        let t = |s: f64| -s.ln();
        let sigma_fn = |t: f64| (-t).exp();
        let (t0, t1) = (t(sigmas[i]), t(sigmas[i + 1]));
        let h = t1 - t0;
        let x = sigma_fn(t1) / sigma_fn(t0);
        let gain = -(-h).exp_m1();
        if !multistep {
            return (x, gain, 0.0);
        }
        let r = (t0 - t(sigmas[i - 1])) / h;
        (x, gain * (1.0 + 1.0 / (2.0 * r)), -gain / (2.0 * r))
    }

    #[test]
    fn ode_coefficients_are_k_diffusions() {
        let sigmas = [80.0, 20.0, 4.0, 0.5, 0.002, 0.0];
        for i in 0..4 {
            for multistep in [false, true] {
                if multistep && i == 0 {
                    continue;
                }
                let c = StepCoefficients::ode(&sigmas, i, multistep);
                let (x, d, old) = reference_ode(&sigmas, i, multistep);
                for (ours, theirs) in [(c.x_scale, x), (c.d_scale, d), (c.old_scale, old)] {
                    assert!((ours - theirs).abs() <= 1e-12 * theirs.abs().max(1.0));
                }
            }
        }
        assert_eq!(
            StepCoefficients::ode(&sigmas, 4, true),
            StepCoefficients::DENOISED
        );
    }

    #[test]
    fn sde_noise_keeps_the_marginal_variance_of_the_ode() {
        // With D = 0 and x ~ N(0, σ²), a step must leave x ~ N(0, σ'²): (σ'/σ e^{−h})² σ²
        // + σ'² (1 − e^{−2h}) = σ'².
        let sigmas = [10.0, 3.0, 0.0];
        let c = StepCoefficients::sde(&sigmas, 0, false, 1.0);
        let variance = (c.x_scale * sigmas[0]).powi(2) + c.noise_scale.powi(2);
        assert!((variance - sigmas[1] * sigmas[1]).abs() < 1e-12);
        assert_eq!(
            StepCoefficients::sde(&sigmas, 1, true, 1.0),
            StepCoefficients::DENOISED
        );
    }
}
