//! Reference state dicts: reading them (`.safetensors`, `torch.save`d `.pt`/`.bin`), and
//! the one place that knows how reference key names map to our module paths.
//!
//! Our module paths follow each reference `state_dict()` except where PyTorch names
//! `nn.Sequential` children by index or packs a layer's weights into a bare tensor; those
//! few are rewritten by the tables below, both ways. burn stores linear weights transposed
//! ([in, out]); burn-store's PyTorch adapters transpose them and rename norm `gamma`/`beta`
//! to `weight`/`bias`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{
    BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, PyTorchToBurnAdapter, TensorSnapshot,
    TensorSnapshotError,
};

/// How one family of reference checkpoints names things: (reference pattern, our path)
/// pairs for loading, and the inverse pairs for saving and for naming gradients.
pub struct KeyMap {
    pub from_reference: &'static [(&'static str, &'static str)],
    pub to_reference: &'static [(&'static str, &'static str)],
}

/// The MicroDiT `DiT` state dict.
pub const DIT_KEYS: KeyMap = KeyMap {
    from_reference: &[
        (r"^x_embedder\.proj\.", "x_embedder."),
        (r"^t_embedder\.mlp\.0\.", "t_embedder.mlp_in."),
        (r"^t_embedder\.mlp\.2\.", "t_embedder.mlp_out."),
        (r"^y_embedder\.y_proj\.", "y_embedder."),
        (r"adaLN_modulation\.1\.", "ada_ln_modulation."),
        (r"^(patch_mixer_map_[a-z]+)\.0\.", "$1.norm."),
        (r"^(patch_mixer_map_[a-z]+)\.1\.", "$1.linear."),
    ],
    to_reference: &[
        (r"^x_embedder\.", "x_embedder.proj."),
        (r"^t_embedder\.mlp_in\.", "t_embedder.mlp.0."),
        (r"^t_embedder\.mlp_out\.", "t_embedder.mlp.2."),
        (r"^y_embedder\.", "y_embedder.y_proj."),
        (r"ada_ln_modulation\.", "adaLN_modulation.1."),
        (r"^(patch_mixer_map_[a-z]+)\.norm\.", "$1.0."),
        (r"^(patch_mixer_map_[a-z]+)\.linear\.", "$1.1."),
    ],
};

/// An open_clip CLIP state dict's text tower (`nn.MultiheadAttention` packs q/k/v into one
/// bare `in_proj_weight`; here it is a linear layer).
pub const CLIP_TEXT_KEYS: KeyMap = KeyMap {
    from_reference: &[(r"\.attn\.in_proj_(weight|bias)$", ".attn.in_proj.$1")],
    to_reference: &[(r"\.attn\.in_proj\.(weight|bias)$", ".attn.in_proj_$1")],
};

/// An open_clip CLIP state dict's vision tower (`visual.*`, q/k/v packed as in the text
/// tower).
pub const CLIP_VISION_KEYS: KeyMap = KeyMap {
    from_reference: &[
        (r"^visual\.", ""),
        (r"\.attn\.in_proj_(weight|bias)$", ".attn.in_proj.$1"),
    ],
    to_reference: &[
        (r"\.attn\.in_proj\.(weight|bias)$", ".attn.in_proj_$1"),
        (r"^", "visual."),
    ],
};

/// diffusers' `AutoencoderKL` (`to_out` is an `nn.ModuleList` of linear + dropout).
pub const VAE_KEYS: KeyMap = KeyMap {
    from_reference: &[(r"\.to_out\.0\.", ".to_out.")],
    to_reference: &[(r"\.to_out\.", ".to_out.0.")],
};

/// Older diffusers VAE checkpoints name the mid-block attention `query`/`key`/`value`/
/// `proj_attn`; diffusers renames them on load, and so do we.
pub const VAE_LEGACY_KEYS: [(&str, &str); 4] = [
    (r"\.attentions\.(\d+)\.query\.", ".attentions.$1.to_q."),
    (r"\.attentions\.(\d+)\.key\.", ".attentions.$1.to_k."),
    (r"\.attentions\.(\d+)\.value\.", ".attentions.$1.to_v."),
    (
        r"\.attentions\.(\d+)\.proj_attn\.",
        ".attentions.$1.to_out.0.",
    ),
];

/// Renames the keys of a state dict by `table` (reference-side names only).
pub fn upgrade_keys(
    tensors: BTreeMap<String, TensorSnapshot>,
    table: &[(&str, &str)],
) -> BTreeMap<String, TensorSnapshot> {
    let (snapshots, _) = remapper(table).remap(tensors.into_values().collect());
    snapshots.into_iter().map(|s| (s.full_path(), s)).collect()
}

fn remapper(table: &[(&str, &str)]) -> KeyRemapper {
    KeyRemapper::from_patterns(table.to_vec()).expect("key tables are valid regexes")
}

