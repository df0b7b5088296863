//! Precomputing training data: image–caption pairs in, MDS shards of latents and caption
//! embeddings out, as the reference's `precompute.py` writes them (columns `caption`,
//! `caption_latents`, `latents_256`, `latents_512`, optionally `jpg`; float16 bytes).
//!
//! The pairs are cut into parts of `part_size` in listing order. Each part is written to
//! `OUT/part-NNNNN.partial/` and renamed to `OUT/part-NNNNN/` when complete, so a re-run
//! skips finished parts and redoes at most one unfinished part, never duplicating a pair.
//! Part `p` belongs to worker `p % workers`; once all parts exist, a merged `OUT/index.json`
//! (shard paths relative to `OUT`, as streaming's `merge_index` writes) makes `OUT` one
//! dataset. Images are decoded and resized on a thread pool while the previous batch is
//! being encoded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::backend::MicroditBackend;
use anyhow::{bail, Context, Result};
use burn::prelude::*;
use indicatif::ProgressBar;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::data::mds::{f16_bytes, MdsWriter, Value};
use crate::data::preprocess::{decode_rgb, resize_center_crop, resize_short_side, to_model_input};
use crate::data::sources::ImageCaptionSource;
use crate::random::standard_normal;
use crate::text::TextEncoder;
use crate::vae::LatentCodec;

#[derive(Debug, Clone)]
pub struct PrecomputeOptions {
    /// Square crops to encode, one `latents_R` column each (the reference: 256 and 512).
    pub resolutions: Vec<usize>,
    /// Pairs whose image has a shorter side are skipped (the reference: 256).
    pub min_size: usize,
    pub batch_size: usize,
    pub part_size: usize,
    /// Seeds the latent-distribution samples; pair `i` always gets the same noise.
    pub seed: u64,
    /// Also store the image (`jpg` column), its short side at most the largest resolution.
    pub keep_images: bool,
    pub worker: usize,
    pub workers: usize,
    pub quiet: bool,
}

impl Default for PrecomputeOptions {
    fn default() -> Self {
        Self {
            resolutions: vec![256, 512],
            min_size: 256,
            batch_size: 8,
            part_size: 500,
            seed: 2024,
            keep_images: false,
            worker: 0,
            workers: 1,
            quiet: false,
        }
    }
}

/// The frozen encoders precompute runs.
pub struct Encoders<B: MicroditBackend> {
    pub text: TextEncoder<B>,
    pub images: LatentCodec<B>,
}

/// What happened to the pairs, summed over every finished part.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    pub written: usize,
    /// Skipped pairs: (key, reason).
    pub skipped: Vec<(String, String)>,
    /// Captions longer than the text tower's context (cut, as the reference does).
    pub truncated_captions: usize,
}

/// A pair ready for the encoders.
struct Prepared {
    index: usize,
    caption: String,
    /// One `[3, R, R]` image per resolution.
    pixels: Vec<Vec<f32>>,
    jpg: Option<Vec<u8>>,
}

/// Runs this worker's unfinished parts; writes the merged index when all parts are done.
/// A killed run loses only its unfinished part, which the next run redoes.
pub fn precompute<B: MicroditBackend>(
    source: &ImageCaptionSource,
    out: &Path,
    encoders: &Encoders<B>,
    options: &PrecomputeOptions,
    device: &B::Device,
) -> Result<Report> {
    validate(options, &encoders.images)?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let parts = source.len().div_ceil(options.part_size);
    let mine: Vec<usize> = (0..parts)
        .filter(|p| p % options.workers == options.worker)
        .collect();
    let todo: Vec<usize> = mine
        .iter()
        .copied()
        .filter(|p| !part_done(out, *p))
        .collect();
    let pairs_in = |p: usize| part_range(p, options.part_size, source.len()).len();
    let pairs = mine.iter().map(|p| pairs_in(*p)).sum();
    let bar = crate::progress::bar_unless(options.quiet, pairs, "precompute", "pair");
    bar.set_position(
        mine.iter()
            .filter(|p| !todo.contains(p))
            .map(|p| pairs_in(*p))
            .sum::<usize>() as u64,
    );
    bar.reset_eta();
    for part in todo {
        write_part(source, out, part, encoders, options, &bar, device)?;
    }
    bar.finish_and_clear();
    let done = (0..parts).filter(|p| part_done(out, *p)).count();
    if done == parts {
        merge_index(out, parts)?;
    } else if !options.quiet {
        eprintln!(
            "{done} of {parts} parts are finished; the merged index is written when all are \
             (re-run to continue; other workers' parts: --worker/--workers)"
        );
    }
    let report = read_reports(out, parts)?;
    crate::io::write_json(&out.join("report.json"), &report)?;
    Ok(report)
}

