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
