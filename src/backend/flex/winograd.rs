//! 3×3 stride-1 convolution by Winograd's minimal filtering F(2×2, 3×3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2×2 block of outputs (a tile) of one output channel is `Aᵀ [Σ_ci U ⊙ V] A`, where
//! `V = Bᵀ d B` transforms the tile's 4×4 window `d` of the padded input channel ci and
//! `U = G g Gᵀ` that channel's 3×3 kernel `g`:
//!
//! ```text
//!        ⎡1  0 -1  0⎤       ⎡1   0   0⎤
//!   Bᵀ = ⎢0  1  1  0⎥   G = ⎢½   ½   ½⎥   Aᵀ = ⎡1  1  1  0⎤
//!        ⎢0 -1  1  0⎥       ⎢½  -½   ½⎥        ⎣0  1 -1 -1⎦
//!        ⎣0  1  0 -1⎦       ⎣0   0   1⎦
//! ```
//!
//! Summed over input channels, the element-wise products are 16 matrix products, one per
//! position ξ of the 4×4 transformed tile: `M_ξ [C_out, tiles] = U_ξ [C_out, C_in] ·
//! V_ξ [C_in, tiles]`. That is 16 multiply-adds per input channel and tile where the
//! shifted products (`conv.rs`) take 36: 2.25× fewer, for the transforms' additions. The
//! transforms' entries are 0, ±1 and ±½, so they add roundings but no cancellation that
//! direct summation lacks; the tests hold both kernels to the same bound against burn's
//! convolution.
//!
//! Tiles run in blocks of whole tile rows, sized so that a block's transformed input and
//! products stay a few tens of MB: the transforms read and write them once each, and the
//! products, on gemm's threads, run over enough tiles that packing `U_ξ` again for each
//! block costs little.

use std::ops::Range;

use rayon::prelude::*;

use super::{gemm_into, Matrix, Sum};
use crate::backend::shifted_conv::ShiftedConv;

/// Positions of a transformed tile.
const XI: usize = 16;

/// A block's transformed input and products together, in bytes.
const BLOCK_BYTES: usize = 32 << 20;

/// Fewer channels than this on either side make the products too thin to repay the
/// transforms: the shifted products serve those. (FID's Inception, whose 3×3 layers have
/// 32 to 448 channels, ran 10% slower with the Winograd form from 16 channels up, the same
/// from 64 or 128 up.)
const MIN_CHANNELS: usize = 64;

/// A 3×3, stride-1 convolution's plan: its geometry and its tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Winograd {
    conv: ShiftedConv,
    /// Tiles down and across one image: `⌈output / 2⌉`.
    tiles: [usize; 2],
}

impl std::ops::Deref for Winograd {
    type Target = ShiftedConv;

    fn deref(&self) -> &ShiftedConv {
        &self.conv
    }
}

impl Winograd {
    /// The Winograd form of a 3×3, stride-1 convolution with both sides at least
    /// [`MIN_CHANNELS`] wide; `None` for any other.
    pub fn new(conv: &ShiftedConv) -> Option<Self> {
        let fits = conv.kernel == [3, 3] && conv.stride == [1, 1];
        let wide = conv.c_in.min(conv.c_out) >= MIN_CHANNELS;
        (fits && wide).then_some(Self {
            conv: *conv,
            tiles: conv.output.map(|o| o.div_ceil(2)),
        })
    }

    /// Tile rows (an image's row of tiles) over the whole batch.
    fn tile_rows(&self) -> usize {
        self.batch * self.tiles[0]
    }

    /// Tile rows per block: as many as keep a block's V and M within [`BLOCK_BYTES`].
    fn block_rows(&self) -> usize {
        let row_bytes = 4 * XI * (self.c_in + self.c_out) * self.tiles[1];
        (BLOCK_BYTES / row_bytes).clamp(1, self.tile_rows())
    }

    /// `U = G g Gᵀ` for every kernel, laid out `[C_out, ξ, C_in]`: `U_ξ` is a `[C_out, C_in]`
    /// matrix with rows `16·C_in` apart.
    fn transform_weight(&self, weight: &[f32]) -> Vec<f32> {
        let mut u = vec![0.0; self.c_out * XI * self.c_in];
        u.par_chunks_mut(XI * self.c_in)
            .zip(weight.par_chunks(self.c_in * 9))
            .for_each(|(u, kernels)| {
                for (ci, g) in kernels.chunks_exact(9).enumerate() {
                    let rows = [0, 1, 2].map(|c| g_column([g[c], g[3 + c], g[6 + c]]));
                    for (i, row) in (0..4)
                        .map(|i| g_column([rows[0][i], rows[1][i], rows[2][i]]))
                        .enumerate()
                    {
                        for (j, value) in row.into_iter().enumerate() {
                            u[(4 * i + j) * self.c_in + ci] = value;
                        }
                    }
                }
            });
        u
    }

