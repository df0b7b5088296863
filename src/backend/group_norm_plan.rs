//! How the VAE's group norm (+ SiLU) maps onto `kernels/chains.py`: one program per
//! (image, group) over dense `[B, C, H, W]`. A pure function, tested on the CPU against
//! the compiled kernels' parameter lists.

use super::launch_plan::{Arg, TritonKernel};
use super::GroupNormOptions;

/// One group norm of dense x `[batch, channels, H, W]` with per-channel γ, β.
#[derive(Debug, Clone, Copy)]
pub struct GroupNorm {
    pub batch: usize,
    pub channels: usize,
    pub plane: usize,
    pub options: GroupNormOptions,
    pub dtype: &'static str,
}

impl GroupNorm {
    /// The call, or `None` where no compiled variant serves it (groups that do not split
    /// the channels, an empty grid, offsets past int32).
    pub fn new(dims: &[usize], options: GroupNormOptions, dtype: &'static str) -> Option<Self> {
        let [batch, channels, h, w] = dims.try_into().ok()?;
        let groups = options.groups;
        let served = ["fp32", "bf16"].contains(&dtype)
            && groups > 0
            && channels.is_multiple_of(groups)
            && batch * channels * h * w > 0
            && batch * channels * h * w < i32::MAX as usize;
        served.then_some(Self {
            batch,
            channels,
            plane: h * w,
            options,
            dtype,
        })
    }

    pub fn variant(&self) -> String {
        format!("chains_group_norm_fwd_{}", self.dtype)
    }

    pub fn grid(&self, _kernel: &TritonKernel) -> (u32, u32, u32) {
        ((self.batch * self.options.groups) as u32, 1, 1)
    }

    /// `group_norm_fwd(x, gamma, beta, y, eps, channels, groups, plane, silu)`.
    pub fn args(&self, pointers: [u64; 4]) -> Vec<Arg> {
        let mut args = pointers.map(Arg::Pointer).to_vec();
        args.push(Arg::F32(self.options.epsilon as f32));
        let sizes = [self.channels, self.options.groups, self.plane];
        args.extend(sizes.map(|n| Arg::I32(n as i32)));
        args.push(Arg::I32(self.options.silu as i32));
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::launch_plan::{compiled, pack};

    #[test]
    fn the_group_norm_takes_the_planned_arguments() {
        let options = GroupNormOptions {
            groups: 32,
            epsilon: 1e-6,
            silu: true,
        };
        for dtype in ["fp32", "bf16"] {
            let plan = GroupNorm::new(&[2, 128, 16, 16], options, dtype).unwrap();
            let kernel = compiled(&plan.variant());
            let args = plan.args([1, 2, 3, 4]);
            pack(kernel, &args).unwrap();
            assert_eq!(args[5..], [128, 32, 256, 1].map(Arg::I32)[..]);
            assert_eq!(plan.grid(kernel), (64, 1, 1));
        }
        assert!(
            GroupNorm::new(&[2, 100, 4, 4], options, "fp32").is_none(),
            "32 ∤ 100"
        );
        assert!(
            GroupNorm::new(&[0, 128, 4, 4], options, "fp32").is_none(),
            "empty grid"
        );
    }
}