impl PrecomputeOptions {
    /// The checks that need no model (run before loading one).
    pub fn check(&self) -> Result<()> {
        if self.resolutions.is_empty() || self.batch_size == 0 || self.part_size == 0 {
            bail!("resolutions, batch size and part size must be non-empty/positive");
        }
        if self.workers == 0 || self.worker >= self.workers {
            bail!(
                "worker {} of {}: --worker counts from 0 and must be below --workers",
                self.worker,
                self.workers
            );
        }
        Ok(())
    }
}

fn validate<B: MicroditBackend>(
    options: &PrecomputeOptions,
    images: &LatentCodec<B>,
) -> Result<()> {
    options.check()?;
    let downscale = images.downscale();
    for r in &options.resolutions {
        if r % downscale != 0 {
            bail!("resolution {r} is not a multiple of the encoder's downscale factor {downscale}");
        }
    }
    Ok(())
}

fn part_dir(out: &Path, part: usize) -> PathBuf {
    out.join(format!("part-{part:05}"))
}

/// A part is finished once its directory holds an index (written last, then renamed).
fn part_done(out: &Path, part: usize) -> bool {
    part_dir(out, part).join("index.json").exists()
}

fn part_range(part: usize, part_size: usize, len: usize) -> std::ops::Range<usize> {
    part * part_size..((part + 1) * part_size).min(len)
}

fn write_part<B: MicroditBackend>(
    source: &ImageCaptionSource,
    out: &Path,
    part: usize,
    encoders: &Encoders<B>,
    options: &PrecomputeOptions,
    bar: &ProgressBar,
    device: &B::Device,
) -> Result<()> {
    let partial = part_dir(out, part).with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("removing the unfinished {}", partial.display()))?;
    }
    let columns = columns(options);
    let columns: Vec<(&str, &str)> = columns.iter().map(|(n, e)| (n.as_str(), *e)).collect();
    let mut writer = MdsWriter::create(&partial, &columns, None, 256 << 20)?;
    let mut report = Report::default();
    let indices: Vec<usize> = part_range(part, options.part_size, source.len()).collect();
    let (sender, receiver) = std::sync::mpsc::sync_channel(1);
    std::thread::scope(|scope| -> Result<()> {
        scope.spawn(move || {
            for batch in indices.chunks(options.batch_size) {
                let prepared: Vec<_> = batch
                    .par_iter()
                    .map(|&i| prepare(source, i, options).map_err(|e| (i, one_line(&e))))
                    .collect();
                if sender.send(prepared).is_err() {
                    break;
                }
            }
        });
        for prepared in receiver {
            bar.inc(prepared.len() as u64);
            let mut ready = Vec::new();
            for p in prepared {
                match p {
                    Ok(p) => ready.push(p),
                    Err((i, reason)) => report.skipped.push((source.key(i), reason)),
                }
            }
            if !ready.is_empty() {
                encode_batch(&ready, encoders, options, &mut writer, &mut report, device)?;
            }
            bar.set_message(format!("{} skipped", report.skipped.len()));
        }
        Ok(())
    })?;
    writer.finish()?;
    crate::io::write_json(&partial.join("report.json"), &report)?;
    let done = part_dir(out, part);
    std::fs::rename(&partial, &done)
        .with_context(|| format!("renaming {} to {}", partial.display(), done.display()))
}

fn columns(options: &PrecomputeOptions) -> Vec<(String, &'static str)> {
    let mut columns = vec![
        ("caption".to_string(), "str"),
        ("caption_latents".to_string(), "bytes"),
    ];
    columns.extend(
        options
            .resolutions
            .iter()
            .map(|r| (format!("latents_{r}"), "bytes")),
    );
    if options.keep_images {
        columns.push(("jpg".to_string(), "jpeg"));
    }
    columns
}

/// Reads, decodes, filters and crops one pair (on a worker thread).
fn prepare(
    source: &ImageCaptionSource,
    index: usize,
    options: &PrecomputeOptions,
) -> Result<Prepared> {
    let pair = source.read(index)?;
    let image = decode_rgb(&pair.image)?;
    let short = image.width().min(image.height()) as usize;
    if short < options.min_size {
        bail!(
            "too small: {}x{} (short side below {} px)",
            image.width(),
            image.height(),
            options.min_size
        );
    }
    let pixels = options
        .resolutions
        .iter()
        .map(|&r| Ok(to_model_input(&resize_center_crop(&image, r)?)))
        .collect::<Result<_>>()?;
    let largest = *options.resolutions.iter().max().expect("validated");
    let jpg = options
        .keep_images
        .then(|| stored_jpeg(pair.image, &image, largest))
        .transpose()?;
    Ok(Prepared {
        index,
        caption: pair.caption,
        pixels,
        jpg,
    })
}

