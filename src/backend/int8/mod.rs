//! int8 matrix products for generation on the CPU: `y = x · wᵀ` with the weights `w`
//! quantised ahead of time per output channel and the activations `x` per row (token) at
//! run time, both symmetric in [-127, 127]:
//!
//! `y[m, n] = (Σ_k xq[m, k] · wq[n, k]) · sx[m] · sw[n]`, `xq = round(x / sx)`, `sx = max|x| / 127`.
//!
//! The sums are exact in i32 (|Σ| ≤ 127² · k < 2³¹ for k < 133 000), so every kernel gives
//! the same integers as [`Kernel::Scalar`], the reference. Both operands keep each row's
//! k values contiguous (PyTorch's `Linear.weight` layout), and a tile of `MR` activation
//! rows × `NR` weight rows is summed in SIMD lanes along k, reduced once at the end:
//! - **AVX2** (`vpmaddubsw` + `vpmaddwd`): `vpmaddubsw` multiplies unsigned by signed
//!   bytes, so x's magnitude meets w with x's sign moved onto it (`vpsignb`, ggml's
//!   trick); pairs then sum to at most 2 · 127² < 2¹⁵, inside its i16 lanes.
//! - **AVX-512 VNNI** (`vpdpbusd`, four products into each i32 lane without an i16 step)
//!   takes its own layout instead: [`vnni`].

use rayon::prelude::*;

pub mod vnni;

/// Activation rows per tile and weight rows per tile: 2 × 4 accumulators plus the
/// operands fit the 16 vector registers of AVX2 (4 × 2, 3 × 4 and 6 × 2 measured within
/// 10% of it: the two multiplies per 32 products bound it, not the registers).
const MR: usize = 2;
const NR: usize = 4;
/// Activation rows and weight rows per parallel task: a task's operands stay in L2.
const ROWS_PER_TASK: usize = 64;
const WEIGHTS_PER_TASK: usize = 64;

/// The integer dot-product kernels, chosen by what the CPU has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust: the reference every other kernel equals.
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Kernel {
    /// The fastest kernel this CPU runs (looked up once: every product asks).
    pub fn detect() -> Self {
        static FASTEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *FASTEST.get_or_init(|| *Self::available().last().expect("the scalar kernel runs"))
    }

    /// Every kernel this CPU runs, the reference first.
    pub fn available() -> Vec<Self> {
        let mut kernels = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") {
                kernels.push(Self::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
            {
                kernels.push(Self::Avx512Vnni);
            }
        }
        kernels
    }
}

/// Rows of int8 values, each with its f32 scale: the value `v` stands for `v · scale`.
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Rows {
    pub values: Vec<i8>,
    pub scales: Vec<f32>,
    pub cols: usize,
}

impl Int8Rows {
    pub fn rows(&self) -> Rows<'_> {
        Rows {
            values: &self.values,
            scales: &self.scales,
            cols: self.cols,
        }
    }
}

/// [`Int8Rows`] where they lie.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub values: &'a [i8],
    pub scales: &'a [f32],
    pub cols: usize,
}

/// Quantises each row of `x` (`cols` wide) symmetrically: scale = max|x| / 127, values
/// round(x · (1 / max|x|) · 127), ties to even, in the order of operations of
/// [`super::int8_matmul_unfused`] so that both round alike. An all-zero row gets scale 0.
pub fn quantize_rows(x: &[f32], cols: usize) -> Int8Rows {
    assert!(
        cols > 0 && x.len().is_multiple_of(cols),
        "rows of {cols} values"
    );
    let rows = x.len() / cols;
    let mut values = vec![0i8; x.len()];
    let mut scales = vec![0f32; rows];
    values
        .par_chunks_mut(cols)
        .zip(scales.par_iter_mut())
        .zip(x.par_chunks(cols))
        .for_each(|((q, scale), x)| quantize_row(x, q, scale));
    Int8Rows {
        values,
        scales,
        cols,
    }
}

