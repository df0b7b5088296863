//! int8 products on AVX-512 VNNI: `vpdpbusd` multiplies 4 unsigned bytes by 4 signed bytes
//! in each of 16 i32 lanes and adds the four products into the lane. Sixteen activation
//! rows are packed per product into a panel whose lane `r` holds row `r`'s k values in
//! groups of 4 (`[k / 4][16][4]`, transposed in registers: [`x86::transpose`]); each weight
//! row gives 4 bytes that the instruction broadcasts to every lane, so the weights are read
//! where they lie (PyTorch's `[n, k]`) and never copied. A tile of 16 activation rows × 16
//! weight rows keeps 16 accumulators along the whole of k and transposes them once, so that
//! each activation row's 16 outputs are stored as one vector: no horizontal sums.
//!
//! The activations go in as x + 128 (unsigned); `128 · Σ_k w[n, k]` is taken off each
//! output (oneDNN's compensation), from the weight's row sums, which its layer keeps
//! (`nn::linear::Int8Matrix`). The panel's padding is 0 (not x + 128 for x = 0): padded
//! rows are never stored, and k past the last whole group of 4 adds nothing.

use super::{Out, Rows};
use rayon::prelude::*;

/// Activation rows per panel and weight rows per tile: the i32 lanes of a 512-bit register.
const LANES: usize = 16;
/// k values per lane per instruction.
const GROUP: usize = 4;
/// Panels and weight tiles per parallel task: 64 × 64 outputs, whose operands stay in L2.
const PANELS_PER_TASK: usize = 4;
const TILES_PER_TASK: usize = 4;

/// Activations packed into panels of 16 rows as `vpdpbusd` takes them: x + 128 as unsigned
/// bytes, each group of 4 k values of the 16 rows side by side.
struct Panels {
    values: Vec<u8>,
    steps: usize,
}

impl Panels {
    /// The panels of `x`'s rows, `rows` of them per matrix (each matrix starts a panel).
    fn pack(x: Rows, rows: usize) -> Self {
        let k = x.cols;
        let steps = k.div_ceil(GROUP);
        let panel_bytes = steps * GROUP * LANES;
        let per_matrix = rows.div_ceil(LANES);
        let batch = x.scales.len() / rows;
        let mut values = vec![0u8; batch * per_matrix * panel_bytes];
        values
            .par_chunks_mut(panel_bytes)
            .enumerate()
            .for_each(|(panel, packed)| {
                let (b, first) = (panel / per_matrix, panel % per_matrix * LANES);
                let row = |lane: usize| &x.values[(b * rows + first + lane) * k..][..k];
                let real = (rows - first).min(LANES);
                pack_panel((0..real).map(row), packed);
            });
        Self { values, steps }
    }

    fn panel(&self, index: usize) -> &[u8] {
        let bytes = self.steps * GROUP * LANES;
        &self.values[index * bytes..][..bytes]
    }
}

/// Up to 16 rows into one panel. Whole panels on AVX-512 CPUs move 64 bytes of k at a time
/// ([`x86::pack_whole_panel`]); the rest (and every panel elsewhere) byte by byte here.
fn pack_panel<'a>(rows: impl ExactSizeIterator<Item = &'a [i8]> + Clone, packed: &mut [u8]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if rows.len() == LANES && super::Kernel::detect() == super::Kernel::Avx512Vnni {
        let whole: Vec<&[i8]> = rows.clone().collect();
        // SAFETY: the CPU has AVX-512 F (with VNNI); 16 rows of equal length.
        done = unsafe { x86::pack_whole_panel(whole.try_into().expect("16 rows"), packed) };
    }
    for (lane, row) in rows.enumerate() {
        for (i, &v) in row.iter().enumerate().skip(done) {
            // Flipping the sign bit adds 128 to a two's-complement byte.
            packed[(i / GROUP * LANES + lane) * GROUP + i % GROUP] = (v as u8) ^ 0x80;
        }
    }
}

/// One tile's work: what [`tile_reference`] and the VNNI kernel both do.
pub struct Tile<'a> {
    /// One panel of 16 activation rows.
    pub x: &'a [u8],
    /// 16 weight rows of k values (repeats of the last real one past `cols`).
    pub w: [&'a [i8]; LANES],
    /// Real activation rows and weight rows (each ≤ 16): only these outputs are written.
    pub rows: usize,
    pub cols: usize,
    /// Per activation row and per weight row (the first `rows` / `cols` are read).
    pub row_scales: &'a [f32],
    pub col_scales: &'a [f32],
    /// Σ_k w of each weight row.
    pub col_sums: &'a [i32],
    /// Output (row 0, column 0) and the distance between output rows.
    pub out: *mut f32,
    pub stride: usize,
}

