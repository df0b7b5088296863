//! AdaLN's per-sample modulation and gated residual of image tokens `[B, N, D]`, and
//! their backwards, as burn's operations: the default of [`MicroditBackend::modulate`] and
//! [`MicroditBackend::gated_residual`], and the reference their fused versions are tested against.
//! Each takes tensors of one float type (the model promotes them first).

use burn::tensor::ops::FloatTensor;
use burn::tensor::Tensor;

use super::{float, primitive, MicroditBackend};

/// A per-sample `t` [B, D] repeated for each of `n` tokens, [B, n, D] in memory.
/// Broadcasting it instead is slow on the CPU: burn-flex vectorises only broadcasts
/// shared by the whole batch and walks a per-sample one element by element, about ten
/// times slower than this copy plus a contiguous operation.
fn per_token<B: burn::tensor::backend::Backend>(t: Tensor<B, 2>, n: usize) -> Tensor<B, 3> {
    t.unsqueeze_dim::<3>(1).repeat_dim(1, n)
}

/// `x · (1 + scale) + shift`.
pub fn modulate_unfused<B: MicroditBackend>(
    x: FloatTensor<B>,
    shift: FloatTensor<B>,
    scale: FloatTensor<B>,
) -> FloatTensor<B> {
    let x = float::<B, 3>(x);
    let n = x.dims()[1];
    primitive(x * per_token(float(scale) + 1.0, n) + per_token(float(shift), n))
}

/// [`MicroditBackend::modulate_backward`]'s formulas.
pub fn modulate_backward_unfused<B: MicroditBackend>(
    x: FloatTensor<B>,
    scale: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> [FloatTensor<B>; 3] {
    let (x, grad) = (float::<B, 3>(x), float::<B, 3>(grad));
    let n = x.dims()[1];
    let dx = grad.clone() * per_token(float(scale) + 1.0, n);
    let d_shift = grad.clone().sum_dim(1).squeeze_dim::<2>(1);
    let d_scale = (grad * x).sum_dim(1).squeeze_dim::<2>(1);
    [primitive(dx), primitive(d_shift), primitive(d_scale)]
}

/// `x + gate · branch`.
pub fn gated_residual_unfused<B: MicroditBackend>(
    x: FloatTensor<B>,
    gate: FloatTensor<B>,
    branch: FloatTensor<B>,
) -> FloatTensor<B> {
    let branch = float::<B, 3>(branch);
    let n = branch.dims()[1];
    primitive(float::<B, 3>(x) + branch * per_token(float(gate), n))
}

/// [`MicroditBackend::gated_residual_backward`]'s formulas.
pub fn gated_residual_backward_unfused<B: MicroditBackend>(
    gate: FloatTensor<B>,
    branch: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> [FloatTensor<B>; 3] {
    let (branch, grad) = (float::<B, 3>(branch), float::<B, 3>(grad));
    let n = branch.dims()[1];
    let d_branch = grad.clone() * per_token(float(gate), n);
    let d_gate = (grad.clone() * branch).sum_dim(1).squeeze_dim::<2>(1);
    [primitive(grad), primitive(d_gate), primitive(d_branch)]
}
