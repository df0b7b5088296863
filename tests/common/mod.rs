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

/// The folders fixture sets are found in: the project's own (`tests/fixtures`, each
/// folder below it written by its `make.py`; absent where a test binary runs away from its
/// checkout), then `MICRODIT_FIXTURES` (folders separated by `:`; set and empty, none), or
/// else `../shared/fixtures` beside the project root where it exists.
pub fn fixture_roots() -> Vec<PathBuf> {
    let project = Path::new(env!("CARGO_MANIFEST_DIR"));
    let extra: Vec<PathBuf> = match std::env::var_os("MICRODIT_FIXTURES") {
        Some(list) => std::env::split_paths(&list)
            .filter(|p| !p.as_os_str().is_empty())
            .collect(),
        None => Some(project.join("../shared/fixtures"))
            .filter(|p| p.is_dir())
            .into_iter()
            .collect(),
    };
    Some(project.join("tests/fixtures"))
        .filter(|p| p.is_dir())
        .into_iter()
        .chain(extra)
        .collect()
}

/// Sets written before their `config.json` named a kind are known by a file of their layout
/// (`../shared/fixtures/README.md`).
const KIND_BY_LAYOUT: [(&str, &str); 4] = [
    ("diffusion_pytorch_model.safetensors", "vae"),
    ("open_clip_config.json", "clip-text"),
    ("expected.json", "mds"),
    ("cases.json", "tokenizer"),
];

/// What a fixture set holds: its `config.json`'s `"kind"`, or the kind its layout shows.
fn kind_of(dir: &Path) -> Option<String> {
    let config = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    if let Some(kind) = config.as_ref().and_then(|c| c.get("kind")) {
        return kind.as_str().map(str::to_string);
    }
    KIND_BY_LAYOUT
        .iter()
        .find(|(file, _)| dir.join(file).is_file())
        .map(|(_, kind)| kind.to_string())
}

/// Folders directly under `dir`, sorted.
fn subfolders(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("fixtures directory {} unreadable: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

/// Every fixture set of `kind` under [`fixture_roots`]: a root's folders and, a level down,
/// the sets each maker's folder holds. Panics when there is none, so that a kind without
/// sets fails instead of passing vacuously.
pub fn fixture_sets(kind: &str) -> Vec<PathBuf> {
    let roots = fixture_roots();
    let sets: Vec<PathBuf> = roots
        .iter()
        .flat_map(|root| subfolders(root))
        .flat_map(|dir| {
            let below = if kind_of(&dir).is_none() {
                subfolders(&dir)
            } else {
                Vec::new()
            };
            std::iter::once(dir).chain(below)
        })
        .filter(|dir| kind_of(dir).as_deref() == Some(kind))
        .collect();
    assert!(
        !sets.is_empty(),
        "no '{kind}' fixture sets under {}",
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
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
/// Decoded pixels of a PNG file's bytes.
pub fn png_pixels(png: &[u8]) -> Vec<u8> {
    let mut reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut buf).unwrap();
    buf
}

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
