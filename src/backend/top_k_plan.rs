//! How expert-choice routing's top-k maps onto `kernels/topk.py`: one program per
//! `[batch, expert]` row sorts the row's keys (value, then the smaller token first) and
//! keeps the first k token indices, on the device. A pure function of shapes and strides,
//! tested on the CPU against the compiled kernels' parameter lists.

use super::launch_plan::{Arg, TritonKernel};

/// The row lengths compiled ahead of time (`BLOCK_TS` in kernels/topk.py).
pub const BLOCK_TS: [usize; 4] = [64, 256, 1024, 4096];

/// Top-k over the last dimension of f32 `values` `[N, E, T]` (any strides) into dense
/// i32 indices `[N, E, k]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopK {
    pub dims: [usize; 3],
    pub strides: [usize; 3],
    pub k: usize,
}

impl TopK {
    /// The call, or `None` where no compiled variant serves it (rows longer than the
    /// largest block, k above the row length or 0, no rows, offsets past int32).
    pub fn new(dims: &[usize], strides: &[usize], k: usize) -> Option<Self> {
        let dims: [usize; 3] = dims.try_into().ok()?;
        let strides: [usize; 3] = strides.try_into().ok()?;
        let extent: usize = (0..3).map(|i| dims[i].saturating_sub(1) * strides[i]).sum();
        let served = (1..=dims[2]).contains(&k)
            && dims[0] * dims[1] > 0
            && dims[2] <= BLOCK_TS[BLOCK_TS.len() - 1]
            && extent < i32::MAX as usize
            && dims[0] * dims[1] < i32::MAX as usize;
        served.then_some(Self { dims, strides, k })
    }

    /// The variant whose block holds a row: the smallest that fits.
    pub fn variant(&self) -> String {
        let block = BLOCK_TS
            .into_iter()
            .find(|&b| self.dims[2] <= b)
            .expect("rows checked to fit");
        format!("topk_rows_t{block}")
    }

    /// One program per row.
    pub fn grid(&self, _kernel: &TritonKernel) -> (u32, u32, u32) {
        ((self.dims[0] * self.dims[1]) as u32, 1, 1)
    }

    /// `topk_rows_kernel(values, out, E, T, k, stride_n, stride_e, stride_t)`.
    pub fn args(&self, [values, out]: [u64; 2]) -> Vec<Arg> {
        let [_, e, t] = self.dims;
        let mut args = vec![Arg::Pointer(values), Arg::Pointer(out)];
        args.extend([e, t, self.k].map(|n| Arg::I32(n as i32)));
        args.extend(self.strides.map(|s| Arg::I32(s as i32)));
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::launch_plan::{compiled, constexpr, pack};

    #[test]
    fn rows_go_to_the_smallest_block_that_holds_them() {
        for (tokens, block) in [(16, 64), (64, 64), (65, 256), (1024, 1024), (4096, 4096)] {
            // The router's probabilities [N, T, E] read as [N, E, T]: a transposed view.
            let (n, e) = (3, 8);
            let plan = TopK::new(&[n, e, tokens], &[tokens * e, 1, e], tokens / 4).unwrap();
            let name = plan.variant();
            let kernel = compiled(&name);
            assert_eq!(constexpr(kernel, "BLOCK_T"), Some(block as i64));
            let args = plan.args([1, 2]);
            pack(kernel, &args).unwrap();
            let i = |x: usize| Arg::I32(x as i32);
            assert_eq!(
                args[2..],
                [i(e), i(tokens), i(tokens / 4), i(tokens * e), i(1), i(e)]
            );
            assert_eq!(plan.grid(kernel), ((n * e) as u32, 1, 1));
        }
        assert!(TopK::new(&[1, 8, 4097], &[4097 * 8, 4097, 1], 4).is_none());
        assert!(
            TopK::new(&[1, 8, 16], &[128, 16, 1], 17).is_none(),
            "k above T"
        );
    }
}
