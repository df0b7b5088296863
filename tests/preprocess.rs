//! Resize + centre crop against the reference's torchvision/Pillow preprocessing
//! (`tests/fixtures/resize/make.py` wrote the expected crops). Another case directory can
//! be given in `MICRODIT_RESIZE_FIXTURES`, e.g. whole photographs from `make.py --full`.
//! Run with `--nocapture` to see each case's largest difference.

use std::path::PathBuf;

use microdit::data::preprocess::{decode_rgb, resize_center_crop};

fn cases_dir() -> PathBuf {
    std::env::var_os("MICRODIT_RESIZE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize"))
}

#[test]
fn resize_and_crop_match_torchvision_within_one_grey_level() {
    let dir = cases_dir();
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let parts: Vec<&str> = name.split('.').collect();
        let [case, size, "png"] = parts[..] else {
            continue;
        };
        let Ok(size) = size.parse::<usize>() else {
            continue;
        };
        let input = ["png", "jpg"]
            .iter()
            .map(|e| dir.join(format!("{case}.input.{e}")))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("no input for {name}"));
        let ours = resize_center_crop(&decode_rgb(&std::fs::read(&input).unwrap()).unwrap(), size)
            .unwrap();
        let expected = decode_rgb(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(ours.dimensions(), expected.dimensions(), "{name}");
        let diffs: Vec<i32> = ours
            .as_raw()
            .iter()
            .zip(expected.as_raw())
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .collect();
        let max = *diffs.iter().max().unwrap();
        let exact = diffs.iter().filter(|d| **d == 0).count() as f64 / diffs.len() as f64;
        println!(
            "{name}: max |diff| {max}, {:.2}% of values equal",
            100.0 * exact
        );
        if input.extension().unwrap() == "png" {
            assert!(
                max <= 1,
                "{name}: differs from torchvision by {max} grey levels"
            );
        } else {
            // Pillow decodes JPEG with libjpeg-turbo and microdit with zune-jpeg: their
            // IDCT and chroma upsampling round differently, a few grey levels at most.
            assert!(
                max <= 6 && exact > 0.85,
                "{name}: JPEG decoders disagree too much"
            );
        }
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} cases in {}", dir.display());
}