/// The image as the reference's convert step keeps it: JPEG, the short side at most
/// `max_side` (larger images are resized down and re-encoded, others kept as they are).
fn stored_jpeg(bytes: Vec<u8>, image: &image::RgbImage, max_side: usize) -> Result<Vec<u8>> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let short = w.min(h);
    let is_jpeg = bytes.starts_with(&[0xFF, 0xD8]);
    if short <= max_side && is_jpeg {
        return Ok(bytes);
    }
    let image = if short > max_side {
        resize_short_side(image, max_side)?
    } else {
        image.clone()
    };
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95)
        .encode_image(&image)
        .context("encoding JPEG")?;
    Ok(out)
}

fn encode_batch<B: MicroditBackend>(
    batch: &[Prepared],
    encoders: &Encoders<B>,
    options: &PrecomputeOptions,
    writer: &mut MdsWriter,
    report: &mut Report,
    device: &B::Device,
) -> Result<()> {
    let n = batch.len();
    let captions: Vec<&str> = batch.iter().map(|p| p.caption.as_str()).collect();
    let text = encoders.text.encode(&captions, device);
    report.truncated_captions += text.truncated;
    let states = text.states.into_data().convert::<f32>().into_vec::<f32>()?;
    let per_caption = states.len() / n;
    let mut latents = Vec::new();
    for (k, &r) in options.resolutions.iter().enumerate() {
        let pixels: Vec<f32> = batch.iter().flat_map(|p| p.pixels[k].clone()).collect();
        let images = Tensor::from_data(TensorData::new(pixels, [n, 3, r, r]), device);
        let [c, h, w] = encoders.images.latent_shape(r);
        let noise: Vec<Tensor<B, 4>> = batch
            .iter()
            .map(|p| {
                let mut rng = sample_rng(options.seed, p.index, r);
                standard_normal(&mut rng, [1, c, h, w], device)
            })
            .collect();
        let z = encoders.images.encode(images, Tensor::cat(noise, 0));
        latents.push(z.into_data().convert::<f32>().into_vec::<f32>()?);
    }
    for (i, p) in batch.iter().enumerate() {
        let mut values = vec![
            Value::Str(p.caption.clone()),
            Value::Bytes(f16_bytes(&states[i * per_caption..(i + 1) * per_caption])),
        ];
        for z in &latents {
            let per = z.len() / n;
            values.push(Value::Bytes(f16_bytes(&z[i * per..(i + 1) * per])));
        }
        if let Some(jpg) = &p.jpg {
            values.push(Value::Image(jpg.clone()));
        }
        writer.write(&values)?;
        report.written += 1;
    }
    Ok(())
}

fn one_line(error: &anyhow::Error) -> String {
    format!("{error:#}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Pair `index`'s noise at `resolution`: its own ChaCha8 stream, whatever the batching,
/// the worker split or an interruption.
fn sample_rng(seed: u64, index: usize, resolution: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ ((resolution as u64) << 32));
    rng.set_stream(index as u64);
    rng
}

fn read_reports(out: &Path, parts: usize) -> Result<Report> {
    let mut total = Report::default();
    for p in 0..parts {
        let path = part_dir(out, p).join("report.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let r: Report = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a part report", path.display()))?;
            total.written += r.written;
            total.skipped.extend(r.skipped);
            total.truncated_captions += r.truncated_captions;
        }
    }
    Ok(total)
}

/// One index over all parts: each shard entry with its basename prefixed by its part
/// directory, as mosaicml-streaming's `merge_index` does.
fn merge_index(out: &Path, parts: usize) -> Result<()> {
    let mut shards = Vec::new();
    for p in 0..parts {
        let dir = part_dir(out, p);
        let path = dir.join("index.json");
        let index: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("{}: not an MDS index", path.display()))?;
        let name = dir
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        for mut shard in index["shards"].as_array().cloned().unwrap_or_default() {
            for file in ["raw_data", "zip_data"] {
                if let Some(b) = shard[file]["basename"].as_str() {
                    shard[file]["basename"] = format!("{name}/{b}").into();
                }
            }
            shards.push(shard);
        }
    }
    let index = serde_json::json!({"shards": shards, "version": 2});
    crate::io::write_json(&out.join("index.json"), &index)
}

/// Skip reasons grouped by their first words, for the summary line.
pub fn skip_reasons(report: &Report) -> BTreeMap<String, usize> {
    let mut reasons = BTreeMap::new();
    for (_, reason) in &report.skipped {
        let kind = reason.split(':').next().unwrap_or(reason).to_string();
        *reasons.entry(kind).or_insert(0) += 1;
    }
    reasons
}
