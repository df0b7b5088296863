//! `precompute`: every input kind, the skip report, resumption without duplicates, the
//! worker split, and the latents' distribution.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use microdit::backend::{Cpu, CpuDevice};
use microdit::data::mds::{f16_values, MdsDataset, MdsWriter, Value};
use microdit::data::preprocess::{decode_rgb, resize_center_crop, to_model_input};
use microdit::data::sources::ImageCaptionSource;
use microdit::hub::Hub;
use microdit::precompute::{precompute, Encoders, PrecomputeOptions, Report};
use microdit::text::TextEncoder;
use microdit::vae::LatentCodec;

fn encoders() -> Encoders<Cpu> {
    let device = CpuDevice::default();
    let hub = Hub::new(std::env::temp_dir(), true);
    let text = common::fixture_sets("clip-text").remove(0);
    let vae = common::fixture_sets("vae").remove(0);
    Encoders {
        text: TextEncoder::from_source(text.to_str().unwrap(), &hub, &device).unwrap(),
        images: LatentCodec::load(vae.to_str().unwrap(), &hub, &device).unwrap(),
    }
}

fn options() -> PrecomputeOptions {
    PrecomputeOptions {
        resolutions: vec![16, 32],
        min_size: 24,
        batch_size: 3,
        part_size: 4,
        quiet: true,
        ..Default::default()
    }
}

/// A smooth colourful test image, different for every `i`.
fn picture(i: u32, w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 255 / w + i * 40) % 256) as u8,
            ((y * 255 / h + i * 90) % 256) as u8,
            ((x + y + i * 17) % 256) as u8,
        ])
    })
}

fn encoded(image: &image::RgbImage, format: image::ImageFormat) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image.write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

