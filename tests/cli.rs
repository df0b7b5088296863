//! The `microdit` binary as a user runs it.

use std::process::Command;

fn microdit(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_microdit"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn info_reports_the_published_parameter_counts() {
    let (ok, out, _) = microdit(&["info", "--preset", "MicroDiT_XL_2"]);
    assert!(ok && out.contains("1165442320 parameters"), "{out}");
    let (ok, out, _) = microdit(&["info", "--preset", "MicroDiT_XL_2", "--in-channels", "16"]);
    assert!(ok && out.contains("1165540672 parameters"), "{out}");
    let (ok, out, _) = microdit(&["info", "--preset", "MicroDiT_Tiny_2", "--resolution", "512"]);
    assert!(
        ok && out.contains("200692752 parameters") && out.contains("1024 patches"),
        "{out}"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let (ok, _, err) = microdit(&["info", "--preset", "MicroDiT_L_2"]);
    assert!(
        !ok && err.contains("unknown preset 'MicroDiT_L_2'"),
        "{err}"
    );
    let (ok, _, err) = microdit(&["info", "--resolution", "300"]);
    assert!(
        !ok && err.contains("--resolution must be 256 or 512"),
        "{err}"
    );
    let (ok, _, err) = microdit(&["bench", "--device", "tpu"]);
    assert!(!ok && err.contains("unknown device 'tpu'"), "{err}");
}

/// `microdit ARGS…` with extra environment variables.
fn microdit_env(args: &[&str], env: &[(&str, &std::path::Path)]) -> (bool, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_microdit"));
    command.args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn precompute_refuses_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let out = out.to_str().unwrap();
    let (ok, _, err) = microdit(&["precompute", "/no/such/folder", "--out", out]);
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
        ("HF_HUB_OFFLINE", std::path::Path::new("1")),
        ("HF_HOME", dir.path()),
    ];
    let (ok, err) = microdit_env(&["precompute", images, "--out", out], &offline);
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
    ]);
    assert!(!ok && err.contains("must be below --workers"), "{err}");
    let (ok, _, err) = microdit(&["precompute", images, "--out", out, "--vae", "/no/vae"]);
    assert!(!ok && err.contains("loading the VAE"), "{err}");
}