compiled_per_cpu! {
    /// One row of [`quantize_rows`]: its values into `q`, its scale into `scale`.
    pub fn quantize_row(x: &[f32], q: &mut [i8], scale: &mut f32) => quantize_row_portable
}

fn quantize_row_portable(x: &[f32], q: &mut [i8], scale: &mut f32) {
    let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inverse = max.max(f32::MIN_POSITIVE).recip() * 127.0;
    for (q, v) in q.iter_mut().zip(x) {
        // NaN (0 · ∞ in an all-zero row) becomes 0 as `as` would make it, and the cast
        // sees a finite value in i32's range: one vector conversion, no saturation code.
        let v = round_ties_even(v * inverse);
        let v = if v.is_nan() {
            0.0
        } else {
            v.clamp(-127.0, 127.0)
        };
        // SAFETY: v is finite and within [-127, 127].
        *q = unsafe { v.to_int_unchecked::<i32>() } as i8;
    }
    *scale = max / 127.0;
}

/// `v` rounded to the nearest integer, ties to even, for |v| < 2²²: adding 1.5 · 2²³ leaves
/// no fraction bits, so the addition rounds as the FPU does (to nearest, ties to even).
/// Unlike `f32::round_ties_even`, which is a library call on x86-64 without SSE4.1, this
/// vectorises.
#[inline]
fn round_ties_even(v: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    (v + SHIFT) - SHIFT
}

/// `y = x · wᵀ` for `batch` pairs of matrices one after another: `x` [batch, m, k] f32,
/// `w` [batch, n, k] int8 with scales [batch, n], values in [-127, 127]. Returns
/// [batch, m, n]. `w_sums` holds Σ_k w of each weight row ([`super::int8_row_sums`]), which the VNNI
/// kernel needs.
pub fn matmul(x: &[f32], w: Rows, w_sums: &[i32], batch: usize, kernel: Kernel) -> Vec<f32> {
    product(quantize_rows(x, w.cols).rows(), w, w_sums, batch, kernel)
}

/// [`matmul`] of activations already quantised.
fn product(x: Rows, w: Rows, w_sums: &[i32], batch: usize, kernel: Kernel) -> Vec<f32> {
    let (m, n) = (x.scales.len() / batch, w.scales.len() / batch);
    if m * n * w.cols == 0 {
        return vec![0.0; batch * m * n];
    }
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512Vnni {
        return vnni::product(x, w, w_sums, batch, vnni::x86::tile_vnni);
    }
    let operands = Operands {
        kernel,
        x: x.values,
        w: w.values,
        k: w.cols,
    };
    let mut y = vec![0f32; batch * m * n];
    let row_blocks = m.div_ceil(ROWS_PER_TASK);
    // Tasks own disjoint [rows × weights] blocks of y; written through `Out`.
    let out = Out(y.as_mut_ptr());
    let tasks: Vec<Task> = (0..batch)
        .flat_map(|b| {
            (0..row_blocks).flat_map(move |i| {
                (0..n.div_ceil(WEIGHTS_PER_TASK)).map(move |j| Task {
                    batch: b,
                    rows: i * ROWS_PER_TASK..((i + 1) * ROWS_PER_TASK).min(m),
                    weights: j * WEIGHTS_PER_TASK..((j + 1) * WEIGHTS_PER_TASK).min(n),
                })
            })
        })
        .collect();
    tasks.par_iter().for_each(|task| {
        let out = &out;
        operands.run(task, m, n, x.scales, w.scales, out)
    });
    y
}

/// One parallel task: a block of activation rows against a block of weight rows.
struct Task {
    batch: usize,
    rows: std::ops::Range<usize>,
    weights: std::ops::Range<usize>,
}

/// The output buffer, shared by tasks that write disjoint elements.
struct Out(*mut f32);
unsafe impl Sync for Out {}