impl Tile<'_> {
    /// The output of activation row `r`, weight row `c`, from its sum over the shifted x.
    fn output(&self, r: usize, c: usize, shifted_sum: i32) -> f32 {
        let sum = shifted_sum - 128 * self.col_sums[c];
        sum as f32 * self.row_scales[r] * self.col_scales[c]
    }
}

/// The tile kernel: [`tile_reference`] or the VNNI one.
pub type TileKernel = unsafe fn(&Tile);

/// `y = x · wᵀ` for `batch` pairs of [m, k] by [n, k] ([batch, m, n] out) through `kernel`,
/// which must run on this CPU; `w_sums` holds Σ_k w of each weight row.
pub fn product(x: Rows, w: Rows, w_sums: &[i32], batch: usize, kernel: TileKernel) -> Vec<f32> {
    let (m, n, k) = (x.scales.len() / batch, w.scales.len() / batch, w.cols);
    let panels = Panels::pack(x, m);
    // Never zeroed: the tiles write every output.
    let mut y = Vec::<f32>::with_capacity(batch * m * n);
    let out = Out(y.as_mut_ptr());
    let (panels_per_matrix, tiles_per_matrix) = (m.div_ceil(LANES), n.div_ceil(LANES));
    let (panel_blocks, tile_blocks) = (
        panels_per_matrix.div_ceil(PANELS_PER_TASK),
        tiles_per_matrix.div_ceil(TILES_PER_TASK),
    );
    (0..batch * panel_blocks * tile_blocks)
        .into_par_iter()
        .for_each(|task| {
            let out = &out;
            let b = task / (panel_blocks * tile_blocks);
            let (panel_block, tile_block) = (task / tile_blocks % panel_blocks, task % tile_blocks);
            let panels_here = panel_block * PANELS_PER_TASK
                ..((panel_block + 1) * PANELS_PER_TASK).min(panels_per_matrix);
            let tiles_here = tile_block * TILES_PER_TASK
                ..((tile_block + 1) * TILES_PER_TASK).min(tiles_per_matrix);
            for p in panels_here {
                let first_row = p * LANES;
                let rows = b * m + first_row..b * m + (first_row + LANES).min(m);
                for t in tiles_here.clone() {
                    let first_col = t * LANES;
                    let cols = b * n + first_col..b * n + (first_col + LANES).min(n);
                    let tile = Tile {
                        x: panels.panel(b * panels_per_matrix + p),
                        w: std::array::from_fn(|j| {
                            &w.values[(cols.start + j).min(cols.end - 1) * k..][..k]
                        }),
                        rows: rows.len(),
                        cols: cols.len(),
                        row_scales: &x.scales[rows.clone()],
                        col_scales: &w.scales[cols.clone()],
                        col_sums: &w_sums[cols.clone()],
                        // SAFETY: (row, column) lies inside the [batch · m, n] output.
                        out: unsafe { out.0.add(rows.start * n + first_col) },
                        stride: n,
                    };
                    // SAFETY: the caller runs only kernels this CPU has; the tile writes
                    // outputs of this task's rows and columns, which no other task writes.
                    unsafe { kernel(&tile) };
                }
            }
        });
    // SAFETY: the tasks' tiles cover every (row, column) of every matrix.
    unsafe { y.set_len(batch * m * n) };
    y
}

