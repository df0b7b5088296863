//! The `microdit` binary as a user runs it.

mod common;

use common::{microdit, microdit_env};

#[test]
fn info_reports_the_published_parameter_counts() {
    let (ok, out, _) = microdit(&["info", "--preset", "MicroDiT_XL_2"]).split();
    assert!(ok && out.contains("1165442320 parameters"), "{out}");
    let (ok, out, _) =
        microdit(&["info", "--preset", "MicroDiT_XL_2", "--in-channels", "16"]).split();
    assert!(ok && out.contains("1165540672 parameters"), "{out}");
    let (ok, out, _) =
        microdit(&["info", "--preset", "MicroDiT_Tiny_2", "--resolution", "512"]).split();
    assert!(
        ok && out.contains("200692752 parameters") && out.contains("1024 patches"),
        "{out}"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let (ok, _, err) = microdit(&["info", "--preset", "MicroDiT_L_2"]).split();
    assert!(
        !ok && err.contains("unknown preset 'MicroDiT_L_2'"),
        "{err}"
    );
    let (ok, _, err) = microdit(&["info", "--resolution", "300"]).split();
    assert!(
        !ok && err.contains("resolution 300 is not a multiple of 16"),
        "{err}"
    );
    let (ok, _, err) = microdit(&["bench", "--device", "tpu"]).split();
    assert!(!ok && err.contains("unknown device 'tpu'"), "{err}");
    // The published model's patch grid is known before any weights are looked for.
    let (ok, _, err) = microdit(&["generate", "a red circle", "--resolution", "100"]).split();
    assert!(
        !ok && err.contains("resolution 100 is not a multiple of 16") && !err.contains("Hub"),
        "{err}"
    );
}

#[test]
fn precompute_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let (ok, _, err) = microdit(&["precompute", "/no/such/folder", "--out", out]).split();
    assert!(!ok && err.contains("no such file or folder"), "{err}");

    let images = dir.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    image::RgbImage::new(300, 300)
        .save(images.join("a.png"))
        .unwrap();
    std::fs::write(images.join("a.txt"), "black").unwrap();
    let images = images.to_str().unwrap();
    // No weights here and no network: the error names the file and how to fetch it.
    let offline = [
        ("HF_HUB_OFFLINE", std::ffi::OsStr::new("1")),
        ("HF_HOME", dir.path().as_os_str()),
    ];
    let (ok, _, err) = microdit_env(&["precompute", images, "--out", out], &offline).split();
    assert!(
        !ok && err.contains("huggingface-cli download") && err.contains("config.json"),
        "{err}"
    );
    let (ok, _, err) = microdit(&[
        "precompute",
        images,
        "--out",
        out,
        "--worker",
        "2",
        "--workers",
        "2",
    ])
    .split();
    assert!(!ok && err.contains("must be below --workers"), "{err}");
    let (ok, _, err) = microdit(&["precompute", images, "--out", out, "--vae", "/no/vae"]).split();
    assert!(!ok && err.contains("loading the VAE"), "{err}");
}

#[test]
fn bench_names_each_network_and_keeps_the_old_names_hidden() {
    let (ok, out, _) = microdit(&["bench", "--help"]).split();
    for what in ["denoiser", "text", "vae", "encode", "eval"] {
        assert!(ok && out.contains(&format!("  {what} ")), "{what}:\n{out}");
    }
    for old in ["bench-text", "bench-vae", "bench-encode", "bench-eval"] {
        let (ok, _, err) = microdit(&[old, "--help"]).split();
        assert!(ok, "{old}: {err}");
    }
    let (_, top, _) = microdit(&["--help"]).split();
    assert!(!top.contains("bench-vae"), "{top}");
    let (ok, _, err) = microdit(&["bench", "vae", "--latent-size", "0"]).split();
    assert!(
        !ok && err.contains("--latent-size must be at least 1"),
        "{err}"
    );
    let (ok, _, err) = microdit(&["bench", "--batch", "0"]).split();
    assert!(
        !ok && err.contains("--batch, --iters and --caption-len"),
        "{err}"
    );
    let (ok, _, err) = microdit(&["plot", "/nonexistent-run"]).split();
    assert!(!ok && err.contains("metrics.jsonl"), "{err}");
}

#[test]
fn a_training_step_synchronises_with_the_host_only_for_the_figures_the_trainer_logs() {
    let set = &common::fixture_sets("dit")[0];
    let config = set.join("config.json");
    let (ok, out, err) = microdit(&[
        "bench",
        "--config",
        config.to_str().unwrap(),
        "--batch",
        "2",
        "--caption-len",
        "6",
        "--mask-ratios",
        "0.5",
        "--warmup",
        "0",
        "--iters",
        "2",
    ])
    .split();
    assert!(ok, "{err}");
    let syncs: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_suffix(" host synchronisations per step"))
        .map(str::trim)
        .collect();
    // The training step reads its loss and its gradient norm; a sampler step reads nothing.
    assert_eq!(syncs, ["2.0", "0.0"], "{out}");
}
