//! Host-side random draws from generators the caller owns, so that a seed gives the same
//! numbers on every backend and a run can be replayed exactly.

use burn::prelude::*;
use rand::{Rng, RngExt};
use rand_distr::StandardNormal;

/// A tensor of standard normal draws, in row-major order.
pub fn standard_normal<B: Backend, const D: usize>(
    rng: &mut impl Rng,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// `n` uniform draws in [0, 1) (per-token noise that masking and routing sort).
pub fn uniform(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random::<f32>()).collect()
}
