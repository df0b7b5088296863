//! AdaLN's modulation and gated residual on f32 tokens `[B, N, D]` with per-sample
//! `[B, D]` vectors, one pass each way, one task per image. burn's operations repeat the
//! vectors over the tokens (a copy each), then multiply and add; their backwards add as
//! many passes and a sum over the tokens.

use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use super::{f32_tensor, values};

/// Tokens `[B, N, D]` and per-sample vectors `[B, D]`, all f32 (what the kernels take).
pub(super) struct Sizes {
    batch: usize,
    tokens: usize,
    dim: usize,
}

impl Sizes {
    /// The sizes when `tokens` are `[B, N, D]`, every `vectors` `[B, D]` and all f32.
    pub fn of(tokens: &[&FlexTensor], vectors: &[&FlexTensor]) -> Option<Self> {
        let all_f32 = tokens
            .iter()
            .chain(vectors)
            .all(|t| t.dtype() == DType::F32);
        let [batch, n, dim] = <[usize; 3]>::try_from(tokens[0].layout().shape().to_vec()).ok()?;
        let tokens_match = tokens
            .iter()
            .all(|t| t.layout().shape().to_vec() == [batch, n, dim]);
        let vectors_match = vectors
            .iter()
            .all(|t| t.layout().shape().to_vec() == [batch, dim]);
        (all_f32 && tokens_match && vectors_match).then_some(Self {
            batch,
            tokens: n,
            dim,
        })
    }

    fn image(&self) -> usize {
        self.tokens * self.dim
    }

    fn token_shape(&self) -> Shape {
        Shape::from(vec![self.batch, self.tokens, self.dim])
    }

    fn vector_shape(&self) -> Shape {
        Shape::from(vec![self.batch, self.dim])
    }
}

/// `x · (1 + scale) + shift` for tensors of these sizes.
pub fn modulate(sizes: Sizes, x: FlexTensor, shift: FlexTensor, scale: FlexTensor) -> FlexTensor {
    let [x, shift, scale] = [x, shift, scale].map(|t| t.to_contiguous());
    let (shift, scale) = (values(&shift), values(&scale));
    let mut out = vec![0.0f32; sizes.batch * sizes.image()];
    out.par_chunks_mut(sizes.image())
        .zip(values(&x).par_chunks(sizes.image()))
        .enumerate()
        .for_each(|(b, (out, x))| {
            let at = b * sizes.dim..(b + 1) * sizes.dim;
            let (shift, scale) = (&shift[at.clone()], &scale[at]);
            for (out, x) in out
                .chunks_exact_mut(sizes.dim)
                .zip(x.chunks_exact(sizes.dim))
            {
                for d in 0..sizes.dim {
                    out[d] = x[d] * (scale[d] + 1.0) + shift[d];
                }
            }
        });
    f32_tensor(out, sizes.token_shape())
}

/// `[dx, d_shift, d_scale]` of [`modulate`].
pub fn modulate_backward(
    sizes: Sizes,
    x: FlexTensor,
    scale: FlexTensor,
    grad: FlexTensor,
) -> [FlexTensor; 3] {
    let [x, scale, grad] = [x, scale, grad].map(|t| t.to_contiguous());
    let scale = values(&scale);
    let mut dx = vec![0.0f32; sizes.batch * sizes.image()];
    let (mut d_shift, mut d_scale) = (vec![0.0f32; scale.len()], vec![0.0f32; scale.len()]);
    dx.par_chunks_mut(sizes.image())
        .zip(d_shift.par_chunks_mut(sizes.dim))
        .zip(d_scale.par_chunks_mut(sizes.dim))
        .zip(values(&x).par_chunks(sizes.image()))
        .zip(values(&grad).par_chunks(sizes.image()))
        .enumerate()
        .for_each(|(b, ((((dx, d_shift), d_scale), x), grad))| {
            let scale = &scale[b * sizes.dim..(b + 1) * sizes.dim];
            let rows = dx
                .chunks_exact_mut(sizes.dim)
                .zip(x.chunks_exact(sizes.dim));
            for ((dx, x), grad) in rows.zip(grad.chunks_exact(sizes.dim)) {
                for d in 0..sizes.dim {
                    dx[d] = grad[d] * (scale[d] + 1.0);
                    d_shift[d] += grad[d];
                    d_scale[d] += grad[d] * x[d];
                }
            }
        });
    let vectors = |v| f32_tensor(v, sizes.vector_shape());
    [
        f32_tensor(dx, sizes.token_shape()),
        vectors(d_shift),
        vectors(d_scale),
    ]
}

