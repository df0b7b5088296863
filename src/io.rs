//! Files: output that never leaves a half-written file behind (write a temporary file in
//! the same directory, flush it to disk, then rename it over the destination), and JSON
//! input whose errors name the file and what it should have been.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use burn::tensor::{DType, TensorData};
use safetensors::tensor::{Dtype, TensorView};

/// Reads `path` as JSON; a file that does not parse is reported as "PATH: not WHAT".
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not {what}", path.display()))
}

pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating directory {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        write(&mut file)?;
        file.flush()?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Writes `value` as pretty-printed JSON (atomically), ending in a newline.
pub fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .with_context(|| format!("encoding {} as JSON", path.display()))?;
    text.push('\n');
    write_atomic(path, |f| f.write_all(text.as_bytes()))
}

/// Writes f32/i64 tensors as a safetensors file (atomically).
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, TensorData>) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, data)| {
            let dtype = match data.dtype {
                DType::F32 => Dtype::F32,
                DType::F16 => Dtype::F16,
                DType::BF16 => Dtype::BF16,
                DType::I64 => Dtype::I64,
                DType::I8 => Dtype::I8,
                other => anyhow::bail!("cannot store {name} of dtype {other:?}"),
            };
            let view = TensorView::new(dtype, data.shape.to_vec(), data.as_bytes())
                .with_context(|| format!("tensor {name}"))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(views, None)?;
    write_atomic(path, |f| f.write_all(&bytes))
}
