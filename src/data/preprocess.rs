//! Image preprocessing as the reference's precompute step does it: torchvision
//! `Resize(size, BICUBIC)` on a PIL image (the short side to `size`), `CenterCrop(size)`,
//! `ToTensor`, `Normalize(0.5, 0.5)`.
//!
//! On PIL images torchvision hands resizing to Pillow, so [`resize_bicubic`] is Pillow's
//! separable convolution resampler (`libImaging/Resample.c`) for 8-bit images: the bicubic
//! kernel (a = −0.5) widened by the downscale factor (that widening is the antialiasing),
//! weights normalised per output pixel and rounded to 22-bit fixed point, a horizontal
//! pass rounded and clipped to 8 bits, then a vertical pass. Integer arithmetic makes the
//! result equal to Pillow's, not just close.

use anyhow::{bail, Context, Result};
use image::RgbImage;

/// Decodes JPEG, PNG or WebP bytes into 8-bit RGB (alpha dropped, grey replicated, as
/// PIL's `convert('RGB')` does).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let image = image::load_from_memory(bytes).context("cannot decode the image")?;
    Ok(image.to_rgb8())
}

/// `Resize(size)` then `CenterCrop(size)`.
pub fn resize_center_crop(image: &RgbImage, size: usize) -> Result<RgbImage> {
    Ok(center_crop(&resize_short_side(image, size)?, size))
}

/// torchvision's `Resize(size)`: the short side becomes `size`, the long side
/// `int(size * long / short)`.
pub fn resize_short_side(image: &RgbImage, size: usize) -> Result<RgbImage> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    if w == 0 || h == 0 || size == 0 {
        bail!("cannot resize a {w}x{h} image to {size}");
    }
    let (short, long) = (w.min(h), w.max(h));
    let long_out = (size as f64 * long as f64 / short as f64) as usize;
    let (out_w, out_h) = if w <= h {
        (size, long_out)
    } else {
        (long_out, size)
    };
    Ok(if (out_w, out_h) == (w, h) {
        image.clone()
    } else {
        resize_bicubic(image, out_w, out_h)
    })
}

/// torchvision's `center_crop` offsets: `int(round((in - out) / 2))`, Python's round
/// (half to even).
fn center_crop(image: &RgbImage, size: usize) -> RgbImage {
    let offset = |len: u32| ((len as f64 - size as f64) / 2.0).round_ties_even() as u32;
    let (left, top) = (offset(image.width()), offset(image.height()));
    image::imageops::crop_imm(image, left, top, size as u32, size as u32).to_image()
}

/// Pixels as `[3, H, W]` floats in [−1, 1]: `ToTensor` (÷255) then `Normalize(0.5, 0.5)`.
pub fn to_model_input(image: &RgbImage) -> Vec<f32> {
    let plane = (image.width() * image.height()) as usize;
    let mut out = vec![0.0; 3 * plane];
    for (i, pixel) in image.pixels().enumerate() {
        for (c, &v) in pixel.0.iter().enumerate() {
            out[c * plane + i] = (v as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    out
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's bicubic kernel (`bicubic_filter`, a = −0.5), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One output pixel's source window: the first input index and the fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for resampling `in_size` to
/// `out_size` along one axis.
fn taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let start = ((center - support + 0.5) as i64).max(0) as usize;
            let end = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let raw: Vec<f64> = (start..end)
                .map(|x| bicubic((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = raw.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let weights = raw
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    if w < 0.0 {
                        (-0.5 + w * one) as i32
                    } else {
                        (0.5 + w * one) as i32
                    }
                })
                .collect();
            Taps { start, weights }
        })
        .collect()
}

/// Rounds a fixed-point sum back to 8 bits, clipped (Pillow's `clip8`).
fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resamples along x (`horizontal`) or y with precomputed taps.
fn pass(image: &RgbImage, taps: &[Taps], horizontal: bool) -> RgbImage {
    let (w, h) = image.dimensions();
    let (out_w, out_h) = if horizontal {
        (taps.len() as u32, h)
    } else {
        (w, taps.len() as u32)
    };
    let rounding = 1i64 << (PRECISION_BITS - 1);
    RgbImage::from_fn(out_w, out_h, |x, y| {
        let tap = &taps[if horizontal { x } else { y } as usize];
        let mut sums = [rounding; 3];
        for (k, &weight) in tap.weights.iter().enumerate() {
            let i = (tap.start + k) as u32;
            let source = if horizontal {
                image.get_pixel(i, y)
            } else {
                image.get_pixel(x, i)
            };
            for (sum, &v) in sums.iter_mut().zip(&source.0) {
                *sum += v as i64 * weight as i64;
            }
        }
        image::Rgb(sums.map(clip8))
    })
}

/// Pillow's `Image.resize((out_w, out_h), Image.BICUBIC)` for RGB images: two passes, each
/// skipped when its size does not change. The order matters (each pass rounds to 8 bits):
/// horizontal first, except that Pillow 13 goes vertical first when the height loses more
/// than twice as many pixels as the width (python-pillow/Pillow#9549; older Pillow always
/// went horizontal first and differs from 13 by rounding on such sizes).
pub fn resize_bicubic(image: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let horizontal = |im: RgbImage| {
        if out_w != w {
            pass(&im, &taps(w, out_w), true)
        } else {
            im
        }
    };
    let vertical = |im: RgbImage| {
        if out_h != h {
            pass(&im, &taps(h, out_h), false)
        } else {
            im
        }
    };
    let vertical_first = out_h < h && (h - out_h) as i64 > 2 * (w as i64 - out_w as i64);
    if vertical_first {
        horizontal(vertical(image.clone()))
    } else {
        vertical(horizontal(image.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_sum_to_one_and_stay_in_bounds() {
        for (n_in, n_out) in [(100, 37), (37, 100), (512, 256), (7, 7)] {
            for t in taps(n_in, n_out) {
                let sum: i64 = t.weights.iter().map(|&w| w as i64).sum();
                assert!((sum - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i64);
                assert!(t.start + t.weights.len() <= n_in);
            }
        }
    }

    #[test]
    fn center_crop_rounds_half_to_even() {
        // (5 - 2) / 2 = 1.5 rounds to 2; (3 - 2) / 2 = 0.5 rounds to 0.
        let image = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8, y as u8, 0]));
        let crop = center_crop(&image, 2);
        assert_eq!(crop.get_pixel(0, 0).0, [2, 0, 0]);
    }
}
