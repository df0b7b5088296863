//! PNG output with settings in text chunks, and contact sheets; written atomically.

use std::io::Cursor;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use burn::prelude::*;

/// Writes interleaved RGB bytes as a PNG with `text` as text chunks.
pub fn write_png(
    path: &Path,
    rgb: &[u8],
    width: usize,
    height: usize,
    text: &[(String, String)],
) -> Result<()> {
    let bytes = encode_png(rgb, width, height, text)?;
    crate::io::write_atomic(path, |f| std::io::Write::write_all(f, &bytes))
}

/// Interleaved RGB bytes as a PNG file's bytes, with `text` as text chunks.
pub fn encode_png(
    rgb: &[u8],
    width: usize,
    height: usize,
    text: &[(String, String)],
) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(Cursor::new(&mut bytes), width as u32, height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        for (k, v) in text {
            encoder.add_itxt_chunk(k.clone(), v.clone())?;
        }
        let mut writer = encoder.write_header()?;
        writer.write_image_data(rgb)?;
    }
    Ok(bytes)
}

/// The text chunks of a PNG file.
pub fn read_png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let bytes = std::fs::read(path).with_context(|| format!("opening {}", path.display()))?;
    read_png_text_bytes(&bytes).with_context(|| format!("reading {}", path.display()))
}

/// The text chunks of a PNG file's bytes.
pub fn read_png_text_bytes(bytes: &[u8]) -> Result<Vec<(String, String)>> {
    let decoder = png::Decoder::new(Cursor::new(bytes));
    let reader = decoder.read_info().context("not a PNG")?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    for c in &info.utf8_text {
        out.push((c.keyword.clone(), c.get_text()?));
    }
    Ok(out)
}

/// Square tiles of side `size`, as near-square a grid as fits them; cells left over are
/// black (the demo's background, and no frame around photographs).
pub fn write_grid(path: &Path, tiles: &[&[u8]], size: usize) -> Result<()> {
    let cols = (tiles.len() as f64).sqrt().ceil() as usize;
    let rows = tiles.len().div_ceil(cols);
    let (w, h) = (cols * size, rows * size);
    let mut sheet = vec![0u8; w * h * 3];
    for (n, tile) in tiles.iter().enumerate() {
        let (r, c) = (n / cols, n % cols);
        for y in 0..size {
            let dst = ((r * size + y) * w + c * size) * 3;
            sheet[dst..dst + size * 3].copy_from_slice(&tile[y * size * 3..(y + 1) * size * 3]);
        }
    }
    write_png(path, &sheet, w, h, &[])
}

/// [1, 3, H, W] in nominal [-1, 1] -> interleaved RGB bytes, as diffusers' `numpy_to_pil`.
pub fn to_rgb8<B: Backend>(image: Tensor<B, 4>) -> Result<Vec<u8>> {
    let [_, c, h, w] = image.dims();
    ensure!(c == 3, "the VAE decodes {c} channels, not RGB");
    let rgb = ((image / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)
        .reshape([c, h * w])
        .swap_dims(0, 1);
    let values: Vec<f32> = rgb.into_data().convert::<f32>().to_vec()?;
    Ok(values.into_iter().map(|v| v.round() as u8).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_leaves_its_spare_cells_black() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grid.png");
        let white = vec![255u8; 2 * 2 * 3];
        write_grid(&path, &[&white, &white, &white], 2).unwrap();
        let sheet = image::open(&path).unwrap().to_rgb8();
        assert_eq!(sheet.dimensions(), (4, 4));
        assert_eq!(sheet.get_pixel(0, 0).0, [255; 3]);
        assert_eq!(sheet.get_pixel(3, 3).0, [0; 3], "the fourth cell is unused");
    }
}
