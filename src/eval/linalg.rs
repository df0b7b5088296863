//! The one piece of dense linear algebra the Fréchet distance needs, in f64:
//! `tr (Σ₁ Σ₂)^½`, the trace of the matrix square root pytorch-fid takes with scipy's `sqrtm`.
//!
//! For covariances (symmetric positive semi-definite) the eigenvalues of Σ₁Σ₂ are real and
//! non-negative, and the trace of its square root is the sum of their square roots. With
//! a pivoted Cholesky factor Σ₂ = P L Lᵀ Pᵀ (L of rank r), Σ₁Σ₂ has the same non-zero
//! eigenvalues as the symmetric r×r matrix Lᵀ Pᵀ Σ₁ P L, whose eigenvalues come from a
//! Householder tridiagonalisation and implicit QL (EISPACK `tred2`/`tql2` as in JAMA,
//! without eigenvectors). Rank-deficient covariances (fewer images than features) need no
//! special case: the factor simply has fewer columns. Round-off can leave tiny negative
//! eigenvalues where the exact ones are zero; they count as zero, which is what pytorch-fid
//! does when it keeps the real part of scipy's complex result.

use anyhow::{bail, Result};
use rayon::prelude::*;

/// A square matrix, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub n: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn new(n: usize, data: Vec<f64>) -> Self {
        assert_eq!(data.len(), n * n, "a {n}x{n} matrix");
        Self { n, data }
    }

    pub fn trace(&self) -> f64 {
        (0..self.n).map(|i| self.data[i * self.n + i]).sum()
    }

    fn row(&self, i: usize) -> &[f64] {
        &self.data[i * self.n..(i + 1) * self.n]
    }
}

/// `tr (a b)^½` for symmetric positive semi-definite `a` and `b`. The factored matrix is
/// the one of lower rank (fewer eigenvalues that are zero only up to round-off), and
/// eigenvalues below r·ε·λmax count as zero: the square root would turn round-off of
/// 1e-16 into 1e-8 per eigenvalue.
pub fn trace_sqrt_product(a: &Matrix, b: &Matrix) -> Result<f64> {
    if a.data.iter().chain(&b.data).any(|x| !x.is_finite()) {
        bail!("the covariance holds NaN or infinity");
    }
    let (fa, fb) = (pivoted_cholesky(a), pivoted_cholesky(b));
    let m = if fa.len() < fb.len() {
        congruence(b, &fa)
    } else {
        congruence(a, &fb)
    };
    let r = m.n;
    let eigenvalues = symmetric_eigenvalues(m)?;
    let largest = eigenvalues.iter().cloned().fold(0.0, f64::max);
    let negligible = r as f64 * f64::EPSILON * largest;
    Ok(eigenvalues
        .iter()
        .filter(|&&l| l > negligible)
        .map(|l| l.sqrt())
        .sum())
}

/// The columns of L in Σ = L Lᵀ as rows (r × n, rows indexed like Σ), choosing the largest
/// remaining diagonal as pivot and stopping when it falls below n·ε·max diag (LAPACK
/// `dpstrf`'s default tolerance): what is left is round-off, not variance.
fn pivoted_cholesky(s: &Matrix) -> Vec<Vec<f64>> {
    let n = s.n;
    let mut diag: Vec<f64> = (0..n).map(|i| s.data[i * n + i]).collect();
    let largest = diag.iter().cloned().fold(0.0, f64::max);
    let tolerance = n as f64 * f64::EPSILON * largest;
    let mut done = vec![false; n];
    let mut columns: Vec<Vec<f64>> = Vec::new();
    loop {
        let pivot = (0..n)
            .filter(|&i| !done[i])
            .max_by(|&i, &j| diag[i].total_cmp(&diag[j]));
        let Some(p) = pivot.filter(|&p| diag[p] > tolerance) else {
            break;
        };
        let root = diag[p].sqrt();
        let mut column = s.row(p).to_vec();
        for previous in &columns {
            let weight = previous[p];
            column
                .iter_mut()
                .zip(previous)
                .for_each(|(c, l)| *c -= weight * l);
        }
        done[p] = true;
        for (i, c) in column.iter_mut().enumerate() {
            if done[i] && i != p {
                *c = 0.0;
            } else {
                *c /= root;
                diag[i] -= *c * *c;
            }
        }
        columns.push(column);
    }
    columns
}

