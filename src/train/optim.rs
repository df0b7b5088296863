//! Optimiser-step semantics the recipe relies on, as PyTorch defines them.

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{AdamW, AdamWConfig, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

/// `torch.nn.utils.clip_grad_norm_`: one norm over all gradients together, and every
/// gradient scaled by `max_norm / (norm + 1e-6)` when that is below 1. (burn's own
/// `GradientClipping::Norm` clips each tensor separately, which is a different function.)
/// Returns the norm before clipping.
pub fn clip_grad_norm<B: AutodiffBackend, M: AutodiffModule<B>>(
    model: &M,
    grads: &mut GradientsParams,
    max_norm: f64,
) -> f64 {
    let mut sum = SquaredNorm::<B> { grads, total: None };
    model.visit(&mut sum);
    let Some(total) = sum.total else { return 0.0 };
    let norm = total.sqrt().into_scalar().elem::<f64>();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        model.visit(&mut Scale::<B> {
            grads,
            coef,
            _b: Default::default(),
        });
    }
    norm
}

struct SquaredNorm<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    total: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(param.id) {
            let sq = g.powi_scalar(2).sum();
            self.total = Some(match self.total.take() {
                Some(t) => t + sq,
                None => sq,
            });
        }
    }
}

struct Scale<'a, B> {
    grads: &'a mut GradientsParams,
    coef: f64,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, g * self.coef);
        }
    }
}

/// `torch.optim.AdamW` hyper-parameters (note PyTorch's eps of 1e-8; burn defaults to 1e-5).
#[derive(Debug, Clone, Copy)]
pub struct AdamWSettings {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

impl AdamWSettings {
    /// burn's AdamW: decoupled decay `p *= 1 - lr·wd`, then `p -= lr · m̂ / (√v̂ + eps)`,
    /// the same update as PyTorch's.
    pub fn config(&self) -> AdamWConfig {
        AdamWConfig::new()
            .with_beta_1(self.beta1)
            .with_beta_2(self.beta2)
            .with_epsilon(self.eps)
            .with_weight_decay(self.weight_decay)
    }

    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
    ) -> burn::optim::adaptor::OptimizerAdaptor<AdamW, M, B> {
        self.config().init()
    }
}
