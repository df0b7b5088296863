//! The layer norm with a scale and no shift, and its backward, on f32 tensors: one pass
//! per row each way (burn's layer norm under autodiff is eight operations forward and
//! their backwards), rows read where they lie (the q/k norms take strided slices of the
//! fused qkv projection), groups of rows on rayon's pool.

use burn::backend::flex::{FlexTensor, Layout};
use burn::tensor::DType;
use rayon::prelude::*;

use super::rows::{layer_norm_backward_row, layer_norm_row};
use super::{f32_tensor, values};

/// Elements per task: large enough to amortise scheduling, small enough to balance.
const TASK_ELEMENTS: usize = 1 << 14;

/// Where each row of a tensor starts in its storage, when its last dimension is contiguous
/// and no stride is negative; rows in the order of a contiguous copy.
fn row_starts(layout: &Layout) -> Option<Vec<usize>> {
    let (shape, strides) = (layout.shape(), layout.strides());
    let rank = shape.num_dims();
    if rank == 0 || strides[rank - 1] != 1 || strides.iter().any(|&s| s < 0) {
        return None;
    }
    let (len, start) = (shape[rank - 1], layout.start_offset());
    let count = shape[..rank - 1].iter().product::<usize>();
    if layout.is_contiguous() {
        return Some((0..count).map(|row| start + row * len).collect());
    }
    // An odometer over the leading dimensions, the last one fastest.
    let (mut index, mut offset) = (vec![0; rank - 1], start);
    let mut starts = Vec::with_capacity(count);
    for _ in 0..count {
        starts.push(offset);
        for d in (0..rank - 1).rev() {
            index[d] += 1;
            offset += strides[d] as usize;
            if index[d] < shape[d] {
                break;
            }
            offset -= index[d] * strides[d] as usize;
            index[d] = 0;
        }
    }
    Some(starts)
}

/// A tensor's rows: its storage and where each row starts (after a contiguous copy when
/// its last dimension is strided).
struct Rows {
    tensor: FlexTensor,
    starts: Vec<usize>,
    len: usize,
}

impl Rows {
    fn of(tensor: FlexTensor) -> Self {
        let (tensor, starts) = match row_starts(tensor.layout()) {
            Some(starts) => (tensor, starts),
            None => {
                let tensor = tensor.to_contiguous();
                let starts = row_starts(tensor.layout()).expect("a contiguous tensor has rows");
                (tensor, starts)
            }
        };
        let len = tensor.layout().shape().last().copied().unwrap_or(1);
        Self {
            tensor,
            starts,
            len,
        }
    }

    fn row(&self, start: usize) -> &[f32] {
        &self.tensor.storage::<f32>()[start..start + self.len]
    }

    /// Rows per task, fixed by the sizes alone (so the backward's sums of `dγ` over tasks
    /// do not depend on the number of threads).
    fn per_task(&self) -> usize {
        (TASK_ELEMENTS / self.len.max(1)).max(1)
    }
}

/// Whether the tensors are f32 with one last dimension, `gamma`'s length (what the
/// kernels take).
pub fn fits(rows: &[&FlexTensor], gamma: &FlexTensor) -> bool {
    let (shape, dim) = (rows[0].layout().shape(), gamma.layout().num_elements());
    let f32_rows = rows
        .iter()
        .all(|t| t.dtype() == DType::F32 && t.layout().shape() == shape);
    let gamma_fits = gamma.dtype() == DType::F32 && gamma.layout().num_dims() == 1;
    f32_rows && gamma_fits && shape.last() == Some(&dim)
}

/// The layer norm of tensors that [`fit`](fits); the output is contiguous.
pub fn forward(x: FlexTensor, gamma: FlexTensor, epsilon: f32) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let (x, gamma) = (Rows::of(x), gamma.to_contiguous());
    let gamma = values(&gamma);
    let mut out = vec![0.0f32; x.starts.len() * x.len];
    out.par_chunks_mut(x.per_task() * x.len)
        .zip(x.starts.par_chunks(x.per_task()))
        .for_each(|(out, starts)| {
            for (out, &start) in out.chunks_exact_mut(x.len).zip(starts) {
                layer_norm_row(x.row(start), gamma, out, epsilon);
            }
        });
    f32_tensor(out, shape)
}

/// `[dx, dγ]` of [`forward`]; each task sums its rows' `dγ`, then the tasks' sums are added
/// in order.
pub fn backward(
    x: FlexTensor,
    gamma: FlexTensor,
    grad: FlexTensor,
    epsilon: f32,
) -> [FlexTensor; 2] {
    let shape = x.layout().shape().clone();
    let (x, grad, gamma) = (Rows::of(x), Rows::of(grad), gamma.to_contiguous());
    let (gamma, dim, per_task) = (values(&gamma), x.len, x.per_task());
    let mut dx = vec![0.0f32; x.starts.len() * dim];
    let mut task_d_gamma = vec![0.0f32; x.starts.len().div_ceil(per_task) * dim];
    dx.par_chunks_mut(per_task * dim)
        .zip(task_d_gamma.par_chunks_mut(dim))
        .zip(x.starts.par_chunks(per_task))
        .zip(grad.starts.par_chunks(per_task))
        .for_each(|(((dx, d_gamma), x_starts), grad_starts)| {
            let rows = dx
                .chunks_exact_mut(dim)
                .zip(x_starts.iter().zip(grad_starts));
            for (dx, (&x_start, &grad_start)) in rows {
                let (x, grad) = (x.row(x_start), grad.row(grad_start));
                layer_norm_backward_row(x, gamma, grad, dx, d_gamma, epsilon);
            }
        });
    let mut d_gamma = vec![0.0f32; dim];
    for task in task_d_gamma.chunks_exact(dim) {
        d_gamma.iter_mut().zip(task).for_each(|(d, t)| *d += t);
    }
    [f32_tensor(dx, shape), f32_tensor(d_gamma, [dim].into())]
}

