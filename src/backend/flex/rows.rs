//! Row kernels: softmax and its backward (the CPU attention), a group norm with an optional
//! SiLU (the VAE), a layer norm with a scale and its backward, SwiGLU's gated product and
//! exact GELU with their backwards. Written so that the compiler vectorises them
//! (independent lanes, no libm call per element), and compiled for AVX-512 and AVX2 beside
//! the baseline, chosen at run time as gemm chooses its own.

/// Lanes of the partial maxima and sums: a multiple of every vector width used.
const LANES: usize = 16;

compiled_per_cpu! {
    /// In-place softmax of the first `visible` entries; the rest become 0.
    pub fn softmax_row(row: &mut [f32], visible: usize) => softmax_row_portable
}

compiled_per_cpu! {
    /// `dp ← p ∘ (dp − Σ p ∘ dp)`: the softmax's backward for one row.
    pub fn softmax_backward_row(dp: &mut [f32], p: &[f32]) => softmax_backward_row_portable
}

compiled_per_cpu! {
    /// One group of a group norm: `x` holds the group's channels one after another, each
    /// `out.len() / scale.len()` values long. `out = (x − mean)·(var + ε)^-½·γ + β` per
    /// channel (`scale` γ and `shift` β), the mean and (biased) variance over the group;
    /// then `out ← out·σ(out)` when `silu`.
    pub fn group_norm_row(x: &[f32], out: &mut [f32], scale: &[f32], shift: &[f32], epsilon: f32, silu: bool) => group_norm_row_portable
}

compiled_per_cpu! {
    /// One row of a layer norm with a scale and no shift: `out = (x − mean)·r·γ` with
    /// `r = (var + ε)^-½`, the biased variance.
    pub fn layer_norm_row(x: &[f32], gamma: &[f32], out: &mut [f32], epsilon: f32) => layer_norm_row_portable
}

compiled_per_cpu! {
    /// The layer norm's backward for one row: with `x̂ = (x − mean)·r` and `h = grad·γ`,
    /// `dx = r·(h − mean(h) − x̂·mean(h·x̂))`, and `d_gamma += grad·x̂`.
    pub fn layer_norm_backward_row(x: &[f32], gamma: &[f32], grad: &[f32], dx: &mut [f32], d_gamma: &mut [f32], epsilon: f32) => layer_norm_backward_row_portable
}

compiled_per_cpu! {
    /// `out = silu(gate) · value`, element by element.
    pub fn swiglu_row(gate: &[f32], value: &[f32], out: &mut [f32]) => swiglu_row_portable
}

compiled_per_cpu! {
    /// SwiGLU's gradients from the output's `grad`: `d_value = grad · silu(gate)`,
    /// `d_gate = grad · value · σ(gate) · (1 + gate · (1 − σ(gate)))`.
    pub fn swiglu_backward_row(gate: &[f32], value: &[f32], grad: &[f32], d_gate: &mut [f32], d_value: &mut [f32]) => swiglu_backward_row_portable
}

compiled_per_cpu! {
    /// `out = x·Φ(x)`, exact GELU, element by element.
    pub fn gelu_row(x: &[f32], out: &mut [f32]) => gelu_row_portable
}

compiled_per_cpu! {
    /// GELU's gradient from the output's `grad`: `dx = grad·(Φ(x) + x·φ(x))`.
    pub fn gelu_backward_row(x: &[f32], grad: &[f32], dx: &mut [f32]) => gelu_backward_row_portable
}

#[inline(always)]
fn gelu_row_portable(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = v * normal_cdf(v);
    }
}

#[inline(always)]
fn gelu_backward_row_portable(x: &[f32], grad: &[f32], dx: &mut [f32]) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(grad) {
        *d = g * (normal_cdf(v) + v * FRAC_1_SQRT_2PI * exp(-0.5 * v * v));
    }
}

