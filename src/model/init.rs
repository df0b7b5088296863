//! Parameter initialisation as the reference `DiT.initialize_weights` does it, drawn from a
//! seeded host-side generator so that a seed gives the same model on every backend.

use crate::backend::MicroditBackend;
use crate::nn::linear::{lazy_zeros, Int8Matrix, Linear};
use burn::module::{ModuleMapper, Param};
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

/// How far [`Perturb`] moves each layer's output for "random weights": enough that the
/// blocks' gates open and their products shape the output (at 0.25 the skip path carries
/// most of it: the experts' weights read in the wrong layout move it 0.4%; at 0.5, 1.4%),
/// little enough that deep stacks do not amplify every rounding into chaos (at 1.0 int8
/// alone moves the fixtures' small models 1.1%).
pub const RANDOM_WEIGHTS_NOISE: f64 = 0.5;

/// Adds seeded noise to every float parameter, N(0, scale² / fan-in) (a matrix's fan-in:
/// its elements per output), so that each layer's output moves by about `scale` whatever
/// its width: a model in which every layer acts (the reference zero-initialises the
/// modulations and the output layer, so a fresh model is the identity map), for measuring
/// numerics on random weights.
pub struct Perturb {
    rng: ChaCha8Rng,
    scale: f64,
}

impl Perturb {
    pub fn new(seed: u64, scale: f64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            scale,
        }
    }
}

impl<B: Backend> ModuleMapper<B> for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let dims = tensor.dims();
        let n = tensor.shape().num_elements();
        // Outputs: the last dimension of burn's [in, out] matrices and [n, in, out] stacks,
        // the first of PyTorch's [out, in, kh, kw] convolutions; vectors have fan-in 1.
        let outputs = match D {
            1 => n,
            4 => dims[0],
            _ => dims[D - 1],
        };
        let std = self.scale / ((n / outputs) as f64).sqrt();
        let noise: Vec<f32> = (0..n)
            .map(|_| (std * self.rng.sample::<f64, _>(StandardNormal)) as f32)
            .collect();
        let noise = Tensor::from_data(TensorData::new(noise, tensor.shape()), &tensor.device());
        Param::from_mapped_value(id, tensor + noise, mapper)
    }
}

/// Source of initial parameter values. `Init::empty` makes zeros that are allocated only
/// when read, for models whose weights are about to be loaded from a checkpoint (no time
/// spent drawing numbers, no memory held for values about to be replaced);
/// `Init::empty_int8` the same for a quantised model.
pub struct Init<'a, B: Backend> {
    device: &'a B::Device,
    rng: Option<ChaCha8Rng>,
    int8: bool,
}

impl<'a, B: MicroditBackend> Init<'a, B> {
    pub fn reference(seed: u64, device: &'a B::Device) -> Self {
        Self {
            device,
            rng: Some(ChaCha8Rng::seed_from_u64(seed)),
            int8: false,
        }
    }

    pub fn empty(device: &'a B::Device) -> Self {
        Self {
            device,
            rng: None,
            int8: false,
        }
    }

    /// Empty, with the products [`Self::quantizable_linear`] and [`Self::quantizable_stack`]
    /// make in int8.
    pub fn empty_int8(device: &'a B::Device) -> Self {
        Self {
            int8: true,
            ..Self::empty(device)
        }
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
        match self.rng {
            Some(_) => Param::from_tensor(self.tensor(shape, dist, fans)),
            None => lazy_zeros(shape, self.device),
        }
    }

    pub fn ones<const D: usize>(&self, shape: [usize; D]) -> Param<Tensor<B, D>> {
        Param::from_tensor(Tensor::ones(shape, self.device))
    }

    /// A linear layer `d_in -> d_out`; biases always start at zero in the reference.
    pub fn linear(&mut self, d_in: usize, d_out: usize, bias: bool, dist: Dist) -> Linear<B> {
        Linear::new(
            self.param([d_in, d_out], dist, (d_in, d_out)),
            bias.then(|| self.param([d_out], Dist::Zeros, (0, 0))),
        )
    }

    /// A linear layer that a quantised model holds in int8: the transformer blocks'
    /// products (attention, feed-forward, AdaLN modulation; the caption block's too), where
    /// the time and the weights are. The embedders, the experts' routers and the final layer
    /// stay [`Self::linear`]: small, and what every token's conditioning, every expert's
    /// choice or every output passes through.
    pub fn quantizable_linear(
        &mut self,
        d_in: usize,
        d_out: usize,
        bias: bool,
        dist: Dist,
    ) -> Linear<B> {
        match self.int8 {
            true => Linear::int8_zeros(d_in, d_out, bias, self.device),
            false => self.linear(d_in, d_out, bias, dist),
        }
    }

    /// A stack of `x @ w` matrices `[n, d_in, d_out]` (the experts' layers): in float, or
    /// in a quantised model in int8 as `n · d_out` rows of `d_in`.
    pub fn quantizable_stack(
        &mut self,
        shape: [usize; 3],
        dist: Dist,
    ) -> (Option<Param<Tensor<B, 3>>>, Option<Int8Matrix<B>>) {
        let [n, d_in, d_out] = shape;
        match self.int8 {
            true => (None, Some(Int8Matrix::zeros(n * d_out, d_in, self.device))),
            false => (Some(self.param(shape, dist, (0, 0))), None),
        }
    }
}
