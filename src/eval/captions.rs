//! The captions an evaluation generates from, and the COCO-30K selection.
//!
//! `captions.jsonl`: one JSON object per line with the caption under `caption` (or `prompt`
//! or `text`) and optionally the real image it describes under `image`; a bare JSON string
//! per line also works.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Caption {
    pub caption: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

pub fn read(path: &Path) -> Result<Vec<Caption>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut captions = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: not JSON (expected {{\"caption\": ...}})", at()))?;
        let caption = match &value {
            serde_json::Value::String(s) => Caption {
                caption: s.clone(),
                image: None,
            },
            serde_json::Value::Object(o) => {
                let text = ["caption", "prompt", "text"]
                    .iter()
                    .find_map(|k| o.get(*k).and_then(|v| v.as_str()))
                    .with_context(|| format!("{}: no \"caption\" string", at()))?;
                Caption {
                    caption: text.to_string(),
                    image: o.get("image").and_then(|v| v.as_str()).map(String::from),
                }
            }
            _ => bail!("{}: expected an object or a string", at()),
        };
        captions.push(caption);
    }
    ensure!(!captions.is_empty(), "{} holds no captions", path.display());
    Ok(captions)
}

pub fn write(path: &Path, captions: &[Caption]) -> Result<()> {
    let mut text = String::new();
    for c in captions {
        text += &serde_json::to_string(c)?;
        text.push('\n');
    }
    crate::io::write_atomic(path, |f| std::io::Write::write_all(f, text.as_bytes()))
}

#[derive(Deserialize)]
struct CocoAnnotations {
    images: Vec<CocoImage>,
    annotations: Vec<CocoCaption>,
}

#[derive(Deserialize)]
struct CocoImage {
    id: u64,
    file_name: String,
}

#[derive(Deserialize)]
struct CocoCaption {
    image_id: u64,
    caption: String,
}

/// COCO-30K: `num` distinct images of a COCO captions file (`captions_val2014.json`), drawn
/// with ChaCha8(`seed`), each with one of its captions drawn the same way; images resolved
/// against `images_dir`.
pub fn coco_pairs(
    annotations: &Path,
    images_dir: &Path,
    num: usize,
    seed: u64,
) -> Result<Vec<Caption>> {
    let file = std::fs::File::open(annotations)
        .with_context(|| format!("opening {}", annotations.display()))?;
    let coco: CocoAnnotations = serde_json::from_reader(std::io::BufReader::new(file))
        .with_context(|| format!("{}: not a COCO captions file", annotations.display()))?;
    let mut by_image: std::collections::BTreeMap<u64, Vec<&str>> = Default::default();
    for a in &coco.annotations {
        by_image
            .entry(a.image_id)
            .or_default()
            .push(a.caption.trim());
    }
    let mut images: Vec<&CocoImage> = coco
        .images
        .iter()
        .filter(|i| by_image.contains_key(&i.id))
        .collect();
    images.sort_by_key(|i| i.id);
    ensure!(
        num <= images.len(),
        "{} has {} captioned images, fewer than {num}",
        annotations.display(),
        images.len()
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    images.shuffle(&mut rng);
    images
        .into_iter()
        .take(num)
        .map(|image| {
            let options = &by_image[&image.id];
            let caption = options[rng.random_range(0..options.len())];
            Ok(Caption {
                caption: caption.to_string(),
                image: Some(images_dir.join(&image.file_name).display().to_string()),
            })
        })
        .collect()
}

/// pytorch-fid's image extensions (`IMAGE_EXTENSIONS`), matched as it matches them.
const IMAGE_EXTENSIONS: &[&str] = &[
    "bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp",
];

/// The images of a folder as pytorch-fid lists them: those extensions (lower case), sorted.
/// COCO-30K's real side: which pairs, and where and how large to write them.
#[derive(Debug, Clone, clap::Args)]
pub struct CocoSubset {
    /// COCO captions file (`annotations/captions_val2014.json`).
    #[arg(long)]
    pub annotations: PathBuf,
    /// The folder of the images it names (`val2014/`).
    #[arg(long)]
    pub images: PathBuf,
    /// Pairs to draw (distinct images, one caption each).
    #[arg(long, default_value_t = 30_000)]
    pub num: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Side of the prepared real images: the generated images' resolution.
    #[arg(long, default_value_t = 512)]
    pub size: usize,
    /// Output folder: captions.jsonl and images/.
    #[arg(long, short)]
    pub out: PathBuf,
}

/// `num` image–caption pairs drawn with `seed` ([`coco_pairs`]), each image centre-cropped
/// and resized (bicubic) to `size`² into `out/images/NNNNNN.png` (kept when already there,
/// so a re-run resumes), the captions, naming them, into `out/captions.jsonl`. Returns how
/// many pairs were written.
pub fn prepare_coco(subset: &CocoSubset) -> Result<usize> {
    let CocoSubset {
        annotations,
        images,
        num,
        seed,
        size,
        out,
    } = subset;
    let (size, out) = (*size, out.as_path());
    ensure!(size > 0, "--size must be positive");
    let pairs = coco_pairs(annotations, images, *num, *seed)?;
    let dir = out.join("images");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let bar = super::progress(pairs.len(), "COCO images");
    let prepared: Vec<Caption> = pairs
        .par_iter()
        .enumerate()
        .map(|(k, pair)| {
            let name = format!("images/{k:06}.png");
            let target = out.join(&name);
            if !target.exists() {
                let source = Path::new(pair.image.as_deref().unwrap_or_default());
                let image = crate::data::preprocess::resize_center_crop(&load_rgb(source)?, size)?;
                crate::png_io::write_png(&target, image.as_raw(), size, size, &[])?;
            }
            bar.inc(1);
            Ok(Caption {
                caption: pair.caption.clone(),
                image: Some(name),
            })
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();
    write(&out.join("captions.jsonl"), &prepared)?;
    Ok(prepared.len())
}

pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading the image folder {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e))
        })
        .collect();
    files.sort();
    ensure!(!files.is_empty(), "{} holds no images", dir.display());
    Ok(files)
}

/// An image file as 8-bit RGB (`PIL.Image.open(path).convert('RGB')`).
pub fn load_rgb(path: &Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    crate::data::preprocess::decode_rgb(&bytes)
        .with_context(|| format!("decoding {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_objects_and_strings_and_rejects_garbage() {
        let dir = std::env::temp_dir().join(format!("microdit-captions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.jsonl");
        std::fs::write(&path, "{\"caption\": \"a cat\", \"image\": \"1.jpg\"}\n\n\"a dog\"\n{\"prompt\": \"a cow\"}\n").unwrap();
        let got = read(&path).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].image.as_deref(), Some("1.jpg"));
        assert_eq!(got[1].caption, "a dog");
        assert_eq!(got[2].caption, "a cow");
        std::fs::write(&path, "{\"label\": 3}\n").unwrap();
        let err = read(&path).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
        std::fs::remove_dir_all(dir).ok();
    }
}
