//! The samplers against k-diffusion's, step for step: `tests/fixtures/samplers/make.py`
//! runs `sample_heun`, `sample_euler`, `sample_dpmpp_2m` and `sample_dpmpp_2m_sde` on a
//! fixed analytic denoiser with fixed noise (see its header), in float64; `edm::sample`
//! runs the same in float32 here, on every `"kind": "sampler"` set found.

mod common;

use common::{assert_close, fixture_sets, to_vec, Cases};
use microdit::backend::{test_device, TestBackend};
use microdit::edm::{karras_sigmas, sample, Churn, EdmConfig, Sampler};

type B = TestBackend;

/// float32 against a float64 reference: the first step starts at σ_max = 80, so f32
/// rounding of x (~80) is ~5e-6 of an output of ~1 (the fixtures README allows 1e-3).
const TOL: f64 = 1e-4;

struct Set {
    name: String,
    cases: Cases,
    config: serde_json::Value,
}

fn sets() -> Vec<Set> {
    fixture_sets("sampler")
        .into_iter()
        .map(|dir| Set {
            name: dir.file_name().unwrap().to_string_lossy().into(),
            cases: Cases::open(&dir.join("cases.safetensors")),
            config: serde_json::from_str(
                &std::fs::read_to_string(dir.join("config.json")).unwrap(),
            )
            .unwrap(),
        })
        .collect()
}

impl Set {
    fn number(&self, key: &str) -> f64 {
        self.config[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: no {key}", self.name))
    }

    fn edm(&self) -> EdmConfig {
        EdmConfig {
            sigma_min: self.number("sigma_min"),
            sigma_max: self.number("sigma_max"),
            rho: self.number("rho"),
            ..EdmConfig::default()
        }
    }

    /// k-diffusion's noise levels, as the reference ran them.
    fn sigmas(&self) -> Vec<f64> {
        self.cases
            .values("sigmas")
            .iter()
            .map(|&s| s as f64)
            .collect()
    }

    fn samplers(&self) -> Vec<Sampler> {
        self.config["samplers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| serde_json::from_value(n.clone()).unwrap())
            .collect()
    }

    /// The fixture's denoiser: (x + σ² mean) / (1 + σ²) + 0.1 σ / (1 + σ) sin(x).
    fn run(&self, sampler: Sampler, sigmas: &[f64]) -> Vec<f32> {
        let dev = test_device();
        let mean = self.cases.tensor::<B, 4>("mean", &dev);
        let noise = self.cases.tensor::<B, 5>("noise", &dev);
        let mut asked = Vec::new();
        let out = sample(
            self.cases.tensor("latents", &dev),
            sigmas,
            sampler,
            Churn::default(),
            |x, s| {
                (x.clone() + mean.clone() * (s * s)) / (1.0 + s * s)
                    + x.sin() * (0.1 * s / (1.0 + s))
            },
            |i| {
                asked.push(i);
                let [_, b, c, h, w] = noise.dims();
                noise.clone().narrow(0, i, 1).reshape([b, c, h, w])
            },
            |_| true,
        );
        let steps = sigmas.len() - 1;
        let expected: Vec<usize> = match sampler {
            Sampler::DpmSolver2MSde => (0..steps - 1).collect(),
            _ => Vec::new(),
        };
        assert_eq!(asked, expected, "{}: {sampler:?} noise draws", self.name);
        to_vec(out)
    }
}

#[test]
fn karras_sigmas_are_k_diffusions() {
    for set in sets() {
        let steps = set.number("steps") as usize;
        let ours: Vec<f32> = karras_sigmas(&set.edm(), steps)
            .iter()
            .map(|&s| s as f32)
            .collect();
        assert_close(
            &format!("{}: sigmas", set.name),
            &ours,
            &set.cases.values("sigmas"),
            1e-6,
        );
    }
}

#[test]
fn every_sampler_matches_k_diffusion() {
    let mut seen = std::collections::BTreeSet::new();
    for set in sets() {
        let sigmas = set.sigmas();
        for sampler in set.samplers() {
            let out = set.run(sampler, &sigmas);
            let reference = set.cases.values(&format!("{}.out", name(sampler)));
            assert_close(
                &format!("{}: {}", set.name, name(sampler)),
                &out,
                &reference,
                TOL,
            );
            seen.insert(name(sampler));
        }
    }
    for sampler in <Sampler as clap::ValueEnum>::value_variants() {
        assert!(seen.contains(&name(*sampler)), "no set checks {sampler:?}");
    }
}

/// The tolerance tells samplers apart: on sets with several steps, EDM's first-order Euler
/// lands far more than the tolerance away from DPM-Solver++(2M).
#[test]
fn the_check_sees_a_first_order_step() {
    let mut checked = 0;
    for set in sets().into_iter().filter(|s| s.number("steps") >= 3.0) {
        let sigmas = set.sigmas();
        let euler = set.run(Sampler::Euler, &sigmas);
        let reference = set.cases.values("dpmpp-2m.out");
        assert!(
            common::rel_l2(&euler, &reference) > 100.0 * TOL,
            "{}",
            set.name
        );
        checked += 1;
    }
    assert!(checked > 0, "no set with 3 or more steps");
}

fn name(sampler: Sampler) -> String {
    sampler.to_string()
}
