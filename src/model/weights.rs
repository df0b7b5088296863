//! MicroDiT checkpoints: the reference `DiT` state dict in and out, its buffers, and
//! gradients read out by parameter name. Key names live in [`crate::state_dict`].

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::MicroditBackend;
use anyhow::{bail, Context, Result};
use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use burn_store::TensorSnapshot;

use super::dit::MicroDit;
use crate::state_dict::{
    apply_state_dict, check_fits, read_state_dict, reference_tensors, DIT_KEYS,
};

/// Buffers of the reference state dict: derived from the config here, checked on load.
const POS_EMBED: &str = "pos_embed";
const MASK_TOKEN: &str = "mask_token";

pub fn load_weights<B: MicroditBackend>(model: MicroDit<B>, path: &Path) -> Result<MicroDit<B>> {
    let tensors = read_state_dict(path)?;
    load_state_dict(model, tensors)
        .with_context(|| format!("loading weights from {}", path.display()))
}

/// Whether the weights at `path` were saved from a model of `model`'s architecture (names
/// and shapes only; nothing is loaded). A checkpoint's own record format cannot say so
/// itself: burn panics on a mismatch.
pub fn check_weights_fit<B: MicroditBackend>(model: &MicroDit<B>, path: &Path) -> Result<()> {
    let mut tensors = denoiser_part(read_state_dict(path)?);
    tensors.remove(POS_EMBED);
    tensors.remove(MASK_TOKEN);
    check_fits(model, &tensors, &DIT_KEYS)
        .with_context(|| format!("{} was saved from another architecture", path.display()))
}

pub fn load_state_dict<B: MicroditBackend>(
    model: MicroDit<B>,
    tensors: BTreeMap<String, TensorSnapshot>,
) -> Result<MicroDit<B>> {
    let mut tensors = denoiser_part(tensors);
    check_buffers(&model, &mut tensors)?;
    apply_state_dict(model, tensors, &DIT_KEYS)
}

/// A whole `LatentDiffusion` state dict holds the denoiser under `dit.` beside the VAE and
/// text encoder; a bare `DiT` state dict is all denoiser.
pub fn denoiser_part(
    tensors: BTreeMap<String, TensorSnapshot>,
) -> BTreeMap<String, TensorSnapshot> {
    if !tensors.keys().any(|k| k.starts_with("dit.")) {
        return tensors;
    }
    tensors
        .into_iter()
        .filter_map(|(k, mut t)| {
            let name = k.strip_prefix("dit.")?.to_string();
            t.path_stack = Some(name.split('.').map(str::to_string).collect());
            Some((name, t))
        })
        .collect()
}

/// `pos_embed` and `mask_token` are buffers: ours come from the config. A checkpoint whose
/// positions were made with another `pos_interp_scale` would silently shift every patch,
/// so that is an error; a checkpoint from another resolution (a new shape) is fine, since
/// moving from 256 to 512 px is how the recipe's later stages start.
fn check_buffers<B: MicroditBackend>(
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
pub fn save_weights<B: MicroditBackend>(model: &MicroDit<B>, path: &Path) -> Result<()> {
    let mut tensors = reference_tensors(model, &DIT_KEYS)?;
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

impl<B: MicroditBackend> ModuleMapper<B> for ToGradients<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = self
            .grads
            .get::<B, D>(id)
            .unwrap_or_else(|| tensor.zeros_like());
        Param::from_mapped_value(id, grad, mapper)
    }
}