/// `x + gate · branch` for tensors of these sizes.
pub fn gated_residual(
    sizes: Sizes,
    x: FlexTensor,
    gate: FlexTensor,
    branch: FlexTensor,
) -> FlexTensor {
    let [x, gate, branch] = [x, gate, branch].map(|t| t.to_contiguous());
    let gate = values(&gate);
    let mut out = vec![0.0f32; sizes.batch * sizes.image()];
    out.par_chunks_mut(sizes.image())
        .zip(values(&x).par_chunks(sizes.image()))
        .zip(values(&branch).par_chunks(sizes.image()))
        .enumerate()
        .for_each(|(b, ((out, x), branch))| {
            let gate = &gate[b * sizes.dim..(b + 1) * sizes.dim];
            let rows = out
                .chunks_exact_mut(sizes.dim)
                .zip(x.chunks_exact(sizes.dim));
            for ((out, x), branch) in rows.zip(branch.chunks_exact(sizes.dim)) {
                for d in 0..sizes.dim {
                    out[d] = x[d] + branch[d] * gate[d];
                }
            }
        });
    f32_tensor(out, sizes.token_shape())
}

/// `[dx, d_gate, d_branch]` of [`gated_residual`]; `dx` is `grad` itself.
pub fn gated_residual_backward(
    sizes: Sizes,
    gate: FlexTensor,
    branch: FlexTensor,
    grad: FlexTensor,
) -> [FlexTensor; 3] {
    let [gate, branch] = [gate, branch].map(|t| t.to_contiguous());
    let grad = grad.to_contiguous();
    let gate = values(&gate);
    let mut d_branch = vec![0.0f32; sizes.batch * sizes.image()];
    let mut d_gate = vec![0.0f32; gate.len()];
    d_branch
        .par_chunks_mut(sizes.image())
        .zip(d_gate.par_chunks_mut(sizes.dim))
        .zip(values(&branch).par_chunks(sizes.image()))
        .zip(values(&grad).par_chunks(sizes.image()))
        .enumerate()
        .for_each(|(b, (((d_branch, d_gate), branch), grad))| {
            let gate = &gate[b * sizes.dim..(b + 1) * sizes.dim];
            let rows = d_branch
                .chunks_exact_mut(sizes.dim)
                .zip(branch.chunks_exact(sizes.dim));
            for ((d_branch, branch), grad) in rows.zip(grad.chunks_exact(sizes.dim)) {
                for d in 0..sizes.dim {
                    d_branch[d] = grad[d] * gate[d];
                    d_gate[d] += grad[d] * branch[d];
                }
            }
        });
    let d_gate = f32_tensor(d_gate, sizes.vector_shape());
    [grad, d_gate, f32_tensor(d_branch, sizes.token_shape())]
}