/// Seven good pairs (PNG and JPEG, landscape and portrait), one corrupt JPEG, one image
/// too small, one without a caption.
fn image_folder(dir: &Path) -> usize {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    for i in 0..7u32 {
        let (w, h) = if i % 2 == 0 { (40 + i, 30) } else { (30, 44) };
        let (name, format) = if i % 3 == 0 {
            (format!("sub/{i:02}.jpg"), image::ImageFormat::Jpeg)
        } else {
            (format!("{i:02}.png"), image::ImageFormat::Png)
        };
        std::fs::write(dir.join(&name), encoded(&picture(i, w, h), format)).unwrap();
        let caption = dir.join(&name).with_extension("txt");
        std::fs::write(caption, format!("  a picture number {i}\n")).unwrap();
    }
    std::fs::write(
        dir.join("corrupt.jpg"),
        b"\xFF\xD8\xFF\xE0 not really a jpeg",
    )
    .unwrap();
    std::fs::write(dir.join("corrupt.txt"), "broken").unwrap();
    let small = encoded(&picture(9, 20, 60), image::ImageFormat::Png);
    std::fs::write(dir.join("small.png"), small).unwrap();
    std::fs::write(dir.join("small.json"), r#"{"caption": "too small"}"#).unwrap();
    let orphan = encoded(&picture(8, 30, 30), image::ImageFormat::Png);
    std::fs::write(dir.join("orphan.png"), orphan).unwrap();
    7
}

fn run(input: &Path, out: &Path, options: &PrecomputeOptions) -> Report {
    let source = ImageCaptionSource::open(input).unwrap();
    precompute(&source, out, &encoders(), options, &CpuDevice::default()).unwrap()
}

/// Every sample of a dataset, by caption.
fn samples(dir: &Path) -> BTreeMap<String, BTreeMap<String, Value>> {
    let data = MdsDataset::open(dir).unwrap();
    let mut all = BTreeMap::new();
    for i in 0..data.len() {
        let s = data.get(i).unwrap();
        let caption = s["caption"].as_str().unwrap().to_string();
        assert!(all.insert(caption.clone(), s).is_none(), "{caption} twice");
    }
    all
}

#[test]
fn a_folder_becomes_latent_shards_with_a_skip_report() {
    let dir = tempfile::tempdir().unwrap();
    let good = image_folder(&dir.path().join("in"));
    let out = dir.path().join("out");
    let report = run(&dir.path().join("in"), &out, &options());
    assert_eq!(report.written, good);
    let reasons: BTreeMap<_, _> = report.skipped.iter().cloned().collect();
    assert!(
        reasons["corrupt.jpg"].contains("cannot decode"),
        "{reasons:?}"
    );
    assert!(reasons["small.png"].contains("too small"), "{reasons:?}");
    assert!(reasons["orphan.png"].contains("no caption"), "{reasons:?}");
    assert_eq!(reasons.len(), 3);

    let enc = encoders();
    let LatentCodec::Vae { config, .. } = &enc.images else {
        unreachable!()
    };
    let (c, ds) = (config.latent_channels, config.downscale());
    let samples = samples(&out);
    assert_eq!(samples.len(), good);
    let first = &samples["a picture number 0"];
    let caption_len = f16_values(first["caption_latents"].as_bytes().unwrap())
        .unwrap()
        .len();
    assert_eq!(caption_len, 77 * enc.text.config.width);
    for r in [16, 32] {
        let z = f16_values(first[&format!("latents_{r}")].as_bytes().unwrap()).unwrap();
        assert_eq!(z.len(), c * (r / ds) * (r / ds), "latents_{r}");
    }
    // The training reader takes the merged dataset as it is.
    let data = microdit::data::latents::LatentsDataset::open(
        std::slice::from_ref(&out),
        "latents_32",
        "caption_latents",
    )
    .unwrap();
    assert_eq!(data.len(), good);
}

#[test]
fn latents_are_scaled_samples_of_the_vae_distribution() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(&dir.path().join("in"));
    let out = dir.path().join("out");
    run(&dir.path().join("in"), &out, &options());
    let enc = encoders();
    let LatentCodec::Vae {
        model: vae, config, ..
    } = &enc.images
    else {
        unreachable!()
    };
    let scale = config.scaling_factor as f32;
    let file = dir.path().join("in/02.png");
    let pixels = to_model_input(
        &resize_center_crop(&decode_rgb(&std::fs::read(file).unwrap()).unwrap(), 32).unwrap(),
    );
    let images = Tensor::<Cpu, 4>::from_data(
        TensorData::new(pixels, [1, 3, 32, 32]),
        &CpuDevice::default(),
    );
    let dist = vae.encode(images);
    let mean: Vec<f32> = dist.mean.into_data().into_vec().unwrap();
    let std: Vec<f32> = (dist.logvar * 0.5).exp().into_data().into_vec().unwrap();
    let stored = f16_values(
        samples(&out)["a picture number 2"]["latents_32"]
            .as_bytes()
            .unwrap(),
    )
    .unwrap();
    // (stored / scale - mean) / std is the standard normal draw: mean ≈ 0, variance ≈ 1.
    let z: Vec<f32> = stored
        .iter()
        .zip(mean.iter().zip(&std))
        .map(|(s, (m, d))| (s / scale - m) / d)
        .collect();
    let n = z.len() as f32;
    let mu = z.iter().sum::<f32>() / n;
    let var = z.iter().map(|v| (v - mu).powi(2)).sum::<f32>() / n;
    assert!(
        mu.abs() < 0.2 && (var - 1.0).abs() < 0.3,
        "mean {mu}, var {var} over {n}"
    );
}

#[test]
fn an_interrupted_run_resumes_without_duplicates_and_workers_split_the_parts() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    let good = image_folder(&input);
    let whole = dir.path().join("whole");
    run(&input, &whole, &options());

    // A run killed while writing part 1: part 0 finished, part 1 half-written, no index.
    let killed = dir.path().join("killed");
    run(&input, &killed, &options());
    std::fs::remove_file(killed.join("index.json")).unwrap();
    std::fs::rename(killed.join("part-00001"), killed.join("part-00001.partial")).unwrap();
    std::fs::remove_file(killed.join("part-00001.partial/index.json")).unwrap();
    std::fs::remove_dir_all(killed.join("part-00002")).unwrap();
    let report = run(&input, &killed, &options());
    assert_eq!(report.written, good);
    assert_eq!(samples(&killed), samples(&whole));

    // Two workers sharing a folder: the second to finish writes the merged index.
    let split = dir.path().join("split");
    let worker = |w| PrecomputeOptions {
        worker: w,
        workers: 2,
        ..options()
    };
    run(&input, &split, &worker(1));
    assert!(!split.join("index.json").exists());
    run(&input, &split, &worker(0));
    assert_eq!(samples(&split), samples(&whole));
}

