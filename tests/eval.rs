//! Evaluation parity: FID against pytorch-fid and CLIP score against open_clip, on the sets
//! `tests/fixtures/eval/make.py` writes (random-weight models; see its header for layouts).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::Flex;
use common::random_weights::write_state_dict;
use common::{assert_close, fixture_sets, Cases};
use microdit::eval::clip::{clip_score, ClipScorer};
use microdit::eval::inception::FidInception;
use microdit::eval::stats::{frechet_distance, Statistics};
use microdit::hub::Hub;

type B = Flex;

fn expected(set: &Path) -> BTreeMap<String, f64> {
    let text = std::fs::read_to_string(set.join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// pytorch-fid's value: scipy's `sqrtm` of a rank-deficient product carries round-off of
/// about √ε·scale per zero eigenvalue, which ours does not, hence an absolute floor.
fn assert_fid_close(what: &str, ours: f64, reference: f64) {
    let tolerance = 1e-6 * reference.abs().max(1.0) + 1e-4;
    eprintln!("{what}: ours {ours:.9}, pytorch-fid {reference:.9}");
    assert!(
        (ours - reference).abs() < tolerance,
        "{what}: ours {ours}, pytorch-fid {reference}"
    );
}

#[test]
fn frechet_distance_of_statistics_files_is_pytorch_fids() {
    for set in fixture_sets("fid-stats") {
        for (pair, want) in expected(&set) {
            let (a, b) = pair.split_once(':').unwrap();
            let read = |name: &str| Statistics::read(&set.join(format!("{name}.npz"))).unwrap();
            let got = frechet_distance(&read(a), &read(b)).unwrap();
            assert_fid_close(&format!("{} {pair}", set.display()), got, want);
        }
    }
}

fn config(set: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(set.join("config.json")).unwrap()).unwrap()
}

/// The set's random weights, written as a user's file in a folder of their own (dropped
/// with the returned guard).
fn weights_file(set: &Path, name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    write_state_dict(&config(set), &path);
    (dir, path)
}

fn images(folder: &Path) -> Vec<image::RgbImage> {
    let mut paths: Vec<_> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| image::open(p).unwrap().to_rgb8())
        .collect()
}

#[test]
fn fid_inception_features_and_fid_are_pytorch_fids() {
    for set in fixture_sets("fid-inception") {
        let (_dir, weights) = weights_file(&set, "inception.safetensors");
        let net = FidInception::<B>::load(&weights, &Default::default()).unwrap();
        let cases = Cases::open(&set.join("cases.safetensors"));
        let mut stats = Vec::new();
        for folder in ["a", "b"] {
            let features = net.features(&images(&set.join(folder))).unwrap();
            let flat: Vec<f32> = features.concat();
            let reference = cases.values(&format!("features.{folder}"));
            assert_close(
                &format!("{} features {folder}", set.display()),
                &flat,
                &reference,
                1e-4,
            );
            stats.push(Statistics::from_rows(&features).unwrap());
        }
        let fid = frechet_distance(&stats[0], &stats[1]).unwrap();
        let want = expected(&set)["fid_a_b"];
        eprintln!("FID a b: ours {fid}, pytorch-fid {want}");
        assert!(
            (fid - want).abs() < 1e-4 * want.abs().max(1.0),
            "FID {fid} vs {want}"
        );
    }
}

