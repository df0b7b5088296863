//! 2-D convolution on the CPU as a sum of shifted matrix products, without im2col.
//!
//! Stride 1 first. Lay the zero-padded input out as rows `[C_in, H_p·W_p]`. Kernel tap
//! (i, j) multiplies `W[:, :, i, j]` `[C_out, C_in]` with the input shifted by i rows and j
//! columns, and that shifted input is the same rows read from i·W_p + j elements later: a
//! view, not a copy. So the output, computed on the padded width (the last W_p − W_out
//! columns of each row read across the row's end and are discarded), is kh·kw products
//! `[C_out, C_in] · [C_in, N]` summed into one buffer, and gemm packs its operands straight
//! from the input. burn-flex's im2col instead copies every input element kh·kw times into
//! a column matrix that gemm then packs again.
//!
//! A stride s becomes stride 1 by splitting the padded input into its s_h·s_w phases (rows
//! ≡ a mod s_h, columns ≡ b mod s_w, each an `H_q × W_q` plane): tap (i, j) reads phase
//! (i mod s_h, j mod s_w) shifted by (i div s_h, j div s_w). Each channel's row holds the
//! whole batch side by side, so one product per tap serves every image.
//!
//! A 3×3 kernel at stride 1 between wide layers (the VAE's) takes Winograd's form instead
//! (`winograd.rs`): 16 products per tile of four outputs where this form takes 36.

use burn::backend::flex::FlexTensor;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, Shape};
use rayon::prelude::*;

use super::winograd::Winograd;
use super::{f32_tensor, gemm_into, values, Matrix, Shared, Sum};
use crate::backend::shifted_conv::ShiftedConv;

/// Fewer input channels than this make products too thin for gemm (an image's 3 colour
/// channels): burn-flex's convolution serves those.
const MIN_CHANNELS: usize = 8;

/// The products run over column tiles whose slice of the output stays in a core's L2
/// cache while every tap adds to it: summed over the whole width, each tap would read and
/// write an output larger than the caches, and thin products (32 channels) would wait on
/// memory.
const TILE_BYTES: usize = 256 * 1024;
const MIN_TILE_COLUMNS: usize = 64;

/// One series of products: their right operands' rows (`rhs_row` apart, tap 0's first),
/// and a destination `[C_out, columns]` whose rows are `dst_row` apart.
struct Series {
    rhs: *const f32,
    rhs_row: usize,
    dst: *mut f32,
    dst_row: usize,
    columns: usize,
}

/// One convolution's shifted-products geometry (`backend::shifted_conv`, shared with the
/// CUDA path) and where this kernel's products read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ConvPlan(ShiftedConv);

impl std::ops::Deref for ConvPlan {
    type Target = ShiftedConv;

    fn deref(&self) -> &ShiftedConv {
        &self.0
    }
}

impl ConvPlan {
    /// The plan for x `[B, C_in, H, W]` and weight `[C_out, C_in, kh, kw]`; `None` for
    /// what this kernel leaves to burn-flex: groups, dilation, fewer than
    /// [`MIN_CHANNELS`] input channels, an empty output.
    pub fn new(x: [usize; 4], weight: [usize; 4], options: &ConvOptions<2>) -> Option<Self> {
        let thick = x[1] >= MIN_CHANNELS;
        thick
            .then(|| ShiftedConv::new(x, weight, options))
            .flatten()
            .map(Self)
    }

    fn plane_len(&self) -> usize {
        self.phase[0] * self.phase[1]
    }

    /// Elements from one input channel's row of the phase buffer to the next.
    fn row_len(&self) -> usize {
        self.batch * self.plane_len()
    }

    fn phase_count(&self) -> usize {
        self.stride[0] * self.stride[1]
    }

    /// Columns of the products: every position of the phase grid up to the last output.
    fn columns(&self) -> usize {
        let [out_h, out_w] = self.output;
        (self.batch - 1) * self.plane_len() + (out_h - 1) * self.phase[1] + out_w
    }

