//! Prompt adherence for shapes (a small GenEval): pixels are assigned to the nearest
//! palette colour, each colour's pixels split into connected components, and each
//! component's shape read from how much of its bounding box it fills (square ≈ 1, circle
//! ≈ π/4, triangle ≈ 1/2). A Fréchet distance over per-image features of the same kind
//! measures sample quality against the generator's own images.

use image::RgbImage;

use super::shapes::{Scene, Side, COLORS};

/// A pixel this far (RGB distance) from every palette colour is background.
const MAX_COLOR_DISTANCE: i32 = 110;
/// Components smaller than this many pixels are noise.
const MIN_AREA: usize = 5;

#[derive(Debug, Clone, PartialEq)]
pub struct Component {
    pub color: usize,
    pub area: usize,
    pub centroid: (f64, f64),
    /// Area over bounding-box area.
    pub fill: f64,
    /// (pixels below the box's middle − pixels above) / area: about 0.4 for an upright
    /// triangle, 0 for the symmetric shapes.
    pub bottom_heaviness: f64,
}

impl Component {
    /// 0 circle, 1 square, 2 triangle.
    pub fn shape(&self) -> usize {
        if self.bottom_heaviness > 0.2 {
            2
        } else if self.fill > 0.85 {
            1
        } else {
            0
        }
    }
}

fn palette_index(pixel: [u8; 3]) -> Option<usize> {
    COLORS
        .iter()
        .enumerate()
        .map(|(i, (_, c))| {
            let d: i32 = (0..3).map(|k| (pixel[k] as i32 - c[k] as i32).pow(2)).sum();
            (d, i)
        })
        .min()
        .filter(|(d, _)| *d <= MAX_COLOR_DISTANCE * MAX_COLOR_DISTANCE)
        .map(|(_, i)| i)
}

/// The image's coloured components (4-connected), largest first.
pub fn components(image: &RgbImage) -> Vec<Component> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let labels: Vec<Option<usize>> = image.pixels().map(|p| palette_index(p.0)).collect();
    let mut seen = vec![false; w * h];
    let mut found = Vec::new();
    for start in 0..w * h {
        let Some(color) = labels[start] else { continue };
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let (mut area, mut sx, mut sy) = (0usize, 0.0, 0.0);
        let mut rows = Vec::new();
        let (mut x0, mut x1, mut y0, mut y1) = (w, 0, h, 0);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            area += 1;
            rows.push(y);
            sx += x as f64;
            sy += y as f64;
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
            let neighbours = [
                (x > 0).then(|| i - 1),
                (x + 1 < w).then(|| i + 1),
                (y > 0).then(|| i - w),
                (y + 1 < h).then(|| i + w),
            ];
            for n in neighbours.into_iter().flatten() {
                if !seen[n] && labels[n] == Some(color) {
                    seen[n] = true;
                    stack.push(n);
                }
            }
        }
        if area >= MIN_AREA {
            let box_area = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f64;
            let middle = (y0 + y1) as f64 / 2.0;
            let below = rows.iter().filter(|&&y| y as f64 > middle).count() as f64;
            let above = rows.iter().filter(|&&y| (y as f64) < middle).count() as f64;
            found.push(Component {
                color,
                area,
                centroid: (sx / area as f64, sy / area as f64),
                fill: area as f64 / box_area,
                bottom_heaviness: (below - above) / area as f64,
            });
        }
    }
    found.sort_by_key(|c| std::cmp::Reverse(c.area));
    found
}

/// Per-attribute verdicts for one image; `None` where the caption says nothing about it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Verdict {
    pub color: Option<bool>,
    pub shape: Option<bool>,
    pub count: Option<bool>,
    pub position: Option<bool>,
}

/// Judges an image against the scene its caption describes.
pub fn judge(scene: &Scene, image: &RgbImage) -> Verdict {
    let parts = components(image);
    let of_color = |c: usize| parts.iter().filter(move |p| p.color == c);
    let half = image.width() as f64 / 2.0;
    match scene {
        Scene::Single { object, side } => {
            let main = parts.first();
            Verdict {
                color: Some(main.is_some_and(|p| p.color == object.color)),
                shape: Some(
                    of_color(object.color)
                        .next()
                        .is_some_and(|p| p.shape() == object.shape),
                ),
                count: None,
                position: side.map(|s| {
                    of_color(object.color)
                        .next()
                        .is_some_and(|p| (p.centroid.0 < half) == (s == Side::Left))
                }),
            }
        }
        Scene::Count { object, count } => Verdict {
            color: Some(parts.first().is_some_and(|p| p.color == object.color)),
            shape: Some(
                of_color(object.color)
                    .next()
                    .is_some_and(|p| p.shape() == object.shape),
            ),
            count: Some(of_color(object.color).count() == *count),
            position: None,
        },
        Scene::Pair { left, right } => {
            let a = of_color(left.color).next();
            let b = of_color(right.color).next();
            Verdict {
                color: Some(a.is_some() && b.is_some()),
                shape: Some(
                    a.is_some_and(|p| p.shape() == left.shape)
                        && b.is_some_and(|p| p.shape() == right.shape),
                ),
                count: None,
                position: Some(match (a, b) {
                    (Some(a), Some(b)) => a.centroid.0 < b.centroid.0,
                    _ => false,
                }),
            }
        }
    }
}

/// Accuracy per attribute: (correct, judged).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    pub color: (usize, usize),
    pub shape: (usize, usize),
    pub count: (usize, usize),
    pub position: (usize, usize),
}

