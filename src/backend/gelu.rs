//! GELU with the exact error function (PyTorch's `F.gelu`, `approximate='none'`) and its
//! backward, as burn's operations: the default of [`MicroditBackend::gelu_exact`] and its backward,
//! and the reference the CPU kernels are tested against.
//!
//! `gelu(x) = x·Φ(x)` with `Φ(x) = ½(1 + erf(x/√2))`; its derivative is `Φ(x) + x·φ(x)`,
//! `φ(x) = e^(−x²/2)/√(2π)`. burn's own `gelu_backward` default (what its CUDA backend
//! runs) is the derivative of the tanh approximation instead, up to about 1e-3 off.

use std::f64::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

use burn::tensor::activation::gelu;
use burn::tensor::ops::FloatTensor;

use super::{flat, unflat, MicroditBackend};

/// `1/√(2π)`.
const FRAC_1_SQRT_2PI: f64 = 0.5 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2;

/// burn's exact GELU.
pub fn gelu_exact_unfused<B: MicroditBackend>(x: FloatTensor<B>) -> FloatTensor<B> {
    let (x, shape) = flat::<B>(x);
    unflat(gelu(x), shape)
}

/// `grad·(Φ(x) + x·φ(x))`.
pub fn gelu_exact_backward_unfused<B: MicroditBackend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let ((x, shape), (grad, _)) = (flat::<B>(x), flat::<B>(grad));
    let cdf = ((x.clone() * FRAC_1_SQRT_2).erf() + 1.0) * 0.5;
    let pdf = (x.clone().square() * -0.5).exp() * FRAC_1_SQRT_2PI;
    unflat(grad * (cdf + x * pdf), shape)
}
