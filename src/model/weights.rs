//! The one place that knows the reference checkpoints' key names and layouts.
//!
//! Our module paths follow the reference `state_dict()` except where PyTorch names
//! `nn.Sequential` children by index; those few are rewritten here, both ways. Linear
//! weights are stored transposed in burn ([in, out]); burn-store's PyTorch adapters
//! transpose them and rename LayerNorm's `gamma` to `weight`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{
    BurnToPyTorchAdapter, KeyRemapper, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter,
    SafetensorsStore, TensorSnapshot,
};

use super::dit::MicroDit;

/// Reference key pattern -> our module path.
const FROM_REFERENCE: [(&str, &str); 7] = [
    (r"^x_embedder\.proj\.", "x_embedder."),
    (r"^t_embedder\.mlp\.0\.", "t_embedder.mlp_in."),
    (r"^t_embedder\.mlp\.2\.", "t_embedder.mlp_out."),
    (r"^y_embedder\.y_proj\.", "y_embedder."),
    (r"adaLN_modulation\.1\.", "ada_ln_modulation."),
    (r"^(patch_mixer_map_[a-z]+)\.0\.", "$1.norm."),
    (r"^(patch_mixer_map_[a-z]+)\.1\.", "$1.linear."),
];

/// Our module path -> reference key: the inverse of [`FROM_REFERENCE`].
const TO_REFERENCE: [(&str, &str); 7] = [
    (r"^x_embedder\.", "x_embedder.proj."),
    (r"^t_embedder\.mlp_in\.", "t_embedder.mlp.0."),
    (r"^t_embedder\.mlp_out\.", "t_embedder.mlp.2."),
    (r"^y_embedder\.", "y_embedder.y_proj."),
    (r"ada_ln_modulation\.", "adaLN_modulation.1."),
    (r"^(patch_mixer_map_[a-z]+)\.norm\.", "$1.0."),
    (r"^(patch_mixer_map_[a-z]+)\.linear\.", "$1.1."),
];

/// Buffers of the reference state dict: derived from the config here, checked on load.
const POS_EMBED: &str = "pos_embed";
const MASK_TOKEN: &str = "mask_token";

fn remapper(table: &[(&str, &str)]) -> KeyRemapper {
    KeyRemapper::from_patterns(table.to_vec()).expect("key tables are valid regexes")
}

/// The model's parameters as the reference names and lays them out (lazy: no copies until
/// `to_data`).
pub fn reference_snapshots<B: Backend, M: ModuleSnapshot<B>>(model: &M) -> Vec<TensorSnapshot> {
    let snapshots = model.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true);
    remapper(&TO_REFERENCE).remap(snapshots).0
}

/// Parameter name -> tensor in reference layout.
pub fn reference_tensors<B: Backend, M: ModuleSnapshot<B>>(
    model: &M,
) -> Result<BTreeMap<String, TensorData>> {
    reference_snapshots(model)
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
        "safetensors" => SafetensorsStore::from_file(path)
            .get_all_snapshots()
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?
            .clone(),
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

/// Loads reference weights into `model`, which must have been built from the matching
/// config. Fails naming every missing, unexpected or wrongly shaped tensor.
pub fn load_weights<B: Backend>(model: MicroDit<B>, path: &Path) -> Result<MicroDit<B>> {
    let tensors = read_state_dict(path)?;
    load_state_dict(model, tensors)
        .with_context(|| format!("loading weights from {}", path.display()))
}

pub fn load_state_dict<B: Backend>(
    mut model: MicroDit<B>,
    mut tensors: BTreeMap<String, TensorSnapshot>,
) -> Result<MicroDit<B>> {
    check_buffers(&model, &mut tensors)?;
    let expected: BTreeMap<String, Vec<usize>> = reference_snapshots(&model)
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
    let snapshots = tensors.into_values().map(as_f32).collect();
    let (snapshots, _) = remapper(&FROM_REFERENCE).remap(snapshots);
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

/// Checkpoints may be stored in half precision; the model computes in f32.
fn as_f32(snapshot: TensorSnapshot) -> TensorSnapshot {
    if snapshot.dtype == DType::F32 {
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

/// `pos_embed` and `mask_token` are buffers: ours come from the config. A checkpoint whose
/// positions were made with another `pos_interp_scale` would silently shift every patch,
/// so that is an error; a checkpoint from another resolution (a new shape) is fine, since
/// moving from 256 to 512 px is how the recipe's later stages start.
fn check_buffers<B: Backend>(
    model: &MicroDit<B>,
    tensors: &mut BTreeMap<String, TensorSnapshot>,
) -> Result<()> {
    tensors.remove(MASK_TOKEN);
    let Some(pos) = tensors.remove(POS_EMBED) else {
        return Ok(());
    };
    let ours = model.pos_embed();
    if pos.shape.to_vec() != ours.dims().to_vec() {
        return Ok(());
    }
    let theirs: Vec<f32> = pos
        .to_data()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?
        .convert::<f32>()
        .to_vec()?;
    let ours: Vec<f32> = ours.into_data().convert::<f32>().to_vec()?;
    let max_diff = theirs
        .iter()
        .zip(&ours)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    if max_diff > 1e-3 {
        bail!(
            "the checkpoint's positional embedding differs from this config's by up to {max_diff}: \
             was it trained with another pos_interp_scale (1.0 for 256 px, 2.0 for 512 px)?"
        );
    }
    Ok(())
}

/// Writes the model as a reference-named safetensors state dict (buffers included, so the
/// reference `load_state_dict` takes it as is), atomically.
pub fn save_weights<B: Backend>(model: &MicroDit<B>, path: &Path) -> Result<()> {
    let mut tensors = reference_tensors(model)?;
    tensors.insert(
        POS_EMBED.into(),
        model.pos_embed().into_data().convert::<f32>(),
    );
    let patch_dim = model.final_layer.linear.weight.dims()[1];
    tensors.insert(
        MASK_TOKEN.into(),
        TensorData::new(vec![0f32; patch_dim], [1, 1, patch_dim]),
    );
    crate::io::write_safetensors(path, &tensors)
}

/// Replaces every parameter by its gradient (zeros where it has none), so that gradients
/// can be read out by the same names and layouts as the weights.
pub struct ToGradients<'a> {
    pub grads: &'a burn::optim::GradientsParams,
}

impl<B: Backend> ModuleMapper<B> for ToGradients<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = self
            .grads
            .get::<B, D>(id)
            .unwrap_or_else(|| tensor.zeros_like());
        Param::from_mapped_value(id, grad, mapper)
    }
}
