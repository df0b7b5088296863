//! MicroDiT checkpoints: the reference `DiT` state dict in and out, its buffers, and
//! gradients read out by parameter name. Key names live in [`crate::state_dict`].

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::MicroditBackend;
use std::cell::RefCell;
use std::rc::Rc;

use anyhow::{bail, ensure, Context, Result};
use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::DType;
use burn_store::{TensorSnapshot, TensorSnapshotError};

use super::config::DitConfig;
use super::dit::MicroDit;
use super::init::Init;
use crate::backend;
use crate::state_dict::{
    apply_state_dict, check_fits, read_state_dict, reference_snapshots, reference_tensors, DIT_KEYS,
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
    let patch_dim = model.final_layer.linear.d_out();
    tensors.insert(
        MASK_TOKEN.into(),
        TensorData::new(vec![0f32; patch_dim], [1, 1, patch_dim]),
    );
    crate::io::write_safetensors(path, &tensors)
}

/// A quantised state dict names the int8 form of a float weight `P` `P_int8.values` (int8
/// rows) and `P_int8.scales` (f32, one per row).
const INT8_VALUES: &str = "_int8.values";
const INT8_SCALES: &str = "_int8.scales";

/// The quantised model of `cfg` (the products [`Init::quantizable_linear`] and
/// [`Init::quantizable_stack`] make, in int8) from a float or an already quantised
/// denoiser state dict ([`denoiser_part`]). Float weights are quantised one at a time as they are applied, so memory holds
/// the int8 model and one float tensor at most.
pub fn load_quantized<B: MicroditBackend>(
    cfg: &DitConfig,
    tensors: BTreeMap<String, TensorSnapshot>,
    device: &B::Device,
) -> Result<MicroDit<B>> {
    let skeleton = MicroDit::new(cfg, &mut Init::empty_int8(device));
    let tensors = quantize_state_dict(&skeleton, tensors)?;
    load_state_dict(skeleton, tensors)
}

/// `model` (of `cfg`) quantised.
pub fn quantize<B: MicroditBackend>(model: &MicroDit<B>, cfg: &DitConfig) -> Result<MicroDit<B>> {
    let tensors = reference_snapshots(model, &DIT_KEYS)
        .into_iter()
        .map(|s| (s.full_path(), s))
        .collect();
    load_quantized(cfg, tensors, &model.pos_embed().device())
}

/// `tensors` with every int8 weight that `skeleton` holds and `tensors` has only in float
/// made from the float one, lazily; int8 weights already there are checked to lie in
/// [-127, 127] (the kernels' range) as they load.
fn quantize_state_dict<B: MicroditBackend>(
    skeleton: &MicroDit<B>,
    mut tensors: BTreeMap<String, TensorSnapshot>,
) -> Result<BTreeMap<String, TensorSnapshot>> {
    let int8_names: Vec<String> = reference_snapshots(skeleton, &DIT_KEYS)
        .iter()
        .map(TensorSnapshot::full_path)
        .filter(|name| name.ends_with(INT8_VALUES))
        .collect();
    for values_name in int8_names {
        let float_name = values_name.trim_end_matches(INT8_VALUES);
        let scales_name = format!("{float_name}{INT8_SCALES}");
        if let Some(values) = tensors.remove(&values_name) {
            tensors.insert(values_name.clone(), checked_int8(values, &values_name)?);
        } else if let Some(float) = tensors.remove(float_name) {
            let [values, scales] = quantized_snapshots(&float, &values_name, &scales_name)?;
            tensors.insert(values_name, values);
            tensors.insert(scales_name, scales);
        }
    }
    Ok(tensors)
}