/// The model's parameters as the reference names and lays them out (lazy: no copies until
/// `to_data`).
pub fn reference_snapshots<B: Backend, M: ModuleSnapshot<B>>(
    model: &M,
    keys: &KeyMap,
) -> Vec<TensorSnapshot> {
    let snapshots = model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true);
    remapper(keys.to_reference).remap(snapshots).0
}

/// Parameter name -> tensor in reference layout.
pub fn reference_tensors<B: Backend, M: ModuleSnapshot<B>>(
    model: &M,
    keys: &KeyMap,
) -> Result<BTreeMap<String, TensorData>> {
    reference_snapshots(model, keys)
        .into_iter()
        .map(|s| {
            Ok((
                s.full_path(),
                s.to_data().map_err(|e| anyhow::anyhow!("{e:?}"))?,
            ))
        })
        .collect()
}

/// A checkpoint's tensors by reference name, from `.safetensors` or a `torch.save`d `.pt`/`.pth`
/// state dict (optionally nested under "state_dict", "model" or "ema").
pub fn read_state_dict(path: &Path) -> Result<BTreeMap<String, TensorSnapshot>> {
    if !path.exists() {
        bail!("checkpoint {} does not exist", path.display());
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let tensors: BTreeMap<String, TensorSnapshot> = match ext {
        "safetensors" => {
            read_safetensors(path).with_context(|| format!("reading {}", path.display()))?
        }
        "pt" | "pth" | "bin" | "ckpt" => burn_store::pytorch::PytorchReader::new(path)
            .map_err(|e| anyhow::anyhow!("reading PyTorch checkpoint {}: {e}", path.display()))?
            .into_tensors()
            .into_iter()
            .collect(),
        _ => bail!(
            "{}: unknown checkpoint format (expected .safetensors, .pt or .pth)",
            path.display()
        ),
    };
    // The tensor's path is what names it when applied to the model: make it the key.
    let tensors = strip_wrapper_prefix(tensors)
        .into_iter()
        .map(|(name, mut t)| {
            t.path_stack = Some(name.split('.').map(str::to_string).collect());
            (name, t)
        })
        .collect();
    Ok(tensors)
}

/// A safetensors file's tensors, each read from the file when it is applied (positioned
/// reads, not a map: a mapped file's pages count in the process's resident memory for as
/// long as the map lives, so loading a 4.7 GB checkpoint through one would add up to 4.7 GB
/// to the peak of the model it fills).
fn read_safetensors(path: &Path) -> Result<BTreeMap<String, TensorSnapshot>> {
    let mut file = File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).context("no safetensors header")?;
    let header_len = usize::try_from(u64::from_le_bytes(len))?;
    ensure!(
        header_len <= MAX_SAFETENSORS_HEADER,
        "a safetensors header of {header_len} bytes (not a safetensors file?)"
    );
    let mut header = vec![0u8; header_len];
    file.read_exact(&mut header)
        .context("the safetensors header is cut short")?;
    let metadata: safetensors::tensor::Metadata =
        serde_json::from_slice(&header).context("the safetensors header")?;
    let data_start = 8 + header_len as u64;
    let file_len = file.metadata()?.len();
    let path: Arc<Path> = path.into();
    let mut tensors = BTreeMap::new();
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        let elements: usize = info.shape.iter().product();
        ensure!(
            end.checked_sub(start) == Some(elements * info.dtype.bitsize() / 8)
                && data_start + end as u64 <= file_len,
            "{name}: its bytes ({start}..{end}) do not hold {:?} {:?} within the file",
            info.dtype,
            info.shape
        );
        let dtype = burn_dtype(info.dtype).with_context(|| name.clone())?;
        let (path, shape) = (path.clone(), info.shape.clone());
        let data = move || -> Result<TensorData, TensorSnapshotError> {
            let read = |into: &mut [u8]| -> std::io::Result<()> {
                let mut file = File::open(&path)?;
                file.seek(SeekFrom::Start(data_start + start as u64))?;
                file.read_exact(into)
            };
            read_tensor(dtype, elements, shape.clone(), read)
                .map_err(|e| TensorSnapshotError::IoError(e.to_string()))
        };
        let snapshot = TensorSnapshot::from_closure(
            Rc::new(data),
            dtype,
            info.shape.clone().into(),
            name.split('.').map(str::to_string).collect(),
            Vec::new(),
            Default::default(),
        );
        tensors.insert(name, snapshot);
    }
    Ok(tensors)
}