#[cfg(test)]
mod tests {
    use burn::tensor::backend::Backend as BurnBackend;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};

    use crate::backend::modulation::{
        gated_residual_backward_unfused, gated_residual_unfused, modulate_backward_unfused,
        modulate_unfused,
    };
    use crate::backend::{Cpu, MicroditBackend, Trainable};

    type Ad = Trainable<Cpu>;

    fn values<B: BurnBackend, const D: usize>(shape: [usize; D], seed: f32) -> Tensor<B, D> {
        let n = shape.iter().product::<usize>();
        let data = (0..n)
            .map(|i| (i as f32 * 0.53 + seed).sin())
            .collect::<Vec<_>>();
        Tensor::from_data(TensorData::new(data, shape), &Default::default())
    }

    fn relative_error<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>) -> f32 {
        let diff = (a - b.clone()).powi_scalar(2).sum().sqrt().into_scalar();
        diff / b.powi_scalar(2).sum().sqrt().into_scalar()
    }

    type Op = fn([burn::tensor::ops::FloatTensor<Ad>; 3]) -> burn::tensor::ops::FloatTensor<Ad>;

    /// `op` on tokens, a vector and tokens or a vector (`second_is_vector`), and the
    /// gradients of a weighted sum of its output: `[out, d0, d1, d2]`.
    fn run(op: Op, vectors: [bool; 3]) -> Vec<Tensor<Cpu, 3>> {
        let [b, n, d] = [3, 5, 7];
        let inputs: Vec<Tensor<Ad, 3>> = (0..3)
            .map(|i| {
                let shape = if vectors[i] { [b, 1, d] } else { [b, n, d] };
                values::<Ad, 3>(shape, i as f32).require_grad()
            })
            .collect();
        let prim = |t: &Tensor<Ad, 3>, vector: bool| {
            let t = if vector {
                t.clone().squeeze_dim::<2>(1).into_primitive()
            } else {
                t.clone().into_primitive()
            };
            t.tensor()
        };
        let args = [0, 1, 2].map(|i| prim(&inputs[i], vectors[i]));
        let out = Tensor::<Ad, 3>::from_primitive(TensorPrimitive::Float(op(args)));
        let grads = (out.clone() * values::<Ad, 3>([b, n, d], 9.0))
            .sum()
            .backward();
        let mut all = vec![out.inner()];
        all.extend(inputs.iter().map(|t| t.grad(&grads).unwrap()));
        all
    }

    #[test]
    fn modulation_and_gated_residual_equal_burns_operations() {
        let cases: [(Op, Op, [bool; 3]); 2] = [
            (
                |[x, shift, scale]| Ad::modulate(x, shift, scale),
                |[x, shift, scale]| modulate_unfused::<Ad>(x, shift, scale),
                [false, true, true],
            ),
            (
                |[x, gate, branch]| Ad::gated_residual(x, gate, branch),
                |[x, gate, branch]| gated_residual_unfused::<Ad>(x, gate, branch),
                [false, true, false],
            ),
        ];
        for (case, (fused, steps, vectors)) in cases.into_iter().enumerate() {
            for (i, (a, b)) in run(fused, vectors)
                .into_iter()
                .zip(run(steps, vectors))
                .enumerate()
            {
                let err = relative_error(a, b);
                assert!(err < 1e-6, "case {case}, output {i}: {err}");
            }
        }
    }

    /// The default backwards' formulas (what CUDA runs) against this backend's kernels.
    #[test]
    fn default_backwards_equal_the_cpu_kernels() {
        let [b, n, d] = [2, 4, 6];
        let tokens = |seed| values::<Cpu, 3>([b, n, d], seed).into_primitive().tensor();
        let vector = |seed| values::<Cpu, 2>([b, d], seed).into_primitive().tensor();
        let pairs = [
            (
                Cpu::modulate_backward(tokens(0.0), vector(1.0), tokens(2.0)),
                modulate_backward_unfused::<Cpu>(tokens(0.0), vector(1.0), tokens(2.0)),
            ),
            (
                Cpu::gated_residual_backward(vector(1.0), tokens(0.0), tokens(2.0)),
                gated_residual_backward_unfused::<Cpu>(vector(1.0), tokens(0.0), tokens(2.0)),
            ),
        ];
        for (case, (kernel, formula)) in pairs.into_iter().enumerate() {
            for (i, (a, b)) in kernel.into_iter().zip(formula).enumerate() {
                let flat = |t| {
                    let t = Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(t));
                    let len = t.shape().num_elements();
                    t.reshape([1, 1, len])
                };
                let err = relative_error(flat(a), flat(b));
                assert!(err < 1e-6, "case {case}, gradient {i}: {err}");
            }
        }
    }
}