#[cfg(test)]
mod tests {
    use burn::backend::flex::Layout;
    use burn::tensor::ops::ModuleOps;
    use burn::tensor::{Distribution, Tensor, TensorPrimitive};

    use super::row_starts;
    use crate::backend::layer_norm::scaled_layer_norm_backward_unfused;
    use crate::backend::{scaled_layer_norm, Cpu, MicroditBackend, Trainable};

    type Ad = Trainable<Cpu>;

    fn random<B: burn::tensor::backend::Backend, const D: usize>(
        shape: [usize; D],
        offset: f64,
    ) -> Tensor<B, D> {
        Tensor::random(
            shape,
            Distribution::Normal(offset, 1.5),
            &Default::default(),
        )
    }

    fn relative_error<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>) -> f32 {
        let diff = (a - b.clone()).powi_scalar(2).sum().sqrt().into_scalar();
        diff / b.powi_scalar(2).sum().sqrt().into_scalar()
    }

    /// Rows of 37 (a vector tail) read from a strided slice, as the q/k norms take them,
    /// against burn's layer norm and its autodiff: output and both gradients.
    #[test]
    fn layer_norm_and_its_gradients_equal_burns_operations() {
        let [b, n, d] = [3, 5, 37];
        let fused = random::<Cpu, 3>([b, n, 3 * d], 0.7);
        let gamma = random::<Cpu, 1>([d], 1.0);
        let weights = random::<Cpu, 3>([b, n, d], 0.0);
        let run = |ours: bool| {
            let fused = Tensor::<Ad, 3>::from_inner(fused.clone()).require_grad();
            let gamma = Tensor::<Ad, 1>::from_inner(gamma.clone()).require_grad();
            let x = fused.clone().narrow(2, d, d);
            let out = if ours {
                scaled_layer_norm(x, gamma.clone(), 1e-6)
            } else {
                let prim = |t: Tensor<Ad, 3>| t.into_primitive().tensor();
                let gamma = gamma.clone().into_primitive().tensor();
                let out = <Ad as ModuleOps<Ad>>::layer_norm(prim(x), gamma, None, 1e-6);
                Tensor::from_primitive(TensorPrimitive::Float(out))
            };
            let grads = (out.clone() * Tensor::from_inner(weights.clone()))
                .sum()
                .backward();
            let d_gamma = gamma.grad(&grads).unwrap().reshape([1, 1, d]);
            [out.inner(), fused.grad(&grads).unwrap(), d_gamma]
        };
        for (i, (ours, burns)) in run(true).into_iter().zip(run(false)).enumerate() {
            let err = relative_error(ours, burns);
            assert!(err < 2e-6, "output {i}: {err}");
        }
    }

    /// Rows of a layout whose leading dimensions are swapped, and of a contiguous one.
    #[test]
    fn row_starts_follow_the_strides() {
        let swapped = Layout::new([2, 3, 4].into(), vec![4, 8, 1], 5);
        assert_eq!(row_starts(&swapped), Some(vec![5, 13, 21, 9, 17, 25]));
        let contiguous = Layout::contiguous([2, 3, 4].into());
        assert_eq!(row_starts(&contiguous), Some(vec![0, 4, 8, 12, 16, 20]));
        let column_strided = Layout::new([3, 4].into(), vec![1, 3], 0);
        assert_eq!(row_starts(&column_strided), None);
    }

    /// The default backward's formulas (what CUDA runs) against this backend's kernel.
    #[test]
    fn default_backward_equals_the_cpu_kernel() {
        let shape = [2, 9, 24];
        let prim = |t: Tensor<Cpu, 3>| t.into_primitive().tensor();
        let (x, grad) = (random::<Cpu, 3>(shape, -0.3), random::<Cpu, 3>(shape, 0.0));
        let gamma = random::<Cpu, 1>([24], 0.5).into_primitive().tensor();
        let kernel = Cpu::scaled_layer_norm_backward(
            prim(x.clone()),
            gamma.clone(),
            prim(grad.clone()),
            1e-5,
        );
        let formula = scaled_layer_norm_backward_unfused::<Cpu>(prim(x), gamma, prim(grad), 1e-5);
        let [dx, d_gamma] = kernel;
        let [dx_formula, d_gamma_formula] = formula;
        let dx_err = relative_error(
            Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(dx)),
            Tensor::from_primitive(TensorPrimitive::Float(dx_formula)),
        );
        let d_gamma_err = relative_error(
            Tensor::<Cpu, 1>::from_primitive(TensorPrimitive::Float(d_gamma)),
            Tensor::from_primitive(TensorPrimitive::Float(d_gamma_formula)),
        );
        assert!(
            dx_err < 1e-6 && d_gamma_err < 1e-6,
            "{dx_err}, {d_gamma_err}"
        );
    }
}
