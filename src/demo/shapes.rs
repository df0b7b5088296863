//! Captioned shapes: a seeded generator of small images whose captions vary colour, shape,
//! size, position, count and pairs, with (colour, shape) combinations held out of training
//! to test generalisation.

use image::{Rgb, RgbImage};
use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub const COLORS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 40, 40]),
    ("green", [40, 180, 60]),
    ("blue", [50, 80, 230]),
    ("yellow", [230, 210, 40]),
    ("purple", [160, 60, 200]),
    ("cyan", [40, 200, 210]),
];
pub const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
const COUNTS: [&str; 3] = ["one", "two", "three"];

/// (colour, shape) pairs never drawn in training: every colour misses one shape and every
/// shape two colours, so each word is still seen in other combinations.
pub fn held_out(color: usize, shape: usize) -> bool {
    shape == color % 3
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    Left,
    Right,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Object {
    pub color: usize,
    pub shape: usize,
    pub large: bool,
}

/// What a caption says, and so what an image of it should show.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scene {
    /// "a large red circle", optionally "… on the left".
    Single { object: Object, side: Option<Side> },
    /// "three small blue squares".
    Count { object: Object, count: usize },
    /// "a red circle left of a blue square": `left` is drawn left of `right`.
    Pair { left: Object, right: Object },
}

impl Scene {
    pub fn caption(&self) -> String {
        let size = |o: &Object| if o.large { "large" } else { "small" };
        let name = |o: &Object| format!("{} {}", COLORS[o.color].0, SHAPES[o.shape]);
        match self {
            Scene::Single { object, side } => {
                let at = match side {
                    Some(Side::Left) => " on the left",
                    Some(Side::Right) => " on the right",
                    None => "",
                };
                format!("a {} {}{at}", size(object), name(object))
            }
            Scene::Count { object, count } => {
                format!("{} {} {}s", COUNTS[count - 1], size(object), name(object))
            }
            Scene::Pair { left, right } => format!("a {} left of a {}", name(left), name(right)),
        }
    }

    pub fn objects(&self) -> Vec<Object> {
        match self {
            Scene::Single { object, .. } | Scene::Count { object, .. } => vec![*object],
            Scene::Pair { left, right } => vec![*left, *right],
        }
    }

    /// Whether the scene uses a held-out (colour, shape) combination.
    pub fn is_held_out(&self) -> bool {
        self.objects().iter().any(|o| held_out(o.color, o.shape))
    }

    /// A random scene; `held_out_wanted` picks from the held-out combinations or the others.
    pub fn random(rng: &mut impl Rng, held_out_wanted: bool) -> Self {
        loop {
            let object = |rng: &mut dyn Rng| Object {
                color: rng.random_range(0..COLORS.len()),
                shape: rng.random_range(0..SHAPES.len()),
                large: rng.random_bool(0.5),
            };
            let scene = match rng.random_range(0..4) {
                0 => Scene::Single {
                    object: object(rng),
                    side: None,
                },
                1 => Scene::Single {
                    object: object(rng),
                    side: Some(if rng.random_bool(0.5) {
                        Side::Left
                    } else {
                        Side::Right
                    }),
                },
                2 => Scene::Count {
                    object: Object {
                        large: false,
                        ..object(rng)
                    },
                    count: rng.random_range(1..=3),
                },
                _ => {
                    let (left, right) = (object(rng), object(rng));
                    if left.color == right.color {
                        continue;
                    }
                    Scene::Pair {
                        left: Object {
                            large: false,
                            ..left
                        },
                        right: Object {
                            large: false,
                            ..right
                        },
                    }
                }
            };
            if scene.is_held_out() == held_out_wanted {
                return scene;
            }
        }
    }
}

/// Half the side of a shape's bounding box, in pixels.
fn half_size(size: usize, large: bool) -> i32 {
    let fraction = if large { 0.22 } else { 0.12 };
    ((size as f64 * fraction).round() as i32).max(2)
}

fn inside(shape: usize, dx: i32, dy: i32, r: i32) -> bool {
    match shape {
        0 => dx * dx + dy * dy <= r * r,
        1 => dx.abs() <= r && dy.abs() <= r,
        // An upright isosceles triangle filling its box: apex at the top, base at the bottom.
        _ => dy.abs() <= r && 2 * dx.abs() <= dy + r,
    }
}

