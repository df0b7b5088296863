//! Feature statistics and the Fréchet distance between them, as pytorch-fid computes them
//! (`calculate_activation_statistics`, `calculate_frechet_distance`), in f64:
//!
//!   FD = |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁ Σ₂)^½
//!
//! with μ the mean and Σ the unbiased covariance (`np.cov`, N − 1) of the features.
//! Statistics are stored as pytorch-fid stores them: an `.npz` holding `mu` and `sigma`.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use rayon::prelude::*;

use super::linalg::{trace_sqrt_product, Matrix};
use super::npz;

#[derive(Debug, Clone, PartialEq)]
pub struct Statistics {
    pub mu: Vec<f64>,
    pub sigma: Matrix,
    /// How many feature vectors they summarise (not stored in `.npz` files: 0 when read).
    pub count: usize,
}

impl Statistics {
    pub fn dims(&self) -> usize {
        self.mu.len()
    }

    /// The statistics of one feature vector per row.
    pub fn from_rows<T: Copy + Into<f64>>(rows: &[Vec<T>]) -> Result<Self> {
        let mut acc = StatisticsAccumulator::new(rows.first().map_or(0, |r| r.len()));
        acc.add(rows)?;
        acc.finish()
    }

    /// Reads pytorch-fid's `.npz` (`mu` [d], `sigma` [d, d], float32 or float64).
    pub fn read(path: &Path) -> Result<Self> {
        let arrays = npz::read(path)?;
        let get = |name: &str| {
            arrays.get(name).with_context(|| {
                format!(
                    "{} has no '{name}' array (not FID statistics?)",
                    path.display()
                )
            })
        };
        let (mu, sigma) = (get("mu")?, get("sigma")?);
        let d = mu.values.len();
        ensure!(
            mu.shape.len() == 1 && sigma.shape == [d, d],
            "{}: mu is {:?} and sigma {:?}; expected [d] and [d, d]",
            path.display(),
            mu.shape,
            sigma.shape
        );
        Ok(Self {
            mu: mu.values.clone(),
            sigma: Matrix::new(d, sigma.values.clone()),
            count: 0,
        })
    }

    /// Writes them as `np.savez_compressed(path, mu=…, sigma=…)` does (atomically).
    pub fn write(&self, path: &Path) -> Result<()> {
        let d = self.dims();
        npz::write(
            path,
            &[
                npz::Array::new("mu", vec![d], self.mu.clone()),
                npz::Array::new("sigma", vec![d, d], self.sigma.data.clone()),
            ],
        )
    }
}

/// The Fréchet distance between two Gaussians.
pub fn frechet_distance(a: &Statistics, b: &Statistics) -> Result<f64> {
    ensure!(
        a.dims() == b.dims(),
        "the statistics have {} and {} dimensions (different feature extractors?)",
        a.dims(),
        b.dims()
    );
    let mean_term: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y).powi(2)).sum();
    let cross = trace_sqrt_product(&a.sigma, &b.sigma)?;
    Ok(mean_term + a.sigma.trace() + b.sigma.trace() - 2.0 * cross)
}

/// Sums for the mean and covariance, fed a batch at a time (30 000 × 2048 features need
/// not be held at once). Sums are taken about the first row (the "shifted data" algorithm),
/// so the covariance keeps its precision when the mean is large against the spread.
pub struct StatisticsAccumulator {
    dims: usize,
    count: usize,
    shift: Vec<f64>,
    sum: Vec<f64>,
    /// Σ (x − shift)(x − shift)ᵀ, upper triangle used.
    outer: Vec<f64>,
}

impl StatisticsAccumulator {
    pub fn new(dims: usize) -> Self {
        Self {
            dims,
            count: 0,
            shift: Vec::new(),
            sum: vec![0.0; dims],
            outer: vec![0.0; dims * dims],
        }
    }