/// A tensor of `elements` values of `dtype` whose little-endian bytes `read` fills. f32 and
/// int8 data are read straight into the vector the tensor keeps; other types' bytes are
/// copied once more into an aligned buffer (burn's `from_bytes_vec`), which only rarely
/// matters since such floats are converted to f32 anyway.
fn read_tensor(
    dtype: DType,
    elements: usize,
    shape: Vec<usize>,
    read: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
) -> std::io::Result<TensorData> {
    fn read_values<E: burn::tensor::Element + Default>(
        elements: usize,
        shape: Vec<usize>,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<TensorData> {
        let mut values = vec![E::default(); elements];
        // SAFETY: E is f32 or i8 here: every byte pattern is a value, and the slice covers
        // exactly the vector's initialised elements.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                values.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(values.as_slice()),
            )
        };
        read(bytes)?;
        Ok(TensorData::new(values, shape))
    }
    #[cfg(target_endian = "big")]
    compile_error!("safetensors data are little-endian; reading them assumes a little-endian host");
    match dtype {
        DType::F32 => read_values::<f32>(elements, shape, read),
        DType::I8 => read_values::<i8>(elements, shape, read),
        _ => {
            let mut bytes = vec![0u8; elements * dtype.size()];
            read(&mut bytes)?;
            Ok(TensorData::from_bytes_vec(bytes, shape, dtype))
        }
    }
}

/// The safetensors format's own bound on its header (100 MB).
const MAX_SAFETENSORS_HEADER: usize = 100_000_000;

/// burn's element type for a safetensors one.
fn burn_dtype(dtype: safetensors::Dtype) -> Result<DType> {
    use safetensors::Dtype as S;
    Ok(match dtype {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::I16 => DType::I16,
        S::I8 => DType::I8,
        S::U64 => DType::U64,
        S::U32 => DType::U32,
        S::U16 => DType::U16,
        S::U8 => DType::U8,
        S::BOOL => DType::Bool(burn::tensor::BoolStore::Native),
        other => bail!("safetensors element type {other:?} is not supported"),
    })
}

/// Training frameworks save `model.`/`dit.`/`module.`-prefixed keys; the state dict is what
/// follows the prefix.
fn strip_wrapper_prefix(
    tensors: BTreeMap<String, TensorSnapshot>,
) -> BTreeMap<String, TensorSnapshot> {
    for prefix in ["module.", "model.", "dit.", "state_dict."] {
        if !tensors.is_empty() && tensors.keys().all(|k| k.starts_with(prefix)) {
            let stripped = tensors
                .into_iter()
                .map(|(k, v)| (k[prefix.len()..].to_string(), v))
                .collect();
            return strip_wrapper_prefix(stripped);
        }
    }
    tensors
}

/// Loads reference-named `tensors` into `model`, after [`check_fits`]. Tensors are read
/// only here, one at a time, so a file that holds more than the model (a CLIP file's vision
/// tower) costs no memory for the rest: pass only the wanted names.
pub fn apply_state_dict<B: Backend, M: ModuleSnapshot<B>>(
    mut model: M,
    tensors: BTreeMap<String, TensorSnapshot>,
    keys: &KeyMap,
) -> Result<M> {
    check_fits(&model, &tensors, keys)?;
    let snapshots = tensors.into_values().map(as_f32).collect();
    let (snapshots, _) = remapper(keys.from_reference).remap(snapshots);
    let result = model.apply(snapshots, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    if !result.errors.is_empty() || !result.missing.is_empty() {
        bail!(
            "applying weights failed: {:?} missing: {:?}",
            result.errors,
            result.missing
        );
    }
    Ok(model)
}

/// Whether reference-named `tensors` fit `model`, which must have been built from the
/// matching config: fails naming every missing, unexpected or wrongly shaped tensor at
/// once. Reads only names and shapes.
pub fn check_fits<B: Backend, M: ModuleSnapshot<B>>(
    model: &M,
    tensors: &BTreeMap<String, TensorSnapshot>,
    keys: &KeyMap,
) -> Result<()> {
    let expected: BTreeMap<String, Vec<usize>> = reference_snapshots(model, keys)
        .into_iter()
        .map(|s| (s.full_path(), s.shape.to_vec()))
        .collect();
    let mut problems = Vec::new();
    for (name, shape) in &expected {
        match tensors.get(name) {
            None => problems.push(format!("missing tensor '{name}' {shape:?}")),
            Some(t) if t.shape.to_vec() != *shape => problems.push(format!(
                "tensor '{name}' has shape {:?}, the model expects {shape:?}",
                t.shape.to_vec()
            )),
            Some(_) => {}
        }
    }
    problems.extend(
        tensors
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .map(|k| format!("unexpected tensor '{k}'")),
    );
    if !problems.is_empty() {
        bail!(
            "the checkpoint does not fit this model configuration ({} problems):\n  {}",
            problems.len(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Checkpoints may be stored in half precision; the model computes in f32. Integer tensors
/// (a quantised model's int8 weights) stay as they are.
fn as_f32(snapshot: TensorSnapshot) -> TensorSnapshot {
    if snapshot.dtype == DType::F32 || !snapshot.dtype.is_float() {
        return snapshot;
    }
    let source = snapshot.clone_data_fn();
    TensorSnapshot::from_closure(
        std::rc::Rc::new(move || Ok(source()?.convert::<f32>())),
        DType::F32,
        snapshot.shape.clone(),
        snapshot.path_stack.clone().unwrap_or_default(),
        snapshot.container_stack.clone().unwrap_or_default(),
        snapshot.tensor_id.unwrap_or_default(),
    )
}
