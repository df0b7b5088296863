//! Element-wise activations and their backwards on f32 tensors, one pass each over chunks
//! of the elements on rayon's pool: SwiGLU's gated product `silu(gate) · value` (burn's
//! operations take three passes forward, the sigmoid's through libm's scalar `expf`, and
//! their backwards five more) and exact GELU (burn-flex's calls libm's scalar `erff`).

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;
use rayon::prelude::*;

use super::rows::{gelu_backward_row, gelu_row, swiglu_backward_row, swiglu_row};
use super::{f32_tensor, values};

/// Elements per task: large enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 1 << 14;

/// Whether the tensors are all f32 of one shape (what the kernels take).
pub fn fits(tensors: &[&FlexTensor]) -> bool {
    let shape = tensors[0].layout().shape();
    tensors
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.layout().shape() == shape)
}

fn tensor_like(like: &FlexTensor, data: Vec<f32>) -> FlexTensor {
    f32_tensor(data, like.layout().shape().clone())
}

/// `silu(gate) · value` for tensors that [`fit`](fits).
pub fn swiglu(gate: FlexTensor, value: FlexTensor) -> FlexTensor {
    let [gate, value] = [gate, value].map(|t| t.to_contiguous());
    let mut out = vec![0.0f32; gate.layout().num_elements()];
    out.par_chunks_mut(CHUNK)
        .zip(values(&gate).par_chunks(CHUNK))
        .zip(values(&value).par_chunks(CHUNK))
        .for_each(|((out, gate), value)| swiglu_row(gate, value, out));
    tensor_like(&gate, out)
}

/// `[d_gate, d_value]` for tensors that [`fit`](fits).
pub fn swiglu_backward(gate: FlexTensor, value: FlexTensor, grad: FlexTensor) -> [FlexTensor; 2] {
    let [gate, value, grad] = [gate, value, grad].map(|t| t.to_contiguous());
    let n = gate.layout().num_elements();
    let (mut d_gate, mut d_value) = (vec![0.0f32; n], vec![0.0f32; n]);
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_value.par_chunks_mut(CHUNK))
        .zip(values(&gate).par_chunks(CHUNK))
        .zip(values(&value).par_chunks(CHUNK))
        .zip(values(&grad).par_chunks(CHUNK))
        .for_each(|((((d_gate, d_value), gate), value), grad)| {
            swiglu_backward_row(gate, value, grad, d_gate, d_value)
        });
    [d_gate, d_value].map(|d| tensor_like(&gate, d))
}

/// `x·Φ(x)` for a tensor that [`fits`].
pub fn gelu(x: FlexTensor) -> FlexTensor {
    let x = x.to_contiguous();
    let mut out = vec![0.0f32; x.layout().num_elements()];
    out.par_chunks_mut(CHUNK)
        .zip(values(&x).par_chunks(CHUNK))
        .for_each(|(out, x)| gelu_row(x, out));
    tensor_like(&x, out)
}

/// GELU's `dx` for tensors that [`fit`](fits).
pub fn gelu_backward(x: FlexTensor, grad: FlexTensor) -> FlexTensor {
    let [x, grad] = [x, grad].map(|t| t.to_contiguous());
    let mut dx = vec![0.0f32; x.layout().num_elements()];
    dx.par_chunks_mut(CHUNK)
        .zip(values(&x).par_chunks(CHUNK))
        .zip(values(&grad).par_chunks(CHUNK))
        .for_each(|((dx, x), grad)| gelu_backward_row(x, grad, dx));
    tensor_like(&x, dx)
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::gelu;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};

    use crate::backend::gelu::{gelu_exact_backward_unfused, gelu_exact_unfused};
    use crate::backend::{gelu_exact, Cpu, MicroditBackend, Trainable};

    fn line(n: usize, from: f32, step: f32) -> Tensor<Cpu, 2> {
        let data = (0..n).map(|i| from + i as f32 * step).collect::<Vec<_>>();
        Tensor::from_data(TensorData::new(data, [n / 10, 10]), &Default::default())
    }

    fn max_difference(a: Tensor<Cpu, 2>, b: Tensor<Cpu, 2>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// The kernels against burn's GELU and the default backward's formula, on −8…8.
    #[test]
    fn gelu_and_its_gradient_equal_burns_operations() {
        let prim = |t: Tensor<Cpu, 2>| t.into_primitive().tensor();
        let float = |t| Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(t));
        let (x, grad) = (line(4000, -8.0, 0.004), line(4000, 1.0, -0.0005));
        let forward = float(Cpu::gelu_exact(prim(x.clone())));
        let burns = float(gelu_exact_unfused::<Cpu>(prim(x.clone())));
        assert!(max_difference(forward, burns) < 2e-6);
        let kernel = float(Cpu::gelu_exact_backward(
            prim(x.clone()),
            prim(grad.clone()),
        ));
        let formula = float(gelu_exact_backward_unfused::<Cpu>(prim(x), prim(grad)));
        assert!(max_difference(kernel, formula) < 2e-6);
    }

    /// The gradient autodiff takes through `gelu_exact` is the exact GELU's derivative: it
    /// matches central differences of burn's exact GELU (the tanh approximation's
    /// derivative, burn's default `gelu_backward`, is off by up to 1e-3 near |x| = 2).
    #[test]
    fn gelu_gradient_is_the_exact_derivative() {
        let x = line(600, -3.0, 0.01);
        let tracked = Tensor::<Trainable<Cpu>, 2>::from_inner(x.clone()).require_grad();
        let grads = gelu_exact(tracked.clone()).sum().backward();
        let autodiff = tracked.grad(&grads).unwrap();
        let h = 1e-2;
        let central = (gelu(x.clone() + h) - gelu(x - h)) / (2.0 * h);
        let err = max_difference(autodiff, central);
        assert!(err < 1e-4, "{err}");
    }
}