/// The int8 rows and scales of a float weight, computed when read: a 2-D weight is a
/// PyTorch `Linear.weight` ([out, in]: its rows are the outputs already), a 3-D one a stack
/// of `x @ w` matrices ([n, in, out]: each matrix transposed into rows).
fn quantized_snapshots(
    float: &TensorSnapshot,
    values_name: &str,
    scales_name: &str,
) -> Result<[TensorSnapshot; 2]> {
    let shape = float.shape.to_vec();
    let (rows, k) = match shape[..] {
        [out, k] => (out, k),
        [n, k, out] => (n * out, k),
        _ => bail!("{values_name}: cannot quantise a weight of shape {shape:?}"),
    };
    let source = float.clone_data_fn();
    let quantized = move || -> Result<backend::int8::Int8Rows, TensorSnapshotError> {
        let data = source()?.convert::<f32>();
        let values = data
            .to_vec::<f32>()
            .map_err(|e| TensorSnapshotError::DataError(format!("{e:?}")))?;
        let rows_first = match shape[..] {
            [n, k, out] => stacked_rows(&values, n, k, out),
            _ => values,
        };
        Ok(backend::int8::quantize_rows(&rows_first, k))
    };
    // Whichever of the two is read first quantises (reading the float weight once) and
    // leaves the other's part here until it is read, right after, as the model's fields
    // come in order.
    let pending: Rc<RefCell<Option<backend::int8::Int8Rows>>> = Rc::default();
    let take = move || {
        let left = pending.borrow_mut().take();
        match left {
            Some(rows) => Ok(rows),
            None => {
                let rows = quantized()?;
                *pending.borrow_mut() = Some(rows.clone());
                Ok(rows)
            }
        }
    };
    let take = Rc::new(take);
    let (for_values, for_scales) = (take.clone(), take);
    Ok([
        snapshot(
            values_name,
            DType::I8,
            vec![rows, k],
            Rc::new(move || Ok(TensorData::new(for_values()?.values, [rows, k]))),
        ),
        snapshot(
            scales_name,
            DType::F32,
            vec![rows],
            Rc::new(move || Ok(TensorData::new(for_scales()?.scales, [rows]))),
        ),
    ])
}

/// `[n, k, out]` matrices as `n · out` rows of `k`.
fn stacked_rows(values: &[f32], n: usize, k: usize, out: usize) -> Vec<f32> {
    let mut rows = vec![0f32; values.len()];
    for e in 0..n {
        for i in 0..k {
            for o in 0..out {
                rows[(e * out + o) * k + i] = values[(e * k + i) * out + o];
            }
        }
    }
    rows
}

/// An int8 weight read from a file, refused when read if a value is -128 (the AVX2
/// kernel's sign trick needs |v| ≤ 127; microdit never writes it).
fn checked_int8(values: TensorSnapshot, name: &str) -> Result<TensorSnapshot> {
    ensure!(
        values.dtype == DType::I8,
        "{name} is {:?}; an int8 weight's values are I8",
        values.dtype
    );
    let (source, owned) = (values.clone_data_fn(), name.to_string());
    let checked = move || {
        let data = source()?;
        let bytes: &[i8] = data
            .as_slice()
            .map_err(|e| TensorSnapshotError::DataError(format!("{e:?}")))?;
        match bytes.contains(&i8::MIN) {
            true => Err(TensorSnapshotError::DataError(format!(
                "{owned} holds -128; int8 weights lie in [-127, 127]"
            ))),
            false => Ok(data),
        }
    };
    Ok(snapshot(
        name,
        DType::I8,
        values.shape.to_vec(),
        Rc::new(checked),
    ))
}

/// A tensor named `name` whose data comes from `data` when read.
fn snapshot(
    name: &str,
    dtype: DType,
    shape: Vec<usize>,
    data: Rc<dyn Fn() -> Result<TensorData, TensorSnapshotError>>,
) -> TensorSnapshot {
    TensorSnapshot::from_closure(
        data,
        dtype,
        shape.into(),
        name.split('.').map(str::to_string).collect(),
        Vec::new(),
        Default::default(),
    )
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
