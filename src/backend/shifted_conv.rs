//! 2-D convolution as kh·kw accumulating matrix products over shifted views of the padded
//! input: the CPU kernel's plan (`flex/conv.rs`, whose header derives it) in burn
//! operations, for backends whose convolution is not exact in f32. On CUDA the products
//! then go to cuBLAS in true f32, where burn's convolution runs on TF32 tensor cores (the
//! VAE missed f32 parity by 8.7e-4).
//!
//! The padded input is padded further to whole phase planes and laid out once as
//! `[s_h·s_w phases, C_in, B·H_q·W_q]` (+ zero tail): tap (i, j) is the weight slice
//! `[C_out, C_in]` times phase (i mod s_h, j mod s_w) read (i div s_h)·W_q + (j div s_w)
//! columns later, a view. The products land on the phases' `H_q × W_q` grid; the output is
//! its top-left `H_out × W_out` corner.

use burn::tensor::ops::ConvOptions;
use burn::tensor::ops::PadMode;
use burn::tensor::{s, Tensor};

use super::{matmul, MicroditBackend};

/// The sizes of one convolution in the shifted-products plan: the one definition of its
/// geometry, which the CPU kernel (`flex/conv.rs`) lays out in its own buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShiftedConv {
    pub(super) batch: usize,
    pub(super) c_in: usize,
    pub(super) c_out: usize,
    /// `[H, W]` of the input, before padding.
    pub(super) input: [usize; 2],
    pub(super) kernel: [usize; 2],
    pub(super) stride: [usize; 2],
    pub(super) padding: [usize; 2],
    pub(super) output: [usize; 2],
    /// `[H_q, W_q]` of one phase plane of the padded input.
    pub(super) phase: [usize; 2],
}

impl ShiftedConv {
    /// The plan for x `[B, C_in, H, W]` and weight `[C_out, C_in, kh, kw]`; `None` for
    /// groups, dilation or an empty output (burn's convolution serves those).
    pub fn new(x: [usize; 4], weight: [usize; 4], options: &ConvOptions<2>) -> Option<Self> {
        let [batch, c_in, h, w] = x;
        let [c_out, per_group, kh, kw] = weight;
        let [ph, pw] = options.padding;
        let [sh, sw] = options.stride;
        let padded = [h + 2 * ph, w + 2 * pw];
        let served = options.groups == 1 && options.dilation == [1, 1] && per_group == c_in;
        if !served || batch * c_out == 0 || padded[0] < kh || padded[1] < kw || sh * sw == 0 {
            return None;
        }
        Some(Self {
            batch,
            c_in,
            c_out,
            input: [h, w],
            kernel: [kh, kw],
            stride: [sh, sw],
            padding: [ph, pw],
            output: [(padded[0] - kh) / sh + 1, (padded[1] - kw) / sw + 1],
            phase: [padded[0].div_ceil(sh), padded[1].div_ceil(sw)],
        })
    }

    /// Columns of one phase: every image's `H_q × W_q` plane side by side.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // CUDA runs the plan
    fn phase_columns(&self) -> usize {
        self.batch * self.phase[0] * self.phase[1]
    }

    /// Tap (i, j)'s phase (row phase · s_w + column phase) and how far into the phase's
    /// planes its view starts (whole phase rows and columns).
    pub(super) fn tap(&self, i: usize, j: usize) -> (usize, usize) {
        let [sh, sw] = self.stride;
        ((i % sh) * sw + j % sw, (i / sh) * self.phase[1] + j / sw)
    }

    /// Zero columns after the phases, so that the last tap's view stays inside.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // CUDA runs the plan
    fn tail(&self) -> usize {
        let [kh, kw] = self.kernel;
        self.tap(kh - 1, kw - 1).1
    }
}