/// What the dot-product kernels read: both operands' rows, k values each.
struct Operands<'a> {
    kernel: Kernel,
    x: &'a [i8],
    w: &'a [i8],
    k: usize,
}

impl Operands<'_> {
    fn run(&self, task: &Task, m: usize, n: usize, sx: &[f32], sw: &[f32], out: &Out) {
        let k = self.k;
        let x_row = |r: usize| &self.x[(task.batch * m + r) * k..][..k];
        let w_row = |c: usize| &self.w[(task.batch * n + c) * k..][..k];
        for r in task.rows.clone().step_by(MR) {
            // Edge tiles repeat their last row; only the real rows are written.
            let rows: [usize; MR] = std::array::from_fn(|i| (r + i).min(task.rows.end - 1));
            for c in task.weights.clone().step_by(NR) {
                let cols: [usize; NR] = std::array::from_fn(|j| (c + j).min(task.weights.end - 1));
                let sums = self.tile(rows.map(x_row), cols.map(w_row));
                for (i, &row) in rows.iter().enumerate().take(task.rows.end - r) {
                    let row = task.batch * m + row;
                    for (j, &col) in cols.iter().enumerate().take(task.weights.end - c) {
                        let y = sums[i][j] as f32 * sx[row] * sw[task.batch * n + col];
                        // SAFETY: (row, col) lies in this task's block, which no other
                        // task writes, and inside the [batch·m, n] buffer.
                        unsafe { *out.0.add(row * n + col) = y };
                    }
                }
            }
        }
    }

    fn tile(&self, x: [&[i8]; MR], w: [&[i8]; NR]) -> [[i32; NR]; MR] {
        match self.kernel {
            Kernel::Scalar => tile_scalar(x, w),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Kernel::available` offers AVX2 only where the CPU has it.
            Kernel::Avx2 => unsafe { x86::tile_avx2(x, w) },
            Kernel::Avx512Vnni => unreachable!("VNNI products take `vnni::product`"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the scalar kernel exists off x86-64"),
        }
    }
}

/// The reference: each sum in plain integer arithmetic.
fn tile_scalar<const R: usize, const C: usize>(x: [&[i8]; R], w: [&[i8]; C]) -> [[i32; C]; R] {
    x.map(|x| w.map(|w| dot(x, w)))
}

fn dot(x: &[i8], w: &[i8]) -> i32 {
    x.iter()
        .zip(w)
        .map(|(&a, &b)| i32::from(a) * i32::from(b))
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{dot, MR, NR};
    use std::arch::x86_64::*;

    /// AVX2: 32 bytes of k per step; the tail past the last full step in scalar.
    #[target_feature(enable = "avx2")]
    pub unsafe fn tile_avx2(x: [&[i8]; MR], w: [&[i8]; NR]) -> [[i32; NR]; MR] {
        let k = x[0].len();
        let steps = k / 32;
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_si256(); NR]; MR];
        for s in 0..steps {
            let xs: [__m256i; MR] = x.map(|x| _mm256_loadu_si256(x.as_ptr().add(s * 32).cast()));
            let magnitudes = xs.map(|v| _mm256_abs_epi8(v));
            for j in 0..NR {
                let wv = _mm256_loadu_si256(w[j].as_ptr().add(s * 32).cast());
                for i in 0..MR {
                    let signed = _mm256_sign_epi8(wv, xs[i]);
                    let pairs = _mm256_maddubs_epi16(magnitudes[i], signed);
                    acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        finish(acc.map(|row| row.map(|v| sum_256(v))), x, w, steps * 32)
    }

    #[target_feature(enable = "avx2")]
    unsafe fn sum_256(v: __m256i) -> i32 {
        let half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0b01_00_11_10));
        let half = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0b10_11_00_01));
        _mm_cvtsi128_si32(half)
    }

    /// Adds the products of the columns from `start` on.
    fn finish(
        mut sums: [[i32; NR]; MR],
        x: [&[i8]; MR],
        w: [&[i8]; NR],
        start: usize,
    ) -> [[i32; NR]; MR] {
        for i in 0..MR {
            for j in 0..NR {
                sums[i][j] += dot(&x[i][start..], &w[j][start..]);
            }
        }
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_rows(rows: usize, cols: usize, rng: &mut ChaCha8Rng) -> Int8Rows {
        Int8Rows {
            values: (0..rows * cols)
                .map(|_| rng.random_range(-127..=127))
                .collect(),
            scales: (0..rows).map(|_| rng.random_range(0.5..2.0)).collect(),
            cols,
        }
    }

    /// Every kernel this CPU has gives the exact integer sums, on sizes that leave tails
    /// in every direction (k past a 32- and 64-byte step, rows past a tile and a task).
    #[test]
    fn every_kernel_sums_exactly_on_odd_sizes() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (batch, m, n, k) in [
            (1, 1, 1, 1),
            (2, 5, 3, 33),
            (1, 67, 131, 95),
            (3, 9, 70, 200),
            (2, 17, 49, 130),
        ] {
            let w = random_rows(batch * n, k, &mut rng);
            let x = random_rows(batch * m, k, &mut rng);
            let expected: Vec<i64> = (0..batch * m * n)
                .map(|i| {
                    let (b, r, c) = (i / (m * n), i / n % m, i % n);
                    (0..k)
                        .map(|j| {
                            i64::from(x.values[(b * m + r) * k + j])
                                * i64::from(w.values[(b * n + c) * k + j])
                        })
                        .sum()
                })
                .collect();
            let (x, w) = (unit_scales(&x), unit_scales(&w));
            let w_sums = row_sums(&w.values, k);
            for kernel in Kernel::available() {
                let sums = integer_sums(&product(x.rows(), w.rows(), &w_sums, batch, kernel));
                assert_eq!(sums, expected, "{kernel:?} on {batch}×{m}×{n}×{k}");
            }
            // VNNI's packing, compensation and edges, on any CPU.
            let packed = vnni::product(x.rows(), w.rows(), &w_sums, batch, vnni::tile_reference);
            assert_eq!(
                integer_sums(&packed),
                expected,
                "VNNI layout on {batch}×{m}×{n}×{k}"
            );
        }
    }

    /// Σ_k of each row of `cols` values.
    fn row_sums(values: &[i8], cols: usize) -> Vec<i32> {
        values
            .chunks(cols)
            .map(|row| row.iter().map(|&v| i32::from(v)).sum())
            .collect()
    }

    /// Every scale 1: the products are the integer sums (exact in f32 below 2²⁴).
    fn unit_scales(r: &Int8Rows) -> Int8Rows {
        Int8Rows {
            scales: vec![1.0; r.scales.len()],
            ..r.clone()
        }
    }

    fn integer_sums(y: &[f32]) -> Vec<i64> {
        y.iter().map(|&v| v as i64).collect()
    }

    #[test]
    fn quantised_rows_come_back_within_half_a_step() {
        let x = [0.5f32, -1.0, 0.25, 0.0, 0.0, 0.0, 0.0, 0.0];
        let q = quantize_rows(&x, 4);
        assert_eq!(q.values[..4], [64, -127, 32, 0]);
        assert_eq!(q.scales, [1.0 / 127.0, 0.0]);
        assert_eq!(q.values[4..], [0; 4]);
    }

    #[test]
    fn the_product_is_close_to_the_float_product() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (m, n, k) = (7, 5, 300);
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1..0.1)).collect();
        let exact: Vec<f32> = (0..m * n)
            .map(|i| (0..k).map(|j| x[i / n * k + j] * w[i % n * k + j]).sum())
            .collect();
        let w = quantize_rows(&w, k);
        let y = matmul(&x, w.rows(), &row_sums(&w.values, k), 1, Kernel::detect());
        let error = y
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            .sqrt();
        let norm = exact.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!(error / norm < 0.01, "relative error {}", error / norm);
    }
}
