//! How the layer norm without a shift maps onto `kernels/chains.py`: rows read where they
//! lie (the q/k norms normalise strided slices of the fused qkv projection), ROWS rows per
//! program; the backward writes each program's partial `dγ` once to an f32 buffer
//! `[1, programs, dim]`, which `sum_partials` then adds in a fixed order (no atomics: the
//! same bits every run). A pure function, tested on the CPU against the compiled
//! kernels' parameter lists.

use super::launch_plan::{blocks, constexpr, Arg, PartialSums, TritonKernel};

/// `[..., dim]` as `rows` rows `row_stride` elements apart, when its leading dimensions
/// walk with one stride and each row is dense.
pub fn rows_of(dims: &[usize], strides: &[usize]) -> Option<(usize, usize)> {
    let (&dim, leading) = dims.split_last()?;
    let (&col_stride, leading_strides) = strides.split_last()?;
    if dim > 1 && col_stride != 1 {
        return None;
    }
    let rows: usize = leading.iter().product();
    let walked: Vec<usize> = (0..leading.len()).filter(|&d| leading[d] > 1).collect();
    let row_stride = walked.last().map_or(dim, |&d| leading_strides[d]);
    let mut expected = row_stride;
    for &d in walked.iter().rev() {
        if leading_strides[d] != expected {
            return None;
        }
        expected *= leading[d];
    }
    (row_stride >= dim || rows <= 1).then_some((rows, row_stride))
}

/// One f32 layer norm over `rows` rows of `dim` (the variants compiled for the model's
/// norms, which run in f32 whatever the model's precision).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNorm {
    pub rows: usize,
    pub dim: usize,
    pub epsilon: f32,
}

impl LayerNorm {
    pub fn new(rows: usize, dim: usize, epsilon: f64) -> Option<Self> {
        let served = rows > 0 && dim > 0 && rows * dim < i32::MAX as usize;
        served.then_some(Self {
            rows,
            dim,
            epsilon: epsilon as f32,
        })
    }

    pub const FORWARD: &'static str = "chains_layer_norm_fwd_fp32";
    pub const BACKWARD: &'static str = "chains_layer_norm_bwd_fp32";
    pub const SUM: &'static str = "chains_sum_partials_fp32";

    /// One program per ROWS rows (forward and backward alike).
    pub fn grid(&self, kernel: &TritonKernel) -> (u32, u32, u32) {
        let rows = constexpr(kernel, "ROWS").expect("the kernel's rows") as usize;
        (blocks(self.rows, rows), 1, 1)
    }

    /// The backward's partial sums of `dγ`: one row per program, `[1, programs, dim]`.
    pub fn partials(&self, backward: &TritonKernel) -> PartialSums {
        PartialSums {
            groups: 1,
            parts: self.grid(backward).0 as usize,
            cols: self.dim,
        }
    }

    /// `layer_norm_fwd(x, gamma, y, eps, rows, dim, x_stride)`; y dense.
    pub fn forward_args(&self, [x, gamma, y]: [u64; 3], x_stride: usize) -> Vec<Arg> {
        let mut args = [x, gamma, y].map(Arg::Pointer).to_vec();
        args.push(Arg::F32(self.epsilon));
        args.extend([self.rows, self.dim, x_stride].map(|n| Arg::I32(n as i32)));
        args
    }

    /// `layer_norm_bwd(x, gamma, grad, dx, part, eps, rows, dim, x_stride, grad_stride)`;
    /// dx dense.
    pub fn backward_args(
        &self,
        pointers: [u64; 5],
        [x_stride, grad_stride]: [usize; 2],
    ) -> Vec<Arg> {
        let mut args = pointers.map(Arg::Pointer).to_vec();
        args.push(Arg::F32(self.epsilon));
        args.extend([self.rows, self.dim, x_stride, grad_stride].map(|n| Arg::I32(n as i32)));
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::launch_plan::{compiled as kernel, pack};

    #[test]
    fn rows_are_read_where_they_lie() {
        // Dense tokens, and the q slice of a fused [B, N, 3·H] projection.
        assert_eq!(rows_of(&[2, 5, 8], &[40, 8, 1]), Some((10, 8)));
        assert_eq!(rows_of(&[2, 5, 8], &[120, 24, 1]), Some((10, 24)));
        assert_eq!(
            rows_of(&[1, 5, 8], &[999, 24, 1]),
            Some((5, 24)),
            "extent 1 walks no stride"
        );
        assert_eq!(
            rows_of(&[2, 5, 8], &[8, 16, 1]),
            None,
            "batch and tokens swapped"
        );
        assert_eq!(rows_of(&[2, 5, 8], &[40, 1, 5]), None, "rows not dense");
        assert_eq!(rows_of(&[8], &[1]), Some((1, 8)));
    }

    #[test]
    fn the_three_kernels_take_the_planned_arguments() {
        let plan = LayerNorm::new(77 * 2, 1152, 1e-6).unwrap();
        let (forward, backward, sum) = (
            kernel(LayerNorm::FORWARD),
            kernel(LayerNorm::BACKWARD),
            kernel(LayerNorm::SUM),
        );
        pack(forward, &plan.forward_args([1, 2, 3], 3456)).unwrap();
        pack(backward, &plan.backward_args([1, 2, 3, 4, 5], [3456, 1152])).unwrap();
        let sums = plan.partials(backward);
        pack(sum, &sums.args([1, 2])).unwrap();
        let rows = constexpr(forward, "ROWS").unwrap() as usize;
        assert_eq!(plan.grid(forward), ((154usize).div_ceil(rows) as u32, 1, 1));
        assert_eq!(sums.dims(), [1, 154usize.div_ceil(rows), 1152]);
        let cols = constexpr(sum, "COLS").unwrap() as usize;
        assert_eq!(sums.grid(sum), (1, 1152usize.div_ceil(cols) as u32, 1));
    }
}
