//! LayerNorm over the last dimension with a learned scale and no shift (`nn.LayerNorm(…,
//! bias=False)`, and the q/k norms with a scale of ones), and its backward, as burn's
//! operations: the default of [`MicroditBackend::scaled_layer_norm`] and its backward, and the
//! reference the fused kernels are tested against.
//!
//! With `r = (var + ε)^-½` (biased variance), `x̂ = (x − mean)·r` and `h = grad·γ`, per row:
//! `y = x̂·γ`, `dx = r·(h − mean(h) − x̂·mean(h·x̂))`, and `dγ = Σ_rows grad·x̂`.

use burn::tensor::ops::{FloatTensor, ModuleOps};
use burn::tensor::{Shape, TensorMetadata};

use super::{float, primitive, MicroditBackend};

/// burn's layer norm without a shift.
pub fn scaled_layer_norm_unfused<B: MicroditBackend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    epsilon: f64,
) -> FloatTensor<B> {
    <B as ModuleOps<B>>::layer_norm(x, gamma, None, epsilon)
}

/// `[dx, dγ]` of [`scaled_layer_norm_unfused`] (see the module documentation).
pub fn scaled_layer_norm_backward_unfused<B: MicroditBackend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    grad: FloatTensor<B>,
    epsilon: f64,
) -> [FloatTensor<B>; 2] {
    let shape = x.shape();
    let dim = shape[shape.num_dims() - 1];
    let as_rows = |t: FloatTensor<B>| {
        let n = t.shape().num_elements();
        float::<B, 2>(B::float_reshape(t, Shape::new([n / dim, dim])))
    };
    let (x, grad) = (as_rows(x), as_rows(grad));
    let gamma = float::<B, 1>(gamma).unsqueeze_dim::<2>(0);
    let centered = x.clone() - x.mean_dim(1);
    let r = (centered.clone().square().mean_dim(1) + epsilon)
        .sqrt()
        .recip();
    let x_hat = centered * r.clone();
    let h = grad.clone() * gamma;
    let h_x_hat = (h.clone() * x_hat.clone()).mean_dim(1);
    let dx = (h.clone() - h.mean_dim(1) - x_hat.clone() * h_x_hat) * r;
    let d_gamma = (grad * x_hat).sum_dim(0).reshape([dim]);
    [B::float_reshape(primitive(dx), shape), primitive(d_gamma)]
}