    /// Where tap (i, j)'s rows start in the phase buffer: its phase's planes, shifted.
    fn tap_start(&self, [i, j]: [usize; 2]) -> usize {
        let (phase, shift) = self.tap(i, j);
        phase * self.c_in * self.row_len() + shift
    }

    fn taps(&self) -> impl Iterator<Item = [usize; 2]> + '_ {
        let [kh, kw] = self.kernel;
        (0..kh * kw).map(move |t| [t / kw, t % kw])
    }

    /// The phase buffer's length: all planes, and the zeros the last taps read past the
    /// last plane's end (into discarded columns only).
    fn buffer_len(&self) -> usize {
        let last_row = (self.c_in - 1) * self.row_len() + self.columns();
        let planes = self.phase_count() * self.c_in * self.row_len();
        self.taps()
            .map(|tap| self.tap_start(tap) + last_row)
            .max()
            .unwrap_or(0)
            .max(planes)
    }

    /// The padded input `x` (`[B, C_in, H, W]`, contiguous) split into phase planes,
    /// laid out `[phase, C_in, B, H_q, W_q]`.
    fn split_phases(&self, x: &[f32]) -> Vec<f32> {
        let mut buffer = vec![0.0; self.buffer_len()];
        let planes = self.phase_count() * self.c_in * self.batch;
        let [h, w] = self.input;
        buffer[..planes * self.plane_len()]
            .par_chunks_mut(self.plane_len())
            .enumerate()
            .for_each(|(index, plane)| {
                let b = index % self.batch;
                let c = index / self.batch % self.c_in;
                let phase = index / (self.batch * self.c_in);
                let [a, e] = [phase / self.stride[1], phase % self.stride[1]];
                let image = &x[(b * self.c_in + c) * h * w..][..h * w];
                for (u, out_row) in plane.chunks_exact_mut(self.phase[1]).enumerate() {
                    let Some(y) = (self.stride[0] * u + a).checked_sub(self.padding[0]) else {
                        continue;
                    };
                    if y < h {
                        self.phase_row(out_row, &image[y * w..][..w], e);
                    }
                }
            });
        buffer
    }

    /// Columns ≡ `e` (mod s_w) of one padded input row into a phase plane's row.
    fn phase_row(&self, out: &mut [f32], row: &[f32], e: usize) {
        let (sw, pad) = (self.stride[1], self.padding[1]);
        // The first phase column whose padded column sw·v + e is inside the row.
        let first = pad.saturating_sub(e).div_ceil(sw);
        let source = sw * first + e - pad;
        let Some(source) = row.get(source..) else {
            return;
        };
        if sw == 1 {
            out[first..][..source.len()].copy_from_slice(source);
        } else {
            for (o, x) in out[first..].iter_mut().zip(source.iter().step_by(sw)) {
                *o = *x;
            }
        }
    }

    /// Columns per tile of `n` columns of products, for `threads` threads: as many as fit
    /// [`TILE_BYTES`] of output, in a number of tiles that shares out evenly.
    fn tile_columns(&self, n: usize, threads: usize) -> usize {
        let fit = (TILE_BYTES / (4 * self.c_out)).max(MIN_TILE_COLUMNS);
        let tiles = n.div_ceil(fit).next_multiple_of(threads.max(1));
        n.div_ceil(tiles)
    }

    /// `Σ_taps W[:, :, i, j] · (tap's rows)` into each series' destination, tile by tile
    /// on rayon's threads; the first tap adds to what is there when `accumulate`.
    fn products(&self, weight: &[f32], series: &[Series], accumulate: bool) {
        let taps = self.kernel[0] * self.kernel[1];
        let tiles: Vec<(usize, usize)> = series
            .iter()
            .enumerate()
            .flat_map(|(s, series)| {
                let tile = self.tile_columns(series.columns, rayon::current_num_threads());
                (0..series.columns)
                    .step_by(tile)
                    .map(move |first| (s, first))
            })
            .collect();
        let (weight, series) = (Shared(weight.as_ptr()), Shared(series));
        tiles.par_iter().enumerate().for_each(|(t, &(s, first))| {
            let series = &series.get()[s];
            let end = match tiles.get(t + 1) {
                Some(&(next, next_first)) if next == s => next_first,
                _ => series.columns,
            };
            let dst = Matrix {
                ptr: series.dst.wrapping_add(first),
                row: series.dst_row as isize,
                col: 1,
            };
            for (k, tap) in self.taps().enumerate() {
                let lhs = Matrix {
                    ptr: weight.get().wrapping_add(k) as *mut f32,
                    row: (self.c_in * taps) as isize,
                    col: taps as isize,
                };
                let rhs = Matrix {
                    ptr: series.rhs.wrapping_add(self.tap_start(tap) + first) as *mut f32,
                    row: series.rhs_row as isize,
                    col: 1,
                };
                let sum = Sum {
                    scale: 1.0,
                    accumulate: accumulate || k > 0,
                    parallelism: gemm::Parallelism::None,
                };
                let dims = [self.c_out, self.c_in, end - first];
                // Safety: every series' rows cover its taps' reads (`buffer_len`, or a
                // 1×1 kernel's input), its destination is [C_out, columns] at `dst_row`
                // apart, and each task writes its own columns.
                unsafe { gemm_into(dst, lhs, rhs, dims, sum) };
            }
        });
    }

    /// The output `[B, C_out, H_out, W_out]`: the valid columns of `wide`, plus the bias.
    fn crop(&self, wide: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let [out_h, out_w] = self.output;
        let n = self.columns();
        let mut out = vec![0.0; self.batch * self.c_out * out_h * out_w];
        out.par_chunks_mut(out_h * out_w)
            .enumerate()
            .for_each(|(index, plane)| {
                let (b, o) = (index / self.c_out, index % self.c_out);
                let add = bias.map_or(0.0, |bias| bias[o]);
                let src = &wide[o * n + b * self.plane_len()..];
                for (y, out_row) in plane.chunks_exact_mut(out_w).enumerate() {
                    let row = &src[y * self.phase[1]..][..out_w];
                    for (o, x) in out_row.iter_mut().zip(row) {
                        *o = x + add;
                    }
                }
            });
        out
    }

    /// The convolution of the padded input's phase planes ([`Self::split_phases`]), which
    /// are let go before the output is cropped: at most two of input, phases, wide output
    /// and output are held at once (a 512 px VAE decode's 256-channel layers are 268 MB
    /// each).
    fn convolve_phases(&self, phases: Vec<f32>, weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let mut wide = vec![0.0; self.c_out * self.columns()];
        let series = Series {
            rhs: phases.as_ptr(),
            rhs_row: self.row_len(),
            dst: wide.as_mut_ptr(),
            dst_row: self.columns(),
            columns: self.columns(),
        };
        self.products(weight, &[series], false);
        drop(phases);
        self.crop(&wide, bias)
    }

    /// A 1×1 kernel at stride 1 without padding: each image's input `[C_in, H·W]` is
    /// already the product's right operand and its output `[C_out, H·W]` the destination,
    /// so nothing is copied; the bias is there before the products add to it.
    fn is_pointwise(&self) -> bool {
        self.kernel == [1, 1] && self.stride == [1, 1] && self.padding == [0, 0]
    }

    fn pointwise(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let pixels = self.input[0] * self.input[1];
        let mut out = vec![0.0; self.batch * self.c_out * pixels];
        if let Some(bias) = bias {
            for (row, b) in out.chunks_exact_mut(pixels).zip(bias.iter().cycle()) {
                row.fill(*b);
            }
        }
        let series: Vec<Series> = (0..self.batch)
            .map(|b| Series {
                rhs: x[b * self.c_in * pixels..].as_ptr(),
                rhs_row: pixels,
                dst: out[b * self.c_out * pixels..].as_mut_ptr(),
                dst_row: pixels,
                columns: pixels,
            })
            .collect();
        self.products(weight, &series, bias.is_some());
        out
    }

    /// The plan for f32 tensors (`None` when any is of another type, or as [`Self::new`]).
    pub fn of(
        x: &FlexTensor,
        weight: &FlexTensor,
        bias: Option<&FlexTensor>,
        options: &ConvOptions<2>,
    ) -> Option<Self> {
        let tensors = [Some(x), Some(weight), bias];
        let all_f32 = tensors.iter().flatten().all(|t| t.dtype() == DType::F32);
        let dims = |t: &FlexTensor| <[usize; 4]>::try_from(t.layout().shape().to_vec()).ok();
        match (all_f32, dims(x), dims(weight)) {
            (true, Some(x), Some(weight)) => Self::new(x, weight, options),
            _ => None,
        }
    }

    /// The convolution of the tensors this plan was made for. The input is let go once its
    /// phase planes are made (freed there unless something else holds it).
    pub fn run(&self, x: FlexTensor, weight: FlexTensor, bias: Option<FlexTensor>) -> FlexTensor {
        let [x, weight] = [x, weight].map(|t| t.to_contiguous());
        let bias = bias.map(|t| t.to_contiguous());
        let (weight, bias) = (values(&weight), bias.as_ref().map(values));
        let out = match (Winograd::new(self), self.is_pointwise()) {
            (Some(winograd), _) => winograd.run(values(&x), weight, bias),
            (None, true) => self.pointwise(values(&x), weight, bias),
            (None, false) => {
                let phases = self.split_phases(values(&x));
                drop(x);
                self.convolve_phases(phases, weight, bias)
            }
        };
        let [out_h, out_w] = self.output;
        let shape = Shape::from(vec![self.batch, self.c_out, out_h, out_w]);
        f32_tensor(out, shape)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::ops::ModuleOps;
    use burn::tensor::{Tensor, TensorData, TensorPrimitive};

    use super::*;
    use crate::backend::MicroditBackend;

    fn options(stride: usize, padding: [usize; 2]) -> ConvOptions<2> {
        ConvOptions::new([stride, stride], padding, [1, 1], 1)
    }

    #[test]
    fn a_stride_2_plan_reads_each_tap_from_its_phase() {
        // x [2, 8, 7, 6], 3×3 taps, stride 2, padding 1: padded 9×8, phases 5×4, output 4×3.
        let plan = ConvPlan::new([2, 8, 7, 6], [16, 8, 3, 3], &options(2, [1, 1])).unwrap();
        assert_eq!(plan.output, [4, 3]);
        assert_eq!(plan.phase, [5, 4]);
        assert_eq!(plan.row_len(), 2 * 20);
        // Up to the last output of the second image: 20 + 3·4 + 3.
        assert_eq!(plan.columns(), 35);
        let phase_len = 8 * 40;
        assert_eq!(plan.tap_start([0, 0]), 0);
        assert_eq!(plan.tap_start([0, 1]), phase_len);
        assert_eq!(plan.tap_start([1, 0]), 2 * phase_len);
        assert_eq!(plan.tap_start([2, 2]), 4 + 1);
        assert_eq!(plan.tap_start([2, 1]), phase_len + 4);
        // Every tap's rows end inside the planes: tap (1, 1) of phase 3 reads up to 1,275.
        assert_eq!(plan.buffer_len(), 4 * phase_len);
    }

    #[test]
    fn the_last_taps_of_a_stride_1_plan_read_past_the_planes() {
        let plan = ConvPlan::new([1, 8, 4, 4], [2, 8, 3, 3], &options(1, [1, 1])).unwrap();
        assert_eq!(
            (plan.output, plan.phase, plan.columns()),
            ([4, 4], [6, 6], 22)
        );
        // Tap (2, 2) starts 2·6 + 2 elements in and reads 22 columns of the last row.
        assert_eq!(plan.buffer_len(), 14 + 7 * 36 + 22);
    }

    #[test]
    fn thin_grouped_or_dilated_convolutions_are_left_to_burn() {
        assert!(ConvPlan::new([1, 3, 8, 8], [4, 3, 3, 3], &options(1, [1, 1])).is_none());
        let grouped = ConvOptions::new([1, 1], [1, 1], [1, 1], 2);
        assert!(ConvPlan::new([1, 8, 8, 8], [4, 4, 3, 3], &grouped).is_none());
        let dilated = ConvOptions::new([1, 1], [1, 1], [2, 2], 1);
        assert!(ConvPlan::new([1, 8, 8, 8], [4, 8, 3, 3], &dilated).is_none());
        assert!(ConvPlan::new([1, 8, 2, 2], [4, 8, 3, 3], &options(1, [0, 0])).is_none());
    }

    fn values(shape: [usize; 4], seed: f32) -> Tensor<Flex, 4> {
        let n = shape.iter().product::<usize>();
        let data = (0..n)
            .map(|i| (i as f32 * 0.377 + seed).sin())
            .collect::<Vec<_>>();
        Tensor::from_data(TensorData::new(data, shape), &Default::default())
    }

    /// The shifted products and the Winograd form against burn-flex's own convolution:
    /// the VAE's and Inception's kinds (3×3 with and without padding, stride 2, 1×1 with
    /// and without a bias, 1×7 and 7×1, 5×5; 3×3 at stride 1 with 64 channels or more
    /// takes the Winograd form), odd sizes, batches, with and without a bias.
    #[test]
    fn shifted_products_equal_burns_convolution() {
        /// x's shape, the weight's, the stride, the padding.
        type Case = ([usize; 4], [usize; 4], usize, [usize; 2]);
        let cases: [Case; 11] = [
            ([2, 64, 9, 7], [65, 64, 3, 3], 1, [1, 1]),
            ([1, 70, 6, 5], [64, 70, 3, 3], 1, [0, 0]),
            ([3, 64, 4, 11], [72, 64, 3, 3], 1, [1, 1]),
            ([1, 8, 9, 7], [5, 8, 3, 3], 1, [1, 1]),
            ([2, 9, 9, 8], [4, 9, 3, 3], 2, [0, 0]),
            ([3, 16, 6, 6], [7, 16, 1, 1], 1, [0, 0]),
            ([2, 8, 7, 9], [3, 8, 1, 7], 1, [0, 3]),
            ([2, 8, 9, 7], [3, 8, 7, 1], 1, [3, 0]),
            ([1, 12, 11, 10], [6, 12, 5, 5], 1, [2, 2]),
            ([2, 8, 10, 11], [4, 8, 3, 3], 2, [1, 1]),
            ([2, 8, 5, 5], [3, 8, 1, 1], 1, [0, 0]),
        ];
        for (i, (x_shape, w_shape, stride, padding)) in cases.into_iter().enumerate() {
            let (x, w) = (values(x_shape, 0.1), values(w_shape, 1.3));
            let bias = (i % 2 == 0).then(|| {
                let b = (0..w_shape[0])
                    .map(|o| o as f32 * 0.25 - 0.5)
                    .collect::<Vec<_>>();
                Tensor::<Flex, 1>::from_data(TensorData::new(b, [w_shape[0]]), &Default::default())
            });
            let opts = options(stride, padding);
            let prim = |t: Tensor<Flex, 4>| t.into_primitive().tensor();
            let bias_prim = || bias.clone().map(|b| b.into_primitive().tensor());
            assert!(ConvPlan::of(&prim(x.clone()), &prim(w.clone()), None, &opts).is_some());
            let ours =
                Flex::convolution(prim(x.clone()), prim(w.clone()), bias_prim(), opts.clone());
            let burns = <Flex as ModuleOps<Flex>>::conv2d(prim(x), prim(w), bias_prim(), opts);
            let wrap = |t| Tensor::<Flex, 4>::from_primitive(TensorPrimitive::Float(t));
            let (ours, burns) = (wrap(ours), wrap(burns));
            assert_eq!(ours.dims(), burns.dims(), "case {i}");
            let diff = (ours - burns.clone()).abs().max().into_scalar();
            let scale = burns.abs().max().into_scalar();
            assert!(diff <= 1e-5 * scale, "case {i}: {diff} against {scale}");
        }
    }
}
