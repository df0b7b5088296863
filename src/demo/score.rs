//! Prompt adherence for shapes (a small GenEval): pixels are assigned to the nearest
//! palette colour, each colour's pixels split into connected components, and each
//! component's shape read from how much of its bounding box it fills (square ≈ 1, circle
//! ≈ π/4, triangle ≈ 1/2). A Fréchet distance over per-image features of the same kind
//! measures sample quality against the generator's own images.

use image::RgbImage;

use super::shapes::{Scene, Side, COLORS};
use crate::eval::stats::Statistics;

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

impl Tally {
    /// (correct, judged) per attribute, in [`CHANCE`]'s order.
    fn counts(&self) -> [(usize, usize); 4] {
        [self.color, self.shape, self.count, self.position]
    }

    /// Correct over judged, all attributes together.
    pub fn overall(&self) -> f64 {
        let (ok, n) = self
            .counts()
            .iter()
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
        ok as f64 / n.max(1) as f64
    }
}

/// One attribute's adherence: the share of prompts judged right in each group (`None`
/// when the group had no prompt of that kind), and what guessing gets.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Accuracy {
    pub attribute: String,
    pub seen: Option<f64>,
    pub held_out: Option<f64>,
    pub chance: f64,
}

/// Each attribute's accuracy on the seen and the held-out prompts.
pub fn accuracies(seen: &Tally, held_out: &Tally) -> Vec<Accuracy> {
    let rate = |(ok, n): (usize, usize)| (n > 0).then(|| ok as f64 / n as f64);
    CHANCE
        .iter()
        .zip(seen.counts().into_iter().zip(held_out.counts()))
        .map(|((name, chance), (s, h))| Accuracy {
            attribute: name.to_string(),
            seen: rate(s),
            held_out: rate(h),
            chance: *chance,
        })
        .collect()
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

/// Fréchet distance between Gaussians fitted to two feature sets (the FID formula, with
/// the evaluation's statistics).
pub fn frechet_distance(a: &[Vec<f64>], b: &[Vec<f64>]) -> anyhow::Result<f64> {
    crate::eval::stats::frechet_distance(&Statistics::from_rows(a)?, &Statistics::from_rows(b)?)
}

#[cfg(test)]
mod tests {
    use super::super::shapes::scene_and_image;
    use super::*;

    #[test]
    fn the_scorer_reads_the_generators_own_images() {
        // The demo's default size, the smallest it allows, and twice that.
        for size in [16, 32] {
            let mut tally = Tally::default();
            for i in 0..400 {
                let (scene, image) = scene_and_image(7, i, size, i % 2 == 0);
                tally.add(&judge(&scene, &image));
            }
            for (name, (ok, n)) in [
                ("colour", tally.color),
                ("shape", tally.shape),
                ("count", tally.count),
                ("position", tally.position),
            ] {
                assert!(
                    n > 20 && ok as f64 / n as f64 > 0.97,
                    "{size} px, {name}: {ok}/{n}"
                );
            }
        }
    }
}
