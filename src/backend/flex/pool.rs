//! 2-D average and max pooling on the CPU, one (image, channel) plane per task.
//!
//! burn-flex pools through a function pointer per element; here each window row is added
//! (or compared) into the output row one kernel column at a time, so the inner loop runs
//! along a row and vectorises when the stride is 1 (Inception's 3×3 pools of every mixed
//! block).

use burn::backend::flex::FlexTensor;
use burn::tensor::Shape;
use rayon::prelude::*;

use super::{f32_tensor, values};
use crate::backend::{Pool, PoolOptions};

/// Output rows and columns, and for each the input range its window covers (padding
/// excluded), of one pooled plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PoolPlan {
    options: PoolOptions,
    input: [usize; 2],
    output: [usize; 2],
}

impl PoolPlan {
    /// The plan for an input plane of `input` = `[H, W]`; `None` when the window does not
    /// fit the padded input or a window could lie wholly in the padding.
    pub fn new(input: [usize; 2], options: PoolOptions) -> Option<Self> {
        let mut output = [0; 2];
        for d in 0..2 {
            let (k, s, p) = (options.kernel[d], options.stride[d], options.padding[d]);
            let padded = input[d] + 2 * p;
            if k == 0 || s == 0 || padded < k || p >= k {
                return None;
            }
            output[d] = (padded - k) / s + 1;
        }
        Some(Self {
            options,
            input,
            output,
        })
    }

    /// Input indices `[first, end)` of output index `o`'s window along dimension `d`.
    fn window(&self, d: usize, o: usize) -> [usize; 2] {
        let start = o * self.options.stride[d];
        let first = start.saturating_sub(self.options.padding[d]);
        let end = (start + self.options.kernel[d] - self.options.padding[d]).min(self.input[d]);
        [first, end]
    }

    /// Pools one `[H, W]` plane into `out` `[H_out, W_out]`.
    fn plane(&self, x: &[f32], out: &mut [f32]) {
        let [h_out, w_out] = self.output;
        let columns: Vec<[usize; 2]> = (0..w_out).map(|o| self.window(1, o)).collect();
        debug_assert_eq!(out.len(), h_out * w_out);
        let max = matches!(self.options.kind, Pool::Max);
        for (y, out_row) in out.chunks_exact_mut(w_out).enumerate() {
            let [r0, r1] = self.window(0, y);
            out_row.fill(if max { f32::NEG_INFINITY } else { 0.0 });
            for r in r0..r1 {
                let row = &x[r * self.input[1]..][..self.input[1]];
                self.row_into(out_row, row, max);
            }
            if let Pool::Average { count_padding } = self.options.kind {
                let rows = if count_padding {
                    self.options.kernel[0]
                } else {
                    r1 - r0
                };
                for (o, [c0, c1]) in out_row.iter_mut().zip(&columns) {
                    let cols = if count_padding {
                        self.options.kernel[1]
                    } else {
                        c1 - c0
                    };
                    *o /= (rows * cols) as f32;
                }
            }
        }
    }

    /// Adds (or takes the maximum of) one input row's window columns into an output row,
    /// kernel column by kernel column.
    fn row_into(&self, out_row: &mut [f32], row: &[f32], max: bool) {
        let (k, s, p) = (
            self.options.kernel[1],
            self.options.stride[1],
            self.options.padding[1],
        );
        for j in 0..k {
            // Output columns whose window's column j is inside the row: o·s + j − p ∈ [0, W).
            let first = p.saturating_sub(j).div_ceil(s);
            let source = (first * s + j).checked_sub(p);
            let Some(source) = source.and_then(|c| row.get(c..)) else {
                continue;
            };
            let pairs = out_row[first..].iter_mut().zip(source.iter().step_by(s));
            if max {
                pairs.for_each(|(o, v)| *o = o.max(*v));
            } else {
                pairs.for_each(|(o, v)| *o += v);
            }
        }
    }

    /// Pools a contiguous f32 tensor `[B, C, H, W]`.
    pub fn run(&self, x: FlexTensor) -> FlexTensor {
        let x = x.to_contiguous();
        let shape = x.layout().shape().to_vec();
        let [h_out, w_out] = self.output;
        let planes = shape[0] * shape[1];
        let mut out = vec![0.0f32; planes * h_out * w_out];
        out.par_chunks_mut(h_out * w_out)
            .zip(values(&x).par_chunks(self.input[0] * self.input[1]))
            .for_each(|(out, x)| self.plane(x, out));
        let shape = Shape::from(vec![shape[0], shape[1], h_out, w_out]);
        f32_tensor(out, shape)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};

    use super::*;
    use crate::backend::{pool2d, pool2d_unfused};

    #[test]
    fn windows_exclude_the_padding() {
        let options = PoolOptions {
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
            kind: Pool::Max,
        };
        let plan = PoolPlan::new([5, 6], options).unwrap();
        assert_eq!(plan.output, [3, 3]);
        assert_eq!(plan.window(0, 0), [0, 2]);
        assert_eq!(plan.window(0, 2), [3, 5]);
        assert_eq!(plan.window(1, 2), [3, 6]);
        let all_padding = PoolOptions {
            padding: [3, 3],
            ..options
        };
        assert!(PoolPlan::new([5, 6], all_padding).is_none());
    }

    /// Inception's pools (3×3 average without the padding at stride 1, 3×3 max at strides
    /// 2 and 1) and an average counting the padding, against burn-flex's pools.
    #[test]
    fn pools_equal_burns() {
        let kinds = [
            (
                [3, 3],
                1,
                1,
                Pool::Average {
                    count_padding: false,
                },
            ),
            (
                [3, 3],
                1,
                1,
                Pool::Average {
                    count_padding: true,
                },
            ),
            ([3, 3], 2, 0, Pool::Max),
            ([3, 3], 1, 1, Pool::Max),
            (
                [2, 3],
                2,
                1,
                Pool::Average {
                    count_padding: false,
                },
            ),
        ];
        let shape = [2, 3, 9, 8];
        let n = shape.iter().product::<usize>();
        let data = (0..n).map(|i| (i as f32 * 0.61).sin()).collect::<Vec<_>>();
        let x = Tensor::<Flex, 4>::from_data(TensorData::new(data, shape), &Default::default());
        for (kernel, stride, padding, kind) in kinds {
            let options = PoolOptions {
                kernel,
                stride: [stride; 2],
                padding: [padding; 2],
                kind,
            };
            let ours = pool2d(x.clone(), options);
            let burns = Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(
                pool2d_unfused::<Flex>(x.clone().into_primitive().tensor(), options),
            ));
            assert_eq!(ours.dims(), burns.dims(), "{options:?}");
            let diff = (ours - burns).abs().max().into_scalar();
            assert!(diff < 1e-6, "{options:?}: {diff}");
        }
    }
}