/// Lᵀ A L for `l` given as rows (the columns of L): an r×r symmetric matrix.
fn congruence(a: &Matrix, l: &[Vec<f64>]) -> Matrix {
    let n = a.n;
    // (A L)ᵀ row t = Σ_q L[q][t] · A row q  (A symmetric).
    let al: Vec<Vec<f64>> = l
        .par_iter()
        .map(|column| {
            let mut out = vec![0.0; n];
            for (q, &weight) in column.iter().enumerate() {
                if weight != 0.0 {
                    out.iter_mut()
                        .zip(a.row(q))
                        .for_each(|(o, x)| *o += weight * x);
                }
            }
            out
        })
        .collect();
    let r = l.len();
    let data: Vec<f64> = (0..r)
        .into_par_iter()
        .flat_map_iter(|s| {
            let al = &al;
            (0..r).map(move |t| dot(&l[s], &al[t]))
        })
        .collect();
    Matrix::new(r, data)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The eigenvalues of a symmetric matrix (unsorted).
pub fn symmetric_eigenvalues(m: Matrix) -> Result<Vec<f64>> {
    let (d, e) = tridiagonalise(m);
    tridiagonal_eigenvalues(d, e)
}

/// Householder reduction to tridiagonal form (JAMA `tred2` without accumulating the
/// transformations): the diagonal and the sub-diagonal (`e[i]` couples i−1 and i).
///
/// JAMA works on the lower triangle, column by column; here `w` holds the matrix
/// transposed (`w[j·n + k]` is JAMA's `V[k][j]`), so those columns are contiguous rows.
fn tridiagonalise(m: Matrix) -> (Vec<f64>, Vec<f64>) {
    let n = m.n;
    let mut w = m.data;
    if n == 0 {
        return (Vec::new(), Vec::new());
    }
    let mut d: Vec<f64> = (0..n).map(|j| w[j * n + n - 1]).collect();
    let mut e = vec![0.0; n];
    for i in (1..n).rev() {
        let scale: f64 = d[..i].iter().map(|x| x.abs()).sum();
        let mut h = 0.0;
        if scale == 0.0 {
            e[i] = d[i - 1];
            for j in 0..i {
                d[j] = w[j * n + i - 1];
            }
        } else {
            for x in &mut d[..i] {
                *x /= scale;
                h += *x * *x;
            }
            let f = d[i - 1];
            let g = if f > 0.0 { -h.sqrt() } else { h.sqrt() };
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            e[..i].fill(0.0);
            // e = A d over the leading i×i block (lower triangle = rows of w).
            for j in 0..i {
                let row = &w[j * n..j * n + i];
                let f = d[j];
                let mut g = e[j] + row[j] * f;
                for k in j + 1..i {
                    g += row[k] * d[k];
                    e[k] += row[k] * f;
                }
                e[j] = g;
            }
            let mut f = 0.0;
            for j in 0..i {
                e[j] /= h;
                f += e[j] * d[j];
            }
            let hh = f / (h + h);
            for j in 0..i {
                e[j] -= hh * d[j];
            }
            // The rank-2 update A -= d eᵀ + e dᵀ, each row of w independent.
            let (dd, ee) = (&d[..i], &e[..i]);
            w.par_chunks_mut(n)
                .take(i)
                .enumerate()
                .for_each(|(j, row)| {
                    let (f, g) = (dd[j], ee[j]);
                    for k in j..i {
                        row[k] -= f * ee[k] + g * dd[k];
                    }
                });
            for j in 0..i {
                d[j] = w[j * n + i - 1];
            }
        }
        d[i] = h;
    }
    // Without accumulation the diagonal is what the reduction left in place.
    for (j, x) in d.iter_mut().enumerate() {
        *x = w[j * n + j];
    }
    e[0] = 0.0;
    (d, e)
}

/// Eigenvalues of the symmetric tridiagonal matrix (diagonal `d`, sub-diagonal `e` with
/// `e[i]` between i−1 and i) by the implicit QL method (JAMA `tql2` without eigenvectors).
fn tridiagonal_eigenvalues(mut d: Vec<f64>, mut e: Vec<f64>) -> Result<Vec<f64>> {
    let n = d.len();
    if n == 0 {
        return Ok(d);
    }
    e.rotate_left(1);
    e[n - 1] = 0.0;
    let (mut f, mut tst1) = (0.0f64, 0.0f64);
    let eps = f64::EPSILON;
    for l in 0..n {
        tst1 = tst1.max(d[l].abs() + e[l].abs());
        let mut m = l;
        while m < n - 1 && e[m].abs() > eps * tst1 {
            m += 1;
        }
        if m > l {
            let mut iterations = 0;
            loop {
                iterations += 1;
                if iterations > 60 {
                    bail!("the eigenvalue iteration did not converge (non-finite statistics?)");
                }
                let g = d[l];
                let mut p = (d[l + 1] - g) / (2.0 * e[l]);
                let mut r = p.hypot(1.0);
                if p < 0.0 {
                    r = -r;
                }
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                let dl1 = d[l + 1];
                let h = g - d[l];
                for x in &mut d[l + 2..] {
                    *x -= h;
                }
                f += h;
                p = d[m];
                let (mut c, mut c2, mut c3) = (1.0, 1.0, 1.0);
                let el1 = e[l + 1];
                let (mut s, mut s2) = (0.0, 0.0);
                for i in (l..m).rev() {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    let g = c * e[i];
                    let h = c * p;
                    r = p.hypot(e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
                if e[l].abs() <= eps * tst1 {
                    break;
                }
            }
        }
        d[l] += f;
        e[l] = 0.0;
    }
    if d.iter().any(|x| !x.is_finite()) {
        bail!("non-finite eigenvalues (the statistics hold NaN or infinity)");
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A random symmetric PSD matrix X Xᵀ of rank `rank`.
    fn gram(n: usize, rank: usize, seed: u64) -> Matrix {
        let mut state = seed;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let x: Vec<f64> = (0..n * rank).map(|_| next()).collect();
        let data = (0..n)
            .flat_map(|i| {
                let x = &x;
                (0..n).map(move |j| dot(&x[i * rank..(i + 1) * rank], &x[j * rank..(j + 1) * rank]))
            })
            .collect();
        Matrix::new(n, data)
    }

    #[test]
    fn eigenvalues_of_a_known_matrix() {
        // [[2,1,0],[1,2,1],[0,1,2]]: 2 − √2, 2, 2 + √2.
        let m = Matrix::new(3, vec![2., 1., 0., 1., 2., 1., 0., 1., 2.]);
        let mut values = symmetric_eigenvalues(m).unwrap();
        values.sort_by(f64::total_cmp);
        let s = 2f64.sqrt();
        for (got, want) in values.iter().zip([2. - s, 2., 2. + s]) {
            assert!((got - want).abs() < 1e-12, "{values:?}");
        }
    }

    #[test]
    fn eigenvalues_sum_to_the_trace_and_squares_to_the_frobenius_norm() {
        let m = gram(40, 40, 3);
        let values = symmetric_eigenvalues(m.clone()).unwrap();
        let frobenius: f64 = m.data.iter().map(|x| x * x).sum();
        assert!((values.iter().sum::<f64>() - m.trace()).abs() < 1e-10 * m.trace());
        let squares: f64 = values.iter().map(|l| l * l).sum();
        assert!((squares - frobenius).abs() < 1e-10 * frobenius);
    }

    #[test]
    fn trace_sqrt_of_a_square_is_the_trace() {
        // tr (A A)^½ = tr A for PSD A, at full and at low rank.
        for rank in [30, 7] {
            let a = gram(30, rank, 11);
            let got = trace_sqrt_product(&a, &a).unwrap();
            assert!(
                (got - a.trace()).abs() < 1e-9 * a.trace(),
                "rank {rank}: {got} vs {}",
                a.trace()
            );
        }
    }

    #[test]
    fn trace_sqrt_product_is_symmetric_in_its_arguments() {
        let (a, b) = (gram(25, 25, 5), gram(25, 4, 6));
        let (ab, ba) = (
            trace_sqrt_product(&a, &b).unwrap(),
            trace_sqrt_product(&b, &a).unwrap(),
        );
        assert!((ab - ba).abs() < 1e-9 * ab, "{ab} vs {ba}");
    }

    #[test]
    fn non_finite_input_is_an_error() {
        let m = Matrix::new(2, vec![f64::NAN, 0.0, 0.0, 1.0]);
        assert!(trace_sqrt_product(&m, &m).is_err());
    }
}