/// `conv2d(x, weight) + bias` by the plan: one product per tap, summed.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // CUDA runs the plan
pub fn conv2d<B: MicroditBackend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    plan: &ShiftedConv,
) -> Tensor<B, 4> {
    let ShiftedConv {
        batch: b,
        c_in,
        c_out,
        kernel: [kh, kw],
        stride: [sh, sw],
        padding: [ph, pw],
        input: [h, w],
        output: [ho, wo],
        phase: [hq, wq],
    } = *plan;
    // Zero padding, then up to whole phase planes: [B, C, H_q·s_h, W_q·s_w].
    let pad = [(ph, hq * sh - h - ph), (pw, wq * sw - w - pw)];
    let x = x.pad(pad, PadMode::Constant(0.0));
    // Row a·s_h + r, column c·s_w + t of image n is phase (r, t)'s element (n, a, c).
    let phases = x
        .reshape([b, c_in, hq, sh, wq, sw])
        .permute([3, 5, 1, 0, 2, 4])
        .reshape([sh * sw, c_in, plan.phase_columns()])
        .pad([(0, plan.tail())], PadMode::Constant(0.0));
    // Each tap's weights as a dense [C_out, C_in] matrix.
    let taps = weight.permute([2, 3, 0, 1]).reshape([kh * kw, c_out, c_in]);
    let n = plan.phase_columns();
    let mut sum: Option<Tensor<B, 3>> = None;
    for i in 0..kh {
        for j in 0..kw {
            let (phase, offset) = plan.tap(i, j);
            let lhs = taps.clone().slice(s![i * kw + j..i * kw + j + 1]);
            let rhs = phases
                .clone()
                .slice(s![phase..phase + 1, .., offset..offset + n]);
            let product = matmul(lhs, rhs);
            sum = Some(match sum {
                Some(sum) => sum + product,
                None => product,
            });
        }
    }
    let out = sum
        .expect("at least one tap")
        .reshape([c_out, b, hq, wq])
        .slice(s![.., .., 0..ho, 0..wo])
        .swap_dims(0, 1);
    match bias {
        Some(bias) => out + bias.reshape([1, c_out, 1, 1]),
        None => out,
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::ops::ModuleOps;
    use burn::tensor::{Distribution, TensorPrimitive};

    use super::*;
    use crate::backend::Cpu;

    fn options(stride: usize, padding: [usize; 2]) -> ConvOptions<2> {
        ConvOptions::new([stride; 2], padding, [1, 1], 1)
    }

    #[test]
    fn taps_read_their_phase_shifted_by_whole_rows_and_columns() {
        let plan = ShiftedConv::new([2, 8, 9, 9], [4, 8, 3, 3], &options(2, [1, 1])).unwrap();
        // Padded 11×11, stride 2: phases of 6×6, output 5×5.
        assert_eq!(plan.phase, [6, 6]);
        assert_eq!(plan.output, [5, 5]);
        assert_eq!(plan.tap(0, 0), (0, 0));
        assert_eq!(plan.tap(1, 2), (2, 1), "phase (1, 0), one column on");
        assert_eq!(
            plan.tap(2, 2),
            (0, 6 + 1),
            "phase (0, 0), a row and a column on"
        );
        assert_eq!(plan.tail(), 7);
        let one = ShiftedConv::new([1, 8, 4, 4], [4, 8, 1, 1], &options(1, [0, 0])).unwrap();
        assert_eq!((one.tap(0, 0), one.tail()), ((0, 0), 0));
        let grouped = ShiftedConv::new([1, 8, 4, 4], [4, 4, 3, 3], &options(1, [1, 1]));
        assert!(grouped.is_none(), "groups");
        assert!(ShiftedConv::new([1, 8, 2, 2], [4, 8, 5, 5], &options(1, [0, 0])).is_none());
    }

    /// The plan in burn's operations equals burn's convolution: strides 1 and 2, zero and
    /// asymmetric padding, 1×1, 3×3, 5×5 and one-sided kernels, 3-channel inputs.
    #[test]
    fn shifted_products_equal_burns_convolution() {
        type Case = ([usize; 4], [usize; 4], usize, [usize; 2]);
        let cases: [Case; 7] = [
            ([1, 8, 9, 7], [5, 8, 3, 3], 1, [1, 1]),
            ([2, 9, 9, 8], [4, 9, 3, 3], 2, [0, 0]),
            ([3, 16, 6, 6], [7, 16, 1, 1], 1, [0, 0]),
            ([2, 8, 7, 9], [3, 8, 1, 7], 1, [0, 3]),
            ([1, 12, 11, 10], [6, 12, 5, 5], 1, [2, 2]),
            ([2, 8, 10, 11], [4, 8, 3, 3], 2, [1, 1]),
            ([2, 3, 8, 8], [6, 3, 3, 3], 1, [1, 1]),
        ];
        let device = Default::default();
        let random = |dims: [usize; 4]| {
            Tensor::<Cpu, 4>::random(dims, Distribution::Normal(0.0, 1.0), &device)
        };
        for (i, (x_dims, w_dims, stride, padding)) in cases.into_iter().enumerate() {
            let (x, w) = (random(x_dims), random(w_dims));
            let bias = (i % 2 == 0)
                .then(|| Tensor::<Cpu, 1>::random([w_dims[0]], Distribution::Default, &device));
            let opts = options(stride, padding);
            let plan = ShiftedConv::new(x_dims, w_dims, &opts).unwrap();
            let ours = conv2d(x.clone(), w.clone(), bias.clone(), &plan);
            let prim = |t: Tensor<Cpu, 4>| t.into_primitive().tensor();
            let bias = bias.map(|b| b.into_primitive().tensor());
            let burns = <Cpu as ModuleOps<Cpu>>::conv2d(prim(x), prim(w), bias, opts);
            let burns = Tensor::<Cpu, 4>::from_primitive(TensorPrimitive::Float(burns));
            assert_eq!(ours.dims(), burns.dims(), "case {i}");
            let diff = (ours - burns.clone()).abs().max().into_scalar();
            let scale = burns.abs().max().into_scalar();
            assert!(diff <= 1e-5 * scale, "case {i}: {diff} against {scale}");
        }
    }
}