fn draw(image: &mut RgbImage, object: &Object, cx: i32, cy: i32, r: i32) {
    let color = Rgb(COLORS[object.color].1);
    for y in (cy - r).max(0)..=(cy + r).min(image.height() as i32 - 1) {
        for x in (cx - r).max(0)..=(cx + r).min(image.width() as i32 - 1) {
            if inside(object.shape, x - cx, y - cy, r) {
                image.put_pixel(x as u32, y as u32, color);
            }
        }
    }
}

/// Draws `scene` on a black `size`×`size` image at random places that honour the caption
/// (sides, left-of, non-overlapping copies).
pub fn render(scene: &Scene, size: usize, rng: &mut impl Rng) -> RgbImage {
    let mut image = RgbImage::new(size as u32, size as u32);
    let s = size as i32;
    let mut centre = |r: i32, x_range: (i32, i32)| {
        let x = rng.random_range(x_range.0.max(r)..=x_range.1.min(s - 1 - r).max(r));
        let y = rng.random_range(r..=s - 1 - r);
        (x, y)
    };
    match scene {
        Scene::Single { object, side } => {
            let r = half_size(size, object.large);
            let range = match side {
                None => (0, s - 1),
                Some(Side::Left) => (0, s / 2 - 2 - r / 2),
                Some(Side::Right) => (s / 2 + 1 + r / 2, s - 1),
            };
            let (x, y) = centre(r, range);
            draw(&mut image, object, x, y, r);
        }
        Scene::Count { object, count } => {
            let r = half_size(size, object.large);
            let mut placed: Vec<(i32, i32)> = Vec::new();
            let mut tries = 0;
            while placed.len() < *count {
                // Copies placed early can leave no room for the rest: start again.
                tries += 1;
                if tries % 100 == 0 {
                    placed.clear();
                }
                let (x, y) = centre(r, (0, s - 1));
                // Two pixels of background between copies keep them separate components.
                if placed
                    .iter()
                    .all(|(px, py)| (px - x).abs() > 2 * r + 2 || (py - y).abs() > 2 * r + 2)
                {
                    placed.push((x, y));
                }
            }
            for &(x, y) in &placed {
                draw(&mut image, object, x, y, r);
            }
        }
        Scene::Pair { left, right } => {
            let r = half_size(size, false);
            let (x1, y1) = centre(r, (0, s / 2 - 2 - r));
            let (x2, y2) = centre(r, (s / 2 + 2 + r, s - 1));
            draw(&mut image, left, x1, y1, r);
            draw(&mut image, right, x2, y2, r);
        }
    }
    image
}

/// Scene `i` of a seeded collection: training sets use `held_out_wanted = false`.
pub fn scene_and_image(
    seed: u64,
    i: usize,
    size: usize,
    held_out_wanted: bool,
) -> (Scene, RgbImage) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(i as u64);
    let scene = Scene::random(&mut rng, held_out_wanted);
    let image = render(&scene, size, &mut rng);
    (scene, image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captions_read_as_english() {
        let red_circle = Object {
            color: 0,
            shape: 0,
            large: true,
        };
        let blue_square = Object {
            color: 2,
            shape: 1,
            large: false,
        };
        let single = Scene::Single {
            object: red_circle,
            side: Some(Side::Left),
        };
        assert_eq!(single.caption(), "a large red circle on the left");
        let count = Scene::Count {
            object: blue_square,
            count: 2,
        };
        assert_eq!(count.caption(), "two small blue squares");
        let pair = Scene::Pair {
            left: red_circle,
            right: blue_square,
        };
        assert_eq!(pair.caption(), "a red circle left of a blue square");
    }

    #[test]
    fn training_scenes_never_use_held_out_combinations() {
        for i in 0..300 {
            assert!(!scene_and_image(1, i, 32, false).0.is_held_out());
            assert!(scene_and_image(1, i, 32, true).0.is_held_out());
        }
        let held: usize = (0..6)
            .map(|c| (0..3).filter(|&s| held_out(c, s)).count())
            .sum();
        assert_eq!(held, 6);
    }
}
