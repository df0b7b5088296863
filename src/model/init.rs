//! Parameter initialisation as the reference `DiT.initialize_weights` does it, drawn from a
//! seeded host-side generator so that a seed gives the same model on every backend.

use burn::module::Param;
use burn::nn::Linear;
use burn::prelude::*;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// How a weight matrix starts.
#[derive(Debug, Clone, Copy)]
pub enum Dist {
    /// `nn.init.xavier_uniform_`: U(±sqrt(6 / (fan_in + fan_out))); the reference's base init.
    Xavier,
    /// `nn.init.normal_(std)`.
    Normal(f64),
    /// `nn.init.trunc_normal_(std)`, truncated at the absolute bounds ±2 as PyTorch does.
    TruncNormal(f64),
    Zeros,
}

/// Source of initial parameter values. `Init::empty` allocates zeros only, for models whose
/// weights are about to be loaded from a checkpoint (no time spent drawing numbers).
pub struct Init<'a, B: Backend> {
    device: &'a B::Device,
    rng: Option<ChaCha8Rng>,
}

impl<'a, B: Backend> Init<'a, B> {
    pub fn reference(seed: u64, device: &'a B::Device) -> Self {
        Self {
            device,
            rng: Some(ChaCha8Rng::seed_from_u64(seed)),
        }
    }

    pub fn empty(device: &'a B::Device) -> Self {
        Self { device, rng: None }
    }

    pub fn device(&self) -> &'a B::Device {
        self.device
    }

    /// A tensor of `shape` drawn from `dist`, with `fans` = (fan_in, fan_out) for Xavier.
    pub fn tensor<const D: usize>(
        &mut self,
        shape: [usize; D],
        dist: Dist,
        fans: (usize, usize),
    ) -> Tensor<B, D> {
        let n: usize = shape.iter().product();
        let Some(rng) = self.rng.as_mut().filter(|_| !matches!(dist, Dist::Zeros)) else {
            return Tensor::zeros(shape, self.device);
        };
        let values: Vec<f32> = match dist {
            Dist::Xavier => {
                let bound = (6.0 / (fans.0 + fans.1) as f64).sqrt();
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect()
            }
            Dist::Normal(std) => (0..n)
                .map(|_| (std * rng.sample::<f64, _>(StandardNormal)) as f32)
                .collect(),
            Dist::TruncNormal(std) => (0..n)
                .map(|_| loop {
                    let v = std * rng.sample::<f64, _>(StandardNormal);
                    if (-2.0..=2.0).contains(&v) {
                        break v as f32;
                    }
                })
                .collect(),
            Dist::Zeros => unreachable!("handled above"),
        };
        Tensor::from_data(TensorData::new(values, shape), self.device)
    }

    pub fn param<const D: usize>(
        &mut self,
        shape: [usize; D],
        dist: Dist,
        fans: (usize, usize),
    ) -> Param<Tensor<B, D>> {
        Param::from_tensor(self.tensor(shape, dist, fans))
    }

    pub fn ones<const D: usize>(&self, shape: [usize; D]) -> Param<Tensor<B, D>> {
        Param::from_tensor(Tensor::ones(shape, self.device))
    }

    /// A linear layer `d_in -> d_out`; biases always start at zero in the reference.
    pub fn linear(&mut self, d_in: usize, d_out: usize, bias: bool, dist: Dist) -> Linear<B> {
        Linear {
            weight: self.param([d_in, d_out], dist, (d_in, d_out)),
            bias: bias.then(|| self.param([d_out], Dist::Zeros, (0, 0))),
        }
    }
}