/// The standard normal distribution function `Φ(x) = ½·erfc(−x/√2)`, to a relative error
/// of about 1e-7·(1 + x²) (the rounding of x² in the exponent) down to x = −12, so GELU's
/// lower tail keeps its precision where `½(1 + erf)` would cancel: erfc by Numerical
/// Recipes' Chebyshev fit (`erfcc`, fractional error below 1.2e-7),
/// `erfc(z) = t·e^(−z² + P(t))` with `t = 1/(1 + z/2)` for `z = |x|/√2`; branch-free, so it
/// vectorises.
#[inline(always)]
fn normal_cdf(x: f32) -> f32 {
    let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let p = 0.170_872_77;
    let p = p * t - 0.822_152_23;
    let p = p * t + 1.488_515_9;
    let p = p * t - 1.135_204;
    let p = p * t + 0.278_868_07;
    let p = p * t - 0.186_288_06;
    let p = p * t + 0.096_784_18;
    let p = p * t + 0.374_091_96;
    let p = p * t + 1.000_023_7;
    let p = p * t - 1.265_512_2;
    // ½·erfc(|x|/√2): the tail beyond |x|.
    let tail = 0.5 * t * exp(p - z * z);
    if x < 0.0 {
        tail
    } else {
        1.0 - tail
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn swiglu_row_portable(gate: &[f32], value: &[f32], out: &mut [f32]) {
    for ((o, &g), &v) in out.iter_mut().zip(gate).zip(value) {
        *o = g * sigmoid(g) * v;
    }
}

#[inline(always)]
fn swiglu_backward_row_portable(
    gate: &[f32],
    value: &[f32],
    grad: &[f32],
    d_gate: &mut [f32],
    d_value: &mut [f32],
) {
    let n = gate.len();
    let (value, grad) = (&value[..n], &grad[..n]);
    let (d_gate, d_value) = (&mut d_gate[..n], &mut d_value[..n]);
    for i in 0..n {
        let (g, s) = (gate[i], sigmoid(gate[i]));
        d_value[i] = grad[i] * g * s;
        d_gate[i] = grad[i] * value[i] * s * (1.0 + g * (1.0 - s));
    }
}

#[inline(always)]
fn group_norm_row_portable(
    x: &[f32],
    out: &mut [f32],
    scale: &[f32],
    shift: &[f32],
    epsilon: f32,
    silu: bool,
) {
    let (mean, inv_std) = moments(x, epsilon);
    let channel_len = out.len() / scale.len();
    let channels = x
        .chunks_exact(channel_len)
        .zip(out.chunks_exact_mut(channel_len));
    for ((x, out), (gamma, beta)) in channels.zip(scale.iter().zip(shift)) {
        let (a, b) = (inv_std * gamma, beta - mean * inv_std * gamma);
        for (o, v) in out.iter_mut().zip(x) {
            *o = v * a + b;
        }
        if silu {
            // x·σ(x) = x / (1 + e⁻ˣ)
            out.iter_mut().for_each(|o| *o /= 1.0 + exp(-*o));
        }
    }
}

#[inline(always)]
fn layer_norm_row_portable(x: &[f32], gamma: &[f32], out: &mut [f32], epsilon: f32) {
    let (mean, r) = moments(x, epsilon);
    for ((o, v), g) in out.iter_mut().zip(x).zip(gamma) {
        *o = (v - mean) * r * g;
    }
}

#[inline(always)]
fn layer_norm_backward_row_portable(
    x: &[f32],
    gamma: &[f32],
    grad: &[f32],
    dx: &mut [f32],
    d_gamma: &mut [f32],
    epsilon: f32,
) {
    let n = x.len() as f32;
    let (mean, r) = moments(x, epsilon);
    // dx holds h = grad·γ until the last pass.
    for ((h, g), gm) in dx.iter_mut().zip(grad).zip(gamma) {
        *h = g * gm;
    }
    let mean_h = fold_lanes(dx, 0.0, |a, b| a + b) / n;
    let mean_h_x_hat = sum_pairs(dx, x, |h, v| h * (v - mean)) * r / n;
    let rows = dx
        .iter_mut()
        .zip(d_gamma.iter_mut())
        .zip(x.iter().zip(grad));
    for ((h, d_gamma), (v, g)) in rows {
        let x_hat = (v - mean) * r;
        *d_gamma += g * x_hat;
        *h = r * (*h - mean_h - x_hat * mean_h_x_hat);
    }
}

/// The mean of `x` and `(var + ε)^-½` of its biased variance, in two passes.
#[inline(always)]
fn moments(x: &[f32], epsilon: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = fold_lanes(x, 0.0, |a, b| a + b) / n;
    let var = sum_pairs(x, x, |v, _| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + epsilon).sqrt())
}

#[inline(always)]
fn softmax_row_portable(row: &mut [f32], visible: usize) {
    let (seen, hidden) = row.split_at_mut(visible);
    hidden.fill(0.0);
    let max = fold_lanes(seen, f32::NEG_INFINITY, |a, b| if b > a { b } else { a });
    for x in seen.iter_mut() {
        *x = exp(*x - max);
    }
    let sum = fold_lanes(seen, 0.0, |a, b| a + b);
    // One division, then products (as PyTorch's vectorised softmax): a vector division
    // takes several times a product's throughput.
    let inverse = sum.recip();
    seen.iter_mut().for_each(|x| *x *= inverse);
}

#[inline(always)]
fn softmax_backward_row_portable(dp: &mut [f32], p: &[f32]) {
    let dot = sum_pairs(dp, p, |g, p| g * p);
    dp.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
}

/// `Σ term(aᵢ, bᵢ)` over two rows of one length, in `LANES` independent partial sums.
#[inline(always)]
fn sum_pairs(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(&a, &b)| term(a, b))
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for i in 0..LANES {
            lanes[i] += term(a[i], b[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `op` folded over `values` in `LANES` independent lanes, then across them.
#[inline(always)]
fn fold_lanes(values: &[f32], init: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [init; LANES];
    let chunks = values.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(init, |a, &b| op(a, b));
    for chunk in chunks {
        for i in 0..LANES {
            lanes[i] = op(lanes[i], chunk[i]);
        }
    }
    lanes.into_iter().fold(tail, op)
}

/// `eˣ` to within 2 ulp for x ≤ 0 down to the smallest normal result (smaller x give that
/// result, not 0), and up to `e^88.3` (larger x give that): Cephes' `expf`, `eˣ = 2ⁿ·eʳ` with `n = round(x·log₂e)`, `r = x − n·ln 2`
/// in two parts (Cody–Waite) and a degree-7 polynomial for `eʳ`; branch-free and without
/// float-to-integer casts, so it vectorises.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer n, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.3 { 88.3 } else { x };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_2e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 0.166_666_65;
    let p = p * r + 0.5;
    let e_r = p * r * r + r + 1.0;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
    e_r * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (ours, libm) = (exp(x), x.exp());
            assert!(
                (ours - libm).abs() <= 2.0 * f32::EPSILON * libm,
                "{x}: {ours} vs {libm}"
            );
            x += 0.001_3;
        }
    }

    /// Φ against an f64 reference, relative to Φ: the lower tail (GELU of negative inputs)
    /// keeps its precision.
    #[test]
    fn normal_cdf_is_within_1e7_x_squared_of_an_f64_reference() {
        let mut x = -12.0f32;
        while x <= 12.0 {
            let tail = 0.5 * erfc_f64(x.abs() as f64 / std::f64::consts::SQRT_2);
            let want = if x < 0.0 { tail } else { 1.0 - tail };
            let ours = normal_cdf(x) as f64;
            let bound = 2e-7 * (4.0 + (x * x) as f64);
            assert!(
                ((ours - want) / want).abs() < bound,
                "{x}: {ours} vs {want}"
            );
            x += 0.003_7;
        }
    }

    /// erfc of `z ≥ 0` in f64: 1 − erf's power series below 2.5, the continued fraction of
    /// erfc above (no cancellation in the far tail).
    fn erfc_f64(z: f64) -> f64 {
        if z < 2.5 {
            let (mut term, mut sum, mut n) = (z, z, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -z * z / n;
                sum += term / (2.0 * n + 1.0);
            }
            1.0 - sum * std::f64::consts::FRAC_2_SQRT_PI
        } else {
            let mut fraction = 0.0;
            for k in (1..200).rev() {
                fraction = k as f64 / 2.0 / (z + fraction);
            }
            (-z * z).exp() / (z + fraction) / std::f64::consts::PI.sqrt()
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_hide_the_future() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 20.0).collect();
        let expected: Vec<f32> = {
            let max = row[..30].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = row[..30].iter().map(|x| (x - max).exp()).collect();
            let sum: f32 = e.iter().sum();
            e.iter().map(|x| x / sum).collect()
        };
        softmax_row(&mut row, 30);
        for (ours, want) in row.iter().zip(&expected) {
            assert!(
                (ours - want).abs() <= 1e-6 * want.max(1e-30) + 1e-12,
                "{ours} vs {want}"
            );
        }
        assert!(row[30..].iter().all(|&p| p == 0.0));
    }
}