    /// `V = Bᵀ d B` for the tiles of tile rows `rows`, laid out `[C_in, ξ, tiles]`.
    ///
    /// A tile row's windows are four padded input rows, split into even and odd columns:
    /// tile tx's window columns are then `even[tx], odd[tx], even[tx + 1], odd[tx + 1]`,
    /// so both transforms run along whole rows, vectorised.
    fn transform_input(&self, x: &[f32], rows: Range<usize>, v: &mut [f32]) {
        let [h, w] = self.input;
        let [th, tw] = self.tiles;
        let [ph, pw] = self.padding;
        let tiles = rows.len() * tw;
        v.par_chunks_mut(XI * tiles)
            .enumerate()
            .for_each(|(ci, v)| {
                let mut v: Vec<&mut [f32]> = v.chunks_exact_mut(tiles).collect();
                let mut line = vec![0.0f32; 2 * tw + 2];
                let mut window = [(); 8].map(|_| vec![0.0f32; tw + 1]);
                let mut down = [(); 8].map(|_| vec![0.0f32; tw + 1]);
                for (r, row) in rows.clone().enumerate() {
                    let (b, ty) = (row / th, row % th);
                    let image = &x[(b * self.c_in + ci) * h * w..][..h * w];
                    for (k, halves) in window.chunks_exact_mut(2).enumerate() {
                        match (2 * ty + k).checked_sub(ph).filter(|&y| y < h) {
                            Some(y) => line[pw..pw + w].copy_from_slice(&image[y * w..][..w]),
                            None => line.fill(0.0),
                        }
                        let [even, odd] = halves else { unreachable!() };
                        let pairs = line
                            .chunks_exact(2)
                            .zip(even.iter_mut().zip(odd.iter_mut()));
                        for (pair, (even, odd)) in pairs {
                            (*even, *odd) = (pair[0], pair[1]);
                        }
                    }
                    // Bᵀ down the four rows, even and odd columns apart.
                    for half in 0..2 {
                        let [d0, d1, d2, d3] = [0, 1, 2, 3].map(|k| &window[2 * k + half][..]);
                        let [o0, o1, o2, o3] = pick4(&mut down, half);
                        apply(b_transpose, [d0, d1, d2, d3], [o0, o1, o2, o3]);
                    }
                    // B across each tile's four columns.
                    for i in 0..4 {
                        let (even, odd) = (&down[2 * i][..], &down[2 * i + 1][..]);
                        let columns = [&even[..tw], &odd[..tw], &even[1..], &odd[1..]];
                        let [o0, o1, o2, o3] = &mut v[4 * i..4 * i + 4] else {
                            unreachable!()
                        };
                        let at = r * tw..(r + 1) * tw;
                        let outputs = [
                            &mut o0[at.clone()],
                            &mut o1[at.clone()],
                            &mut o2[at.clone()],
                            &mut o3[at],
                        ];
                        apply(b_transpose, columns, outputs);
                    }
                }
            });
    }

    /// `Aᵀ M A` (+ bias) of the tiles of tile rows `rows`, M laid out `[C_out, ξ, tiles]`,
    /// into the output `[B, C_out, H_out, W_out]`.
    fn transform_output(
        &self,
        m: &[f32],
        rows: Range<usize>,
        bias: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let [oh, ow] = self.output;
        let [th, tw] = self.tiles;
        let tiles = rows.len() * tw;
        // Each (image, output channel) plane is written by one task: its rows in `rows`.
        out.par_chunks_mut(oh * ow)
            .enumerate()
            .for_each(|(plane_index, plane)| {
                let (b, co) = (plane_index / self.c_out, plane_index % self.c_out);
                let add = bias.map_or(0.0, |bias| bias[co]);
                let mut across = [(); 8].map(|_| vec![0.0f32; tw]);
                let mut tile = [(); 4].map(|_| vec![0.0f32; tw]);
                let image_rows = b * th..(b + 1) * th;
                for row in rows.start.max(image_rows.start)..rows.end.min(image_rows.end) {
                    let t = (row - rows.start) * tw;
                    let m_row = |xi: usize| &m[(co * XI + xi) * tiles + t..][..tw];
                    // A across each row of the transformed tiles, then down their two columns.
                    for i in 0..4 {
                        let [o0, o1] = pick2(&mut across, i);
                        apply(
                            a_transpose,
                            [0, 1, 2, 3].map(|j| m_row(4 * i + j)),
                            [o0, o1],
                        );
                    }
                    for dx in 0..2 {
                        let [o0, o1] = pick2(&mut tile, dx);
                        apply(
                            a_transpose,
                            [0, 1, 2, 3].map(|i| &across[2 * i + dx][..]),
                            [o0, o1],
                        );
                    }
                    // tile[2·dx + dy] holds output (2ty + dy, 2tx + dx) of each tile tx.
                    let ty = row % th;
                    for dy in 0..2 {
                        let y = 2 * ty + dy;
                        if y >= oh {
                            break;
                        }
                        let out_row = &mut plane[y * ow..][..ow];
                        for (pair, (left, right)) in out_row
                            .chunks_mut(2)
                            .zip(tile[dy].iter().zip(&tile[2 + dy]))
                        {
                            pair[0] = left + add;
                            if let Some(x) = pair.get_mut(1) {
                                *x = right + add;
                            }
                        }
                    }
                }
            });
    }

