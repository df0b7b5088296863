//! SwiGLU's gated product `silu(gate) · value` and its backward on f32 tensors, one pass
//! each over chunks of the elements on rayon's pool (burn's operations take three passes
//! forward, the sigmoid's through libm's scalar `expf`, and their backwards five more).

use burn::backend::flex::FlexTensor;
use burn::tensor::DType;
use rayon::prelude::*;

use super::rows::{swiglu_backward_row, swiglu_row};
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
pub fn forward(gate: FlexTensor, value: FlexTensor) -> FlexTensor {
    let [gate, value] = [gate, value].map(|t| t.to_contiguous());
    let mut out = vec![0.0f32; gate.layout().num_elements()];
    out.par_chunks_mut(CHUNK)
        .zip(values(&gate).par_chunks(CHUNK))
        .zip(values(&value).par_chunks(CHUNK))
        .for_each(|((out, gate), value)| swiglu_row(gate, value, out));
    tensor_like(&gate, out)
}

/// `[d_gate, d_value]` for tensors that [`fit`](fits).
pub fn backward(gate: FlexTensor, value: FlexTensor, grad: FlexTensor) -> [FlexTensor; 2] {
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