    pub fn add<T: Copy + Into<f64>>(&mut self, rows: &[Vec<T>]) -> Result<()> {
        let d = self.dims;
        if let Some(bad) = rows.iter().find(|r| r.len() != d) {
            anyhow::bail!("a feature vector has {} values, expected {d}", bad.len());
        }
        if self.shift.is_empty() {
            if let Some(first) = rows.first() {
                self.shift = first.iter().map(|&x| x.into()).collect();
            }
        }
        let centred: Vec<Vec<f64>> = rows
            .iter()
            .map(|r| {
                r.iter()
                    .zip(&self.shift)
                    .map(|(&x, s)| x.into() - s)
                    .collect()
            })
            .collect();
        for row in &centred {
            self.sum.iter_mut().zip(row).for_each(|(s, x)| *s += x);
        }
        self.outer
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(i, out)| {
                for row in &centred {
                    let xi = row[i];
                    if xi != 0.0 {
                        out[i..]
                            .iter_mut()
                            .zip(&row[i..])
                            .for_each(|(o, x)| *o += xi * x);
                    }
                }
            });
        self.count += rows.len();
        Ok(())
    }

    pub fn count(&self) -> usize {
        self.count
    }

    pub fn finish(self) -> Result<Statistics> {
        let (n, d) = (self.count, self.dims);
        ensure!(n >= 2, "statistics need at least 2 images, got {n}");
        let mean_shifted: Vec<f64> = self.sum.iter().map(|s| s / n as f64).collect();
        let mut sigma = vec![0.0; d * d];
        for i in 0..d {
            for j in i..d {
                let c = (self.outer[i * d + j] - n as f64 * mean_shifted[i] * mean_shifted[j])
                    / (n - 1) as f64;
                sigma[i * d + j] = c;
                sigma[j * d + i] = c;
            }
        }
        let mu = mean_shifted
            .iter()
            .zip(&self.shift)
            .map(|(m, s)| m + s)
            .collect();
        Ok(Statistics {
            mu,
            sigma: Matrix::new(d, sigma),
            count: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, f: impl Fn(usize) -> Vec<f32>) -> Vec<Vec<f32>> {
        (0..n).map(f).collect()
    }

    #[test]
    fn covariance_is_numpys() {
        // np.cov([[1,2],[3,5],[4,4]], rowvar=False) = [[7/3, 11/6], [11/6, 7/3]]
        let s = Statistics::from_rows(&[vec![1., 2.], vec![3., 5.], vec![4., 4.]]).unwrap();
        let want = [8. / 3., 11. / 3., 7. / 3., 11. / 6., 11. / 6., 7. / 3.];
        for (got, want) in s.mu.iter().chain(&s.sigma.data).zip(want) {
            assert!((got - want).abs() < 1e-12, "{:?}", s.sigma);
        }
    }

    #[test]
    fn batches_add_up_to_the_whole() {
        let all = rows(20, |i| {
            vec![i as f32 * 0.5 + 100.0, (i % 3) as f32, (i * i % 7) as f32]
        });
        let whole = Statistics::from_rows(&all).unwrap();
        let mut acc = StatisticsAccumulator::new(3);
        for chunk in all.chunks(6) {
            acc.add(chunk).unwrap();
        }
        let batched = acc.finish().unwrap();
        for (a, b) in whole.sigma.data.iter().zip(&batched.sigma.data) {
            assert!((a - b).abs() < 1e-10);
        }
    }

    #[test]
    fn distance_is_zero_to_itself_and_grows_with_a_shift() {
        let a = rows(50, |i| {
            vec![(i % 7) as f32, (i % 5) as f32 * 0.5, (i % 3) as f32]
        });
        let shifted: Vec<Vec<f32>> = a.iter().map(|r| vec![r[0] + 2.0, r[1], r[2]]).collect();
        let (sa, sb) = (
            Statistics::from_rows(&a).unwrap(),
            Statistics::from_rows(&shifted).unwrap(),
        );
        assert!(frechet_distance(&sa, &sa).unwrap().abs() < 1e-9);
        assert!((frechet_distance(&sa, &sb).unwrap() - 4.0).abs() < 1e-9);
    }

    #[test]
    fn mismatched_dimensions_and_too_few_images_are_errors() {
        let a = Statistics::from_rows(&[vec![1., 2.], vec![2., 1.]]).unwrap();
        let b = Statistics::from_rows(&[vec![1., 2., 3.], vec![2., 1., 0.]]).unwrap();
        assert!(frechet_distance(&a, &b).is_err());
        assert!(Statistics::from_rows(&[vec![1., 2.]]).is_err());
    }
}