    /// The output `[B, C_out, H_out, W_out]` of x `[B, C_in, H, W]` and weight
    /// `[C_out, C_in, 3, 3]` (contiguous), plus the bias.
    pub fn run(&self, x: &[f32], weight: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        self.run_in_blocks(x, weight, bias, self.block_rows())
    }

    /// [`Self::run`] over blocks of `block` tile rows.
    fn run_in_blocks(
        &self,
        x: &[f32],
        weight: &[f32],
        bias: Option<&[f32]>,
        block: usize,
    ) -> Vec<f32> {
        let [oh, ow] = self.output;
        let mut out = vec![0.0; self.batch * self.c_out * oh * ow];
        let u = self.transform_weight(weight);
        for first in (0..self.tile_rows()).step_by(block) {
            let rows = first..(first + block).min(self.tile_rows());
            let tiles = rows.len() * self.tiles[1];
            let mut v = vec![0.0; self.c_in * XI * tiles];
            self.transform_input(x, rows.clone(), &mut v);
            let mut m = vec![0.0; self.c_out * XI * tiles];
            self.products(&u, &v, &mut m, tiles);
            drop(v);
            self.transform_output(&m, rows, bias, &mut out);
        }
        out
    }

    /// `M_ξ = U_ξ · V_ξ` for the 16 positions, each on gemm's threads.
    fn products(&self, u: &[f32], v: &[f32], m: &mut [f32], tiles: usize) {
        for xi in 0..XI {
            let matrix = |ptr: *const f32, row: usize| Matrix {
                ptr: ptr as *mut f32,
                row: row as isize,
                col: 1,
            };
            let dst = matrix(m[xi * tiles..].as_ptr(), XI * tiles);
            let lhs = matrix(u[xi * self.c_in..].as_ptr(), XI * self.c_in);
            let rhs = matrix(v[xi * tiles..].as_ptr(), XI * tiles);
            let sum = Sum {
                scale: 1.0,
                accumulate: false,
                parallelism: gemm::Parallelism::Rayon(rayon::current_num_threads()),
            };
            // Safety: U is [C_out, ξ, C_in], V [C_in, ξ, tiles] and M [C_out, ξ, tiles], so
            // each ξ's rows lie inside their buffers; M is written through this call only.
            unsafe { gemm_into(dst, lhs, rhs, [self.c_out, self.c_in, tiles], sum) };
        }
    }
}

/// `outputs[k][t] = transform(inputs[·][t])[k]` for every t: a 1-D transform applied along
/// equal rows, which the compiler vectorises.
#[inline(always)]
fn apply<const N: usize>(
    transform: impl Fn([f32; 4]) -> [f32; N],
    inputs: [&[f32]; 4],
    outputs: [&mut [f32]; N],
) {
    let n = outputs[0].len();
    let inputs = inputs.map(|row| &row[..n]);
    let mut outputs = outputs.map(|row| &mut row[..n]);
    for t in 0..n {
        let values = transform(inputs.map(|row| row[t]));
        for (row, value) in outputs.iter_mut().zip(values) {
            row[t] = value;
        }
    }
}

/// Rows `2k + half` for k in 0..4 of eight scratch rows, mutably.
fn pick4(rows: &mut [Vec<f32>; 8], half: usize) -> [&mut [f32]; 4] {
    let mut picked = rows
        .iter_mut()
        .skip(half)
        .step_by(2)
        .map(|row| &mut row[..]);
    [(); 4].map(|_| picked.next().expect("eight rows"))
}