fn table_inputs(dir: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut jsonl = String::new();
    let mut csv = String::from("caption,path\n");
    for i in 0..3 {
        let name = format!("img/{i}.png");
        std::fs::write(
            dir.join(&name),
            encoded(&picture(i, 32, 40), image::ImageFormat::Png),
        )
        .unwrap();
        jsonl.push_str(&format!(
            "{{\"path\": \"{name}\", \"caption\": \"shape {i}\"}}\n"
        ));
        csv.push_str(&format!("\"shape {i}, in \"\"quotes\"\"\",{name}\n"));
    }
    std::fs::write(dir.join("pairs.jsonl"), jsonl).unwrap();
    std::fs::write(dir.join("pairs.csv"), csv).unwrap();
    vec![dir.join("pairs.jsonl"), dir.join("pairs.csv")]
}

fn webdataset_tar(path: &Path) {
    let mut tar = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, bytes).unwrap();
    };
    for i in 0..3 {
        let key = format!("0000{i}");
        add(
            &format!("{key}.jpg"),
            &encoded(&picture(i, 40, 32), image::ImageFormat::Jpeg),
        );
        if i == 1 {
            add(
                &format!("{key}.json"),
                br#"{"caption": "from json", "url": "x"}"#,
            );
        } else {
            add(&format!("{key}.txt"), format!("tar picture {i}").as_bytes());
        }
    }
    tar.finish().unwrap();
}

#[test]
fn tables_tars_and_mds_inputs_are_read() {
    let dir = tempfile::tempdir().unwrap();
    for input in table_inputs(dir.path()) {
        let source = ImageCaptionSource::open(&input).unwrap();
        assert_eq!(source.len(), 3);
        let pair = source.read(1).unwrap();
        assert!(pair.caption.starts_with("shape 1"), "{}", pair.caption);
        assert_eq!(decode_rgb(&pair.image).unwrap().dimensions(), (32, 40));
    }
    assert_eq!(
        ImageCaptionSource::open(&dir.path().join("pairs.csv"))
            .unwrap()
            .read(0)
            .unwrap()
            .caption,
        "shape 0, in \"quotes\""
    );

    let tar = dir.path().join("shard-000.tar");
    webdataset_tar(&tar);
    let source = ImageCaptionSource::open(&tar).unwrap();
    let captions: Vec<String> = (0..3).map(|i| source.read(i).unwrap().caption).collect();
    assert_eq!(captions, ["tar picture 0", "from json", "tar picture 2"]);
    assert_eq!(source.key(2), "shard-000.tar:00002");

    // The reference's converted downloads: MDS with jpg + caption columns.
    let mds = dir.path().join("mds");
    let columns = [("caption", "str"), ("jpg", "jpeg")];
    let mut writer = MdsWriter::create(&mds, &columns, None, 1 << 20).unwrap();
    for i in 0..3 {
        let jpg = encoded(&picture(i, 48, 32), image::ImageFormat::Jpeg);
        writer
            .write(&[Value::Str(format!("mds picture {i}")), Value::Image(jpg)])
            .unwrap();
    }
    writer.finish().unwrap();
    let out = dir.path().join("out");
    let report = run(
        &mds,
        &out,
        &PrecomputeOptions {
            keep_images: true,
            ..options()
        },
    );
    assert_eq!(report.written, 3);
    let jpg = samples(&out)["mds picture 2"]["jpg"].clone();
    assert_eq!(
        decode_rgb(jpg.as_bytes().unwrap()).unwrap().dimensions(),
        (48, 32)
    );
}

#[test]
fn unusable_inputs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let error = |p: &Path| format!("{:#}", ImageCaptionSource::open(p).err().unwrap());
    assert!(error(&dir.path().join("missing")).contains("no such file"));
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"path\": \"a.png\"}\n").unwrap();
    assert!(
        error(&bad).contains("line 1: no \"caption\""),
        "{}",
        error(&bad)
    );
    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    assert!(error(&txt).contains("expected a folder"));
}
