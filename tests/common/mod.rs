//! Fixture discovery and comparison helpers shared by the parity tests.
#![allow(dead_code)]

pub mod model;
pub mod random_weights;
pub mod training;

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};

/// `MICRODIT_FIXTURES`, or `../shared/fixtures` beside the project root.
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("MICRODIT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"))
}

/// Every fixture set whose `config.json` says `"kind": <kind>`, under `MICRODIT_FIXTURES`
/// and the sets this project makes itself (`tests/fixtures/*/`, each folder by its
/// `make.py`); panics when there is none, so that a missing fixtures directory fails
/// instead of passing vacuously.
pub fn fixture_sets(kind: &str) -> Vec<PathBuf> {
    let dir = fixtures_dir();
    let own = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let own_sets = std::fs::read_dir(&own)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .flat_map(|maker| std::fs::read_dir(maker).into_iter().flatten());
    let mut sets: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixtures directory {} unreadable: {e}", dir.display()))
        .chain(own_sets)
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            std::fs::read_to_string(p.join("config.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|v| v.get("kind").and_then(|k| k.as_str()) == Some(kind))
        })
        .collect();
    sets.sort();
    assert!(
        !sets.is_empty(),
        "no '{kind}' fixture sets under {} or {}",
        dir.display(),
        own.display()
    );
    sets
}

/// The tensors of a `cases.safetensors`, as f32 (or i64) host arrays.
pub struct Cases {
    pub tensors: BTreeMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Cases {
    pub fn open(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let data = view.data();
                let values: Vec<f64> = match view.dtype() {
                    Dtype::F32 => data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                        .collect(),
                    Dtype::I64 => data
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                        .collect(),
                    other => panic!("{name}: unsupported dtype {other:?}"),
                };
                (name, (view.shape().to_vec(), values))
            })
            .collect();
        Self { tensors }
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.get(name).0.clone()
    }

    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture tensor '{name}' missing"))
    }

    pub fn values(&self, name: &str) -> Vec<f32> {
        self.get(name).1.iter().map(|&v| v as f32).collect()
    }

    pub fn scalar(&self, name: &str) -> f64 {
        self.get(name).1[0]
    }

    pub fn tensor<B: Backend, const D: usize>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Tensor<B, D> {
        let (shape, _) = self.get(name);
        Tensor::<B, D>::from_data(TensorData::new(self.values(name), shape.clone()), device)
    }

    /// Caption embeddings are stored [B, 1, L, Cc]; the model takes [B, L, Cc].
    pub fn captions<B: Backend>(&self, name: &str, device: &B::Device) -> Tensor<B, 3> {
        let t: Tensor<B, 4> = self.tensor(name, device);
        let [b, _, l, c] = t.dims();
        t.reshape([b, l, c])
    }

    /// Names under `prefix.` (e.g. every `grad.*`), without the prefix.
    pub fn names_under(&self, prefix: &str) -> Vec<String> {
        let p = format!("{prefix}.");
        self.tensors
            .keys()
            .filter_map(|k| k.strip_prefix(&p).map(str::to_string))
            .collect()
    }
}

/// ‖ours − ref‖ / ‖ref‖ (absolute when the reference is exactly zero); NaN never passes.
pub fn rel_l2(ours: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(ours.len(), reference.len(), "length mismatch");
    let diff: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| ((*a as f64) - (*b as f64)).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = reference
        .iter()
        .map(|b| (*b as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let err = if norm > 0.0 { diff / norm } else { diff };
    if err.is_nan() {
        f64::INFINITY
    } else {
        err
    }
}

pub fn to_vec<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

#[track_caller]
pub fn assert_close(what: &str, ours: &[f32], reference: &[f32], tol: f64) {
    let err = rel_l2(ours, reference);
    // Shown with `--nocapture` (bench/gpu_check.sh reports the largest).
    eprintln!("{what}: relative L2 error {err:.2e} (tolerance {tol:.0e})");
    assert!(
        err < tol,
        "{what}: relative L2 error {err:e} exceeds {tol:e}"
    );
}

/// Every fixture directory that holds `file`.
pub fn fixture_dirs_with(file: &str) -> Vec<PathBuf> {
    let dir = fixtures_dir();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fixtures directory {} unreadable: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(file).exists())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no fixture set with {file} under {}",
        dir.display()
    );
    dirs
}

/// Every fixture set whose `config.json` has a top-level `key` (`"dit"`: a denoiser set).
pub fn fixture_sets_with_key(key: &str) -> Vec<PathBuf> {
    let sets: Vec<PathBuf> = fixture_dirs_with("config.json")
        .into_iter()
        .filter(|p| {
            std::fs::read_to_string(p.join("config.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .is_some_and(|v| v.get(key).is_some())
        })
        .collect();
    assert!(!sets.is_empty(), "no fixture set with a '{key}' config");
    sets
}

/// What a run of the `microdit` binary printed and how it ended.
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }

    /// (succeeded, standard output, standard error)
    pub fn split(self) -> (bool, String, String) {
        (self.ok(), self.stdout, self.stderr)
    }

    /// Standard output then standard error.
    pub fn log(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// `microdit ARGS…` as a user runs it, with extra environment variables.
pub fn microdit_env<S: AsRef<OsStr>>(args: &[S], env: &[(&str, &OsStr)]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_microdit"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("running microdit");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// `microdit ARGS…`.
pub fn microdit<S: AsRef<OsStr>>(args: &[S]) -> Run {
    microdit_env(args, &[])
}