impl Tally {
    pub fn add(&mut self, v: &Verdict) {
        for (slot, verdict) in [
            (&mut self.color, v.color),
            (&mut self.shape, v.shape),
            (&mut self.count, v.count),
            (&mut self.position, v.position),
        ] {
            if let Some(ok) = verdict {
                slot.0 += ok as usize;
                slot.1 += 1;
            }
        }
    }
}

/// What guessing gets: one of 6 colours, 3 shapes, 3 counts, 2 sides.
pub const CHANCE: [(&str, f64); 4] = [
    ("colour", 1.0 / 6.0),
    ("shape", 1.0 / 3.0),
    ("count", 1.0 / 3.0),
    ("position", 1.0 / 2.0),
];

/// Features for the Fréchet distance: the share of pixels of each palette colour, the
/// number of components, their mean fill, and the foreground's centroid.
pub fn features(image: &RgbImage) -> Vec<f64> {
    let parts = components(image);
    let pixels = (image.width() * image.height()) as f64;
    let mut f = vec![0.0; COLORS.len()];
    for p in &parts {
        f[p.color] += p.area as f64 / pixels;
    }
    let area: usize = parts.iter().map(|p| p.area).sum();
    let mean = |get: &dyn Fn(&Component) -> f64| {
        if area == 0 {
            0.0
        } else {
            parts.iter().map(|p| get(p) * p.area as f64).sum::<f64>() / area as f64
        }
    };
    let side = image.width() as f64;
    f.push(parts.len() as f64);
    f.push(mean(&|p| p.fill));
    f.push(mean(&|p| p.centroid.0 / side));
    f.push(mean(&|p| p.centroid.1 / side));
    f
}

fn mean_and_covariance(rows: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let (n, d) = (rows.len() as f64, rows[0].len());
    let mean: Vec<f64> = (0..d)
        .map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / n)
        .collect();
    let cov = (0..d)
        .map(|a| {
            (0..d)
                .map(|b| {
                    rows.iter()
                        .map(|r| (r[a] - mean[a]) * (r[b] - mean[b]))
                        .sum::<f64>()
                        / (n - 1.0).max(1.0)
                })
                .collect()
        })
        .collect();
    (mean, cov)
}

/// Eigenvalues and eigenvectors (columns) of a symmetric matrix, by cyclic Jacobi rotations.
fn symmetric_eigen(mut a: Vec<Vec<f64>>) -> (Vec<f64>, Vec<Vec<f64>>) {
    let n = a.len();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| (i == j) as u8 as f64).collect())
        .collect();
    for _ in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        if off < 1e-22 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q].abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
                // A ← Jᵀ A J: columns p and q, then rows p and q; V ← V J.
                for row in a.iter_mut().chain(v.iter_mut()) {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - s * y;
                    row[q] = s * x + c * y;
                }
                let (row_p, row_q) = (a[p].clone(), a[q].clone());
                for (k, (x, y)) in row_p.iter().zip(&row_q).enumerate() {
                    a[p][k] = c * x - s * y;
                    a[q][k] = s * x + c * y;
                }
            }
        }
    }
    ((0..n).map(|i| a[i][i]).collect(), v)
}

fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = a.len();
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| (0..n).map(|k| a[i][k] * b[k][j]).sum())
                .collect()
        })
        .collect()
}

/// The square root of a symmetric positive semi-definite matrix.
fn psd_sqrt(m: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (values, vectors) = symmetric_eigen(m.to_vec());
    let n = m.len();
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| {
                    (0..n)
                        .map(|k| vectors[i][k] * values[k].max(0.0).sqrt() * vectors[j][k])
                        .sum()
                })
                .collect()
        })
        .collect()
}

/// Fréchet distance between Gaussians fitted to two feature sets (the FID formula):
/// |μ₁ − μ₂|² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½.
pub fn frechet_distance(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    let (m1, s1) = mean_and_covariance(a);
    let (m2, s2) = mean_and_covariance(b);
    let root = psd_sqrt(&s1);
    let (cross, _) = symmetric_eigen(matmul(&matmul(&root, &s2), &root));
    let trace = |m: &[Vec<f64>]| (0..m.len()).map(|i| m[i][i]).sum::<f64>();
    let mean_term: f64 = m1.iter().zip(&m2).map(|(x, y)| (x - y).powi(2)).sum();
    mean_term + trace(&s1) + trace(&s2) - 2.0 * cross.iter().map(|l| l.max(0.0).sqrt()).sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::super::shapes::scene_and_image;
    use super::*;

    #[test]
    fn the_scorer_reads_the_generators_own_images() {
        let mut tally = Tally::default();
        for i in 0..400 {
            let (scene, image) = scene_and_image(7, i, 32, i % 2 == 0);
            tally.add(&judge(&scene, &image));
        }
        for (name, (ok, n)) in [
            ("colour", tally.color),
            ("shape", tally.shape),
            ("count", tally.count),
            ("position", tally.position),
        ] {
            assert!(n > 20 && ok as f64 / n as f64 > 0.97, "{name}: {ok}/{n}");
        }
    }

    #[test]
    fn frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift() {
        let a: Vec<Vec<f64>> = (0..50)
            .map(|i| vec![(i % 7) as f64, (i % 5) as f64 * 0.5, (i % 3) as f64])
            .collect();
        assert!(frechet_distance(&a, &a).abs() < 1e-9);
        let shifted: Vec<Vec<f64>> = a.iter().map(|r| vec![r[0] + 2.0, r[1], r[2]]).collect();
        assert!((frechet_distance(&a, &shifted) - 4.0).abs() < 1e-9);
    }
}