/// Rows `2i` and `2i + 1` of scratch rows, mutably.
fn pick2(rows: &mut [Vec<f32>], i: usize) -> [&mut [f32]; 2] {
    let [a, b] = &mut rows[2 * i..2 * i + 2] else {
        unreachable!()
    };
    [&mut a[..], &mut b[..]]
}

/// `G g` for one column `g` of a kernel.
fn g_column([g0, g1, g2]: [f32; 3]) -> [f32; 4] {
    [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]
}

/// `Bᵀ d` for one column `d` of a window.
fn b_transpose([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// `Aᵀ m` for one column `m` of a transformed tile.
fn a_transpose([m0, m1, m2, m3]: [f32; 4]) -> [f32; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}

#[cfg(test)]
mod tests {
    use super::*;

    use burn::tensor::ops::ConvOptions;

    fn plan(x: [usize; 4], weight: [usize; 4], stride: usize, padding: usize) -> Option<Winograd> {
        let options = ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1);
        Winograd::new(&ShiftedConv::new(x, weight, &options)?)
    }

    #[test]
    fn only_wide_3x3_stride_1_convolutions_take_the_winograd_form() {
        assert!(plan([1, 64, 5, 5], [64, 64, 3, 3], 1, 1).is_some());
        assert!(plan([1, 32, 5, 5], [64, 32, 3, 3], 1, 1).is_none());
        assert!(plan([1, 64, 5, 5], [3, 64, 3, 3], 1, 1).is_none());
        assert!(plan([1, 64, 5, 5], [64, 64, 1, 1], 1, 0).is_none());
        assert!(plan([1, 64, 5, 5], [64, 64, 3, 3], 2, 1).is_none());
    }

    #[test]
    fn odd_outputs_end_in_half_tiles() {
        let plan = plan([2, 64, 7, 4], [64, 64, 3, 3], 1, 0).unwrap();
        assert_eq!(
            (plan.output, plan.tiles, plan.tile_rows()),
            ([5, 2], [3, 1], 6)
        );
    }

    /// Blocks of tile rows, within an image and across images, give the output one block
    /// of all rows gives (which `conv.rs`'s tests hold against burn's convolution).
    #[test]
    fn blocks_of_tile_rows_cover_the_output() {
        let plan = plan([3, 64, 7, 6], [64, 64, 3, 3], 1, 1).unwrap();
        let values = |n: usize, seed: f32| {
            (0..n)
                .map(|i| (i as f32 * 0.377 + seed).sin())
                .collect::<Vec<_>>()
        };
        let (x, weight, bias) = (
            values(3 * 64 * 42, 0.1),
            values(64 * 64 * 9, 1.3),
            values(64, 2.0),
        );
        let whole = plan.run_in_blocks(&x, &weight, Some(&bias), plan.tile_rows());
        for block in [1, 2, 5] {
            assert_eq!(
                plan.run_in_blocks(&x, &weight, Some(&bias), block),
                whole,
                "blocks of {block}"
            );
        }
    }

    /// One kernel and one window: the transforms' product against the nine products
    /// written out, for every output of the tile.
    #[test]
    fn one_tile_equals_its_direct_sums() {
        let g: [f32; 9] = [0.5, -1.0, 2.0, 0.25, 3.0, -0.75, 1.5, 0.0, -2.0];
        let d: [[f32; 4]; 4] = [
            [1.0, 2.0, -1.0, 0.5],
            [0.0, 3.0, 1.0, -2.0],
            [2.5, -1.5, 0.0, 1.0],
            [-1.0, 0.5, 2.0, 4.0],
        ];
        let u = |i: usize, j: usize| {
            let rows = [0, 1, 2].map(|c| g_column([g[c], g[3 + c], g[6 + c]]));
            g_column([rows[0][i], rows[1][i], rows[2][i]])[j]
        };
        let columns = [0, 1, 2, 3].map(|c| b_transpose([d[0][c], d[1][c], d[2][c], d[3][c]]));
        let v = |i: usize, j: usize| b_transpose(columns.map(|c| c[i]))[j];
        let m = |i: usize, j: usize| u(i, j) * v(i, j);
        let across = [0, 1, 2, 3].map(|i| a_transpose([m(i, 0), m(i, 1), m(i, 2), m(i, 3)]));
        for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let y = a_transpose([0, 1, 2, 3].map(|i| across[i][dx]))[dy];
            let direct: f32 = (0..9).map(|k| g[k] * d[dy + k / 3][dx + k % 3]).sum();
            assert!(
                (y - direct).abs() < 1e-5,
                "({dy}, {dx}): {y} against {direct}"
            );
        }
    }
}