/// The tile in plain integer arithmetic on the packed panel: the reference the VNNI kernel
/// equals, and what tests of the packing run on any CPU.
///
/// # Safety
/// `tile.out` must reach `tile.cols` writable values on each of `tile.rows` rows.
pub unsafe fn tile_reference(tile: &Tile) {
    for r in 0..tile.rows {
        for c in 0..tile.cols {
            let sum: i32 = (0..tile.w[c].len())
                .map(|i| {
                    let x = tile.x[(i / GROUP * LANES + r) * GROUP + i % GROUP];
                    i32::from(x) * i32::from(tile.w[c][i])
                })
                .sum();
            // SAFETY: (r, c) inside the tile, as the caller promises.
            unsafe { *tile.out.add(r * tile.stride + c) = tile.output(r, c, sum) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{Tile, GROUP, LANES};
    use std::arch::x86_64::*;

    /// The first `k - k % 64` values of 16 rows into their panel: each block of 64 bytes of
    /// the 16 rows is a 16 × 16 matrix of 4-byte groups, transposed, with each byte's sign
    /// bit flipped. Returns how many k values it packed.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; every row as long as the first, `packed` a whole panel.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pack_whole_panel(rows: [&[i8]; LANES], packed: &mut [u8]) -> usize {
        let block = GROUP * LANES;
        let blocks = rows[0].len() / block;
        let flip = _mm512_set1_epi8(i8::MIN);
        for b in 0..blocks {
            let r = std::array::from_fn(|lane| unsafe {
                _mm512_loadu_si512(rows[lane][b * block..][..block].as_ptr().cast())
            });
            for (group, v) in transpose(r).into_iter().enumerate() {
                let at = &mut packed[(b * LANES + group) * block..][..block];
                unsafe { _mm512_storeu_si512(at.as_mut_ptr().cast(), _mm512_xor_si512(v, flip)) };
            }
        }
        blocks * block
    }

    /// A 16 × 16 matrix of 32-bit values, one row per register, transposed: interleaves of
    /// 32 and 64 bits within 128-bit lanes, then two rounds of 128-bit lane shuffles.
    #[target_feature(enable = "avx512f")]
    fn transpose(r: [__m512i; LANES]) -> [__m512i; LANES] {
        // t[4g..4g + 4]: rows 4g..4g + 4 interleaved by 32 bits.
        let t: [__m512i; LANES] = std::array::from_fn(|i| {
            let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
            match i % 2 {
                0 => _mm512_unpacklo_epi32(a, b),
                _ => _mm512_unpackhi_epi32(a, b),
            }
        });
        // u[4g + q]: columns q, q + 4, q + 8, q + 12 of rows 4g..4g + 4, one per 128-bit lane.
        let u: [__m512i; LANES] = std::array::from_fn(|i| {
            let (g, q) = (i / 4 * 4, i % 4);
            let (a, b) = (t[g + q / 2], t[g + q / 2 + 2]);
            match q % 2 {
                0 => _mm512_unpacklo_epi64(a, b),
                _ => _mm512_unpackhi_epi64(a, b),
            }
        });
        // v[q] / v[4 + q]: columns q and q + 8 / q + 4 and q + 12 of rows 0..8; v[8 + q] and
        // v[12 + q] the same of rows 8..16.
        let v: [__m512i; LANES] = std::array::from_fn(|i| {
            let (half, q) = (i / 8 * 8, i % 4);
            let (a, b) = (u[half + q], u[half + 4 + q]);
            match i % 8 / 4 {
                0 => _mm512_shuffle_i32x4(a, b, 0x88),
                _ => _mm512_shuffle_i32x4(a, b, 0xdd),
            }
        });
        std::array::from_fn(|c| {
            let q = c % 4;
            let (a, b) = match c % 8 / 4 {
                0 => (v[q], v[8 + q]),
                _ => (v[4 + q], v[12 + q]),
            };
            match c / 8 {
                0 => _mm512_shuffle_i32x4(a, b, 0x88),
                _ => _mm512_shuffle_i32x4(a, b, 0xdd),
            }
        })
    }

    /// # Safety
    /// The CPU must have AVX-512 F and VNNI; `tile.out` as in [`super::tile_reference`].
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn tile_vnni(tile: &Tile) {
        let k = tile.w[0].len();
        let steps = k / GROUP;
        let x = tile.x.as_ptr();
        let w = tile.w.map(|row| row.as_ptr());
        let mut acc = [_mm512_setzero_si512(); LANES];
        for s in 0..steps {
            let xv = unsafe { _mm512_loadu_si512(x.add(s * GROUP * LANES).cast()) };
            for j in 0..LANES {
                // SAFETY: group s lies inside each weight row (s < k / 4).
                let group = unsafe { w[j].add(s * GROUP).cast::<i32>().read_unaligned() };
                acc[j] = _mm512_dpbusd_epi32(acc[j], xv, _mm512_set1_epi32(group));
            }
        }
        if !k.is_multiple_of(GROUP) {
            let xv = unsafe { _mm512_loadu_si512(x.add(steps * GROUP * LANES).cast()) };
            for (acc, row) in acc.iter_mut().zip(tile.w) {
                let mut group = [0i8; GROUP];
                group[..k % GROUP].copy_from_slice(&row[steps * GROUP..]);
                let group = i32::from_le_bytes(group.map(|v| v as u8));
                *acc = _mm512_dpbusd_epi32(*acc, xv, _mm512_set1_epi32(group));
            }
        }
        // Row r of the transposed accumulators: activation row r against the 16 weight rows.
        let mask: __mmask16 = ((1u32 << tile.cols) - 1) as __mmask16;
        unsafe {
            let sums = _mm512_maskz_loadu_epi32(mask, tile.col_sums.as_ptr());
            let compensation = _mm512_slli_epi32(sums, 7);
            let col_scales = _mm512_maskz_loadu_ps(mask, tile.col_scales.as_ptr());
            for (r, shifted) in transpose(acc).into_iter().enumerate().take(tile.rows) {
                let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(shifted, compensation));
                let y = _mm512_mul_ps(
                    _mm512_mul_ps(sums, _mm512_set1_ps(tile.row_scales[r])),
                    col_scales,
                );
                _mm512_mask_storeu_ps(tile.out.add(r * tile.stride), mask, y);
            }
        }
    }
}