#[test]
fn clip_score_towers_preprocessing_and_score_are_open_clips() {
    for set in fixture_sets("clip-score") {
        let (_guard, weights) = weights_file(&set, "open_clip_model.safetensors");
        let dir = weights.parent().unwrap();
        std::fs::copy(
            set.join("open_clip_config.json"),
            dir.join("open_clip_config.json"),
        )
        .unwrap();
        let hub = Hub::new(dir.join("hub"), true);
        let scorer =
            ClipScorer::<B>::from_source(dir.to_str().unwrap(), &hub, &Default::default()).unwrap();

        let cfg = config(&set);
        let prompts: Vec<&str> = cfg["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap())
            .collect();
        let images = images(&set.join("images"));
        let cases = Cases::open(&set.join("cases.safetensors"));
        let name = set.display();
        let pixels: Vec<f32> = images
            .iter()
            .flat_map(|i| scorer.preprocess.apply(i).unwrap())
            .collect();
        assert_close(
            &format!("{name} pixels"),
            &pixels,
            &cases.values("pixels"),
            1e-6,
        );
        let values = |t: burn::tensor::Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
        let image_features = values(scorer.image_features(&images).unwrap());
        assert_close(
            &format!("{name} image features"),
            &image_features,
            &cases.values("image_features"),
            1e-4,
        );
        let text_features = values(scorer.text_features(&prompts));
        assert_close(
            &format!("{name} text features"),
            &text_features,
            &cases.values("text_features"),
            1e-4,
        );

        let scores = scorer.pair_scores(&images, &prompts).unwrap();
        for (ours, reference) in scores.iter().zip(cases.values("score")) {
            assert!(
                (ours - reference as f64).abs() < 1e-3,
                "{name}: pair score {ours} vs {reference}"
            );
        }
        let want = expected(&set)["clip_score"];
        let got = clip_score(&scores);
        assert!(
            (got - want).abs() < 1e-3,
            "{name}: CLIP score {got} vs {want}"
        );
    }
}

/// `microdit eval` end to end with tiny random models: the fixtures' text tower (whose
/// open_clip file also holds a small random vision tower, so it serves as the CLIP judge),
/// a random MicroDiT, and a random FID Inception.
#[test]
fn eval_generates_resumes_shares_work_and_reports() {
    let model = common::model::tiny_model();
    let root = &model.root;
    let set = fixture_sets("fid-inception").remove(0);
    let (_guard, inception) = weights_file(&set, "inception.safetensors");
    let clip = common::fixture_sets("clip-text").remove(0);
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |args: &[String]| {
        let r = common::microdit_env(args, &[("HF_HUB_OFFLINE", "1".as_ref())]);
        (r.ok(), r.log())
    };

    let reference = root.join("reference.npz");
    let (ok, log) = run(&[
        "eval".into(),
        "stats".into(),
        s(&set.join("a")),
        "-o".into(),
        s(&reference),
        "--inception".into(),
        s(&inception),
    ]);
    let real_images = std::fs::read_dir(set.join("a")).unwrap().count();
    assert!(
        ok && log.contains(&format!("wrote FID statistics of {real_images} images")),
        "{log}"
    );

    let captions = root.join("captions.jsonl");
    std::fs::write(&captions, "{\"caption\": \"a red circle\"}\n\"a blue square\"\n{\"caption\": \"two green triangles\"}\n").unwrap();
    let eval_args = |out: &Path, extra: &[&str]| {
        let mut a: Vec<String> = vec![
            "eval".into(),
            "--prompts".into(),
            s(&captions),
            "--reference-stats".into(),
            s(&reference),
            "--inception".into(),
            s(&inception),
            "--clip".into(),
            s(&clip),
            "--out".into(),
            s(out),
            "--gen-batch".into(),
            "2".into(),
        ];
        a.extend(model.args.iter().cloned());
        a.extend(extra.iter().map(|e| e.to_string()));
        a
    };

    // Two workers share the images; each makes only its own.
    let shared = root.join("shared");
    let (ok, log) = run(&eval_args(&shared, &["--worker", "1", "--workers", "2"]));
    assert!(ok, "{log}");
    let exists = |dir: &Path, k: usize| dir.join(format!("images/{k:06}.png")).exists();
    assert!(
        !exists(&shared, 0) && exists(&shared, 1) && !exists(&shared, 2),
        "{log}"
    );
    assert!(!shared.join("report.json").exists());

    // Without --worker the rest is made, then scored.
    let (ok, log) = run(&eval_args(&shared, &[]));
    assert!(ok, "{log}");
    assert!(log.contains("generating 2 images (1 of 3 already"), "{log}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shared.join("report.json")).unwrap())
            .unwrap();
    let fid = report["fid"].as_f64().unwrap();
    let clip_score = report["clip_score"].as_f64().unwrap();
    assert!(fid.is_finite() && fid > 0.0, "{report}");
    assert!((0.0..=100.0).contains(&clip_score), "{report}");
    assert_eq!(report["images"], 3);
    assert!(std::fs::read_to_string(shared.join("report.md"))
        .unwrap()
        .contains("FID-3"));
    let text = microdit::png_io::read_png_text(&shared.join("images/000002.png")).unwrap();
    assert!(
        text.contains(&("prompt".into(), "two green triangles".into())),
        "{text:?}"
    );
    assert!(text.contains(&("seed".into(), "2".into())), "{text:?}");

    // The FID is the distance between the statistics files it is made of.
    let (ok, log) = run(&[
        "eval".into(),
        "fid".into(),
        s(&shared.join("generated.npz")),
        s(&reference),
    ]);
    assert!(ok, "{log}");
    let printed: f64 = log.trim().trim_start_matches("FID: ").parse().unwrap();
    assert!(
        (printed - fid).abs() < 1e-5 * fid.max(1.0),
        "{printed} vs {fid}"
    );

    // Rerunning resumes: nothing is generated again and the scores are the same.
    let (ok, log) = run(&eval_args(&shared, &[]));
    assert!(ok && !log.contains("generating"), "{log}");
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(shared.join("report.json")).unwrap())
            .unwrap();
    assert_eq!(again["fid"], report["fid"]);
    assert_eq!(again["clip_score"], report["clip_score"]);

    // Other settings never mix into an existing run.
    let (ok, log) = run(&eval_args(&shared, &["--guidance", "2"]));
    assert!(!ok && log.contains("other settings (guidance)"), "{log}");
}

#[test]
fn missing_inception_weights_say_what_to_fetch() {
    let set = fixture_sets("fid-inception").remove(0);
    let home = std::env::temp_dir().join(format!("microdit-no-torch-{}", std::process::id()));
    let r = common::microdit_env(
        &[
            "eval",
            "stats",
            set.join("a").to_str().unwrap(),
            "-o",
            "/tmp/never.npz",
        ],
        &[("TORCH_HOME", home.as_os_str())],
    );
    let log = r.log();
    assert!(!r.ok(), "{log}");
    assert!(
        log.contains("pt_inception-2015-12-05-6726825d.pth")
            && log.contains("https://github.com/mseitzer/pytorch-fid"),
        "{log}"
    );
    assert!(!Path::new("/tmp/never.npz").exists());
}

#[test]
fn coco_draws_distinct_images_with_one_caption_each_and_prepares_them() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("val2014");
    std::fs::create_dir_all(&images).unwrap();
    let mut coco = serde_json::json!({"images": [], "annotations": []});
    for id in 0..6u64 {
        let name = format!("COCO_val2014_{id:012}.jpg");
        image::RgbImage::from_fn(40 + id as u32, 30, |x, y| {
            image::Rgb([x as u8 * 6, y as u8 * 8, id as u8 * 40])
        })
        .save(images.join(&name))
        .unwrap();
        coco["images"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"id": id, "file_name": name}));
        for c in 0..2 {
            coco["annotations"].as_array_mut().unwrap().push(
                serde_json::json!({"image_id": id, "caption": format!(" picture {id} caption {c} ")}),
            );
        }
    }
    let annotations = dir.path().join("captions_val2014.json");
    std::fs::write(&annotations, coco.to_string()).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let run = |out: &Path, num: &str| {
        common::microdit(&[
            "eval".into(),
            "coco".into(),
            "--annotations".into(),
            s(&annotations),
            "--images".into(),
            s(&images),
            "--num".into(),
            num.into(),
            "--size".into(),
            "16".into(),
            "-o".into(),
            s(out),
        ])
    };
    let out = dir.path().join("coco4");
    let r = run(&out, "4");
    assert!(r.ok(), "{}", r.log());
    let captions = microdit::eval::captions::read(&out.join("captions.jsonl")).unwrap();
    assert_eq!(captions.len(), 4);
    let ids: std::collections::BTreeSet<&str> = captions
        .iter()
        .map(|c| c.caption.split(' ').nth(1).unwrap())
        .collect();
    assert_eq!(ids.len(), 4, "distinct images: {captions:?}");
    for (k, c) in captions.iter().enumerate() {
        assert!(
            c.caption.starts_with("picture") && c.caption.ends_with(['0', '1']),
            "trimmed: {c:?}"
        );
        assert_eq!(
            c.image.as_deref(),
            Some(format!("images/{k:06}.png").as_str())
        );
        let image = image::open(out.join(c.image.as_deref().unwrap())).unwrap();
        assert_eq!((image.width(), image.height()), (16, 16));
    }
    // The same seed draws the same pairs.
    let again = dir.path().join("again");
    assert!(run(&again, "4").ok());
    assert_eq!(
        microdit::eval::captions::read(&again.join("captions.jsonl")).unwrap(),
        captions
    );
    let r = run(&dir.path().join("too-many"), "7");
    assert!(!r.ok() && r.log().contains("fewer than 7"), "{}", r.log());
}
