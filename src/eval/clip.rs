//! CLIP score (Hessel et al. 2021) as torchmetrics computes it, with an OpenCLIP model:
//!
//!   CLIPScore = max(mean over pairs of 100 · cos(E_image, E_caption), 0)
//!
//! E_image is open_clip's `encode_image` (a ViT: patch convolution, class token, pre-LN
//! transformer, `ln_post` of the class token, projection), E_caption its `encode_text` (our
//! text tower, the end token's state, `text_projection`). Images are preprocessed as
//! open_clip's eval transform does: bicubic resize (Pillow's), centre crop or squash,
//! `ToTensor`, `Normalize(mean, std)`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::LayerNorm;
use burn::prelude::*;
use image::RgbImage;
use serde::Deserialize;

use crate::backend::MicroditBackend;
use crate::data::preprocess::{resize_bicubic, resize_center_crop};
use crate::hub::Hub;
use crate::state_dict::{apply_state_dict, read_state_dict, CLIP_VISION_KEYS};
use crate::text::clip::{clip_layer_norm, ClipTransformer};
use crate::text::open_clip_config::{check_options, OpenClipConfig};
use crate::text::{ClipTextConfig, TextEncoder};

/// OpenAI's CLIP image normalisation, open_clip's default (its constants as written).
#[allow(clippy::excessive_precision)]
const OPENAI_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
#[allow(clippy::excessive_precision)]
const OPENAI_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The vision half of an `open_clip_config.json`, and the shared embedding size.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipVisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub mlp_ratio: f64,
    pub quick_gelu: bool,
    pub embed_dim: usize,
}

impl ClipVisionConfig {
    /// OpenAI's ViT-L/14 (torchmetrics' default CLIP-score model).
    pub fn vit_l_14() -> Self {
        Self {
            image_size: 224,
            patch_size: 14,
            width: 1024,
            heads: 16,
            layers: 24,
            mlp_ratio: 4.0,
            quick_gelu: true,
            embed_dim: 768,
        }
    }

    /// `apple/DFN5B-CLIP-ViT-H-14-378`'s vision tower.
    pub fn dfn5b_vit_h_14_378() -> Self {
        Self {
            image_size: 378,
            patch_size: 14,
            width: 1280,
            heads: 16,
            layers: 32,
            mlp_ratio: 4.0,
            quick_gelu: true,
            embed_dim: 1024,
        }
    }
}

/// open_clip's eval transform.
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    pub size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// `shortest` (resize the short side, centre crop) or `squash` (resize to a square).
    pub squash: bool,
}

#[derive(Deserialize)]
struct VisionCfg {
    #[serde(default = "default_image_size")]
    image_size: usize,
    patch_size: usize,
    width: usize,
    layers: usize,
    #[serde(default = "default_head_width")]
    head_width: usize,
    #[serde(default = "default_mlp_ratio")]
    mlp_ratio: f64,
    /// Every other key, checked against the variants this tower implements.
    #[serde(flatten)]
    other: serde_json::Map<String, serde_json::Value>,
}

fn default_image_size() -> usize {
    224
}
fn default_head_width() -> usize {
    64
}
fn default_mlp_ratio() -> f64 {
    4.0
}

/// Options open_clip's plain ViT leaves at these values; anything else is a variant
/// (attention pooling, layer scale, timm trunks…) this tower does not implement.
const VISION_DEFAULTS: &[(&str, &str)] = &[
    ("ls_init_value", "null"),
    ("attentional_pool", "false"),
    ("no_ln_pre", "false"),
    ("pos_embed_type", "\"learnable\""),
    ("final_ln_after_pool", "false"),
    ("pool_type", "\"tok\""),
    ("output_tokens", "false"),
    ("timm_model_name", "null"),
    ("block_type", "null"),
    ("qk_norm", "false"),
    ("scaled_cosine_attn", "false"),
    ("scale_heads", "false"),
    ("scale_attn_inner", "false"),
    ("scale_attn", "false"),
    ("scale_fc", "false"),
];
/// Training-only options, irrelevant to inference.
const VISION_IGNORED: &[&str] = &["patch_dropout", "attn_pooler_queries", "attn_pooler_heads"];
/// Reads the vision tower's config and the eval preprocessing from `open_clip_config.json`.
pub fn read_config(path: &Path) -> Result<(ClipVisionConfig, Preprocess)> {
    vision_config(&OpenClipConfig::read(path)?).with_context(|| format!("in {}", path.display()))
}

fn vision_config(cfg: &OpenClipConfig) -> Result<(ClipVisionConfig, Preprocess)> {
    let m = &cfg.model_cfg;
    let embed_dim = m.embed_dim.context("model_cfg has no embed_dim")?;
    let vision = m
        .vision_cfg
        .clone()
        .context("model_cfg has no vision_cfg")?;
    let v = VisionCfg::deserialize(serde_json::Value::Object(vision))
        .context("model_cfg.vision_cfg")?;
    check_options("vision_cfg", &v.other, VISION_DEFAULTS, VISION_IGNORED, &[])?;
    // The text tower the score's captions go through must be one microdit runs.
    ClipTextConfig::from_config(cfg)?;
    ensure!(
        v.head_width > 0 && v.width.is_multiple_of(v.head_width),
        "vision width {} is not a multiple of head_width {}",
        v.width,
        v.head_width
    );
    ensure!(
        v.patch_size > 0 && v.image_size.is_multiple_of(v.patch_size),
        "image_size {} is not a multiple of patch_size {}",
        v.image_size,
        v.patch_size
    );
    let p = &cfg.preprocess_cfg;
    if let Some(i) = p.interpolation.as_deref().filter(|&i| i != "bicubic") {
        bail!("preprocess_cfg interpolation '{i}' is not supported (only bicubic)");
    }
    let squash = match p.resize_mode.as_deref().unwrap_or("shortest") {
        "shortest" => false,
        "squash" => true,
        other => bail!("preprocess_cfg resize_mode '{other}' is not supported (shortest, squash)"),
    };
    Ok((
        ClipVisionConfig {
            image_size: v.image_size,
            patch_size: v.patch_size,
            width: v.width,
            heads: v.width / v.head_width,
            layers: v.layers,
            mlp_ratio: v.mlp_ratio,
            quick_gelu: m.quick_gelu,
            embed_dim,
        },
        Preprocess {
            size: v.image_size,
            mean: p.mean.unwrap_or(OPENAI_MEAN),
            std: p.std.unwrap_or(OPENAI_STD),
            squash,
        },
    ))
}

impl Preprocess {
    /// [3, size, size] planes.
    pub fn apply(&self, image: &RgbImage) -> Result<Vec<f32>> {
        let s = self.size;
        let resized = if self.squash {
            if (image.width() as usize, image.height() as usize) == (s, s) {
                image.clone()
            } else {
                ensure!(image.width() > 0 && image.height() > 0, "an empty image");
                resize_bicubic(image, s, s)
            }
        } else {
            resize_center_crop(image, s)?
        };
        let mut out = vec![0f32; 3 * s * s];
        for (i, pixel) in resized.pixels().enumerate() {
            for c in 0..3 {
                out[c * s * s + i] = (pixel.0[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        Ok(out)
    }
}

/// open_clip's `VisionTransformer` (plain ViT, class-token pooling).
#[derive(Module, Debug)]
pub struct ClipVisionEncoder<B: MicroditBackend> {
    pub conv1: Conv2d<B>,
    pub class_embedding: Param<Tensor<B, 1>>,
    pub positional_embedding: Param<Tensor<B, 2>>,
    pub ln_pre: LayerNorm<B>,
    pub transformer: ClipTransformer<B>,
    pub ln_post: LayerNorm<B>,
    pub proj: Param<Tensor<B, 2>>,
}

impl<B: MicroditBackend> ClipVisionEncoder<B> {
    /// Zero-initialised structure, for weights that are about to be loaded.
    pub fn new(cfg: &ClipVisionConfig, device: &B::Device) -> Self {
        let (w, p) = (cfg.width, cfg.patch_size);
        let grid = cfg.image_size / p;
        Self {
            conv1: Conv2dConfig::new([3, w], [p, p])
                .with_stride([p, p])
                .with_bias(false)
                .init(device),
            class_embedding: Param::from_tensor(Tensor::zeros([w], device)),
            positional_embedding: Param::from_tensor(Tensor::zeros([grid * grid + 1, w], device)),
            ln_pre: clip_layer_norm(w, device),
            transformer: ClipTransformer::new(
                w,
                cfg.heads,
                cfg.layers,
                cfg.mlp_ratio,
                cfg.quick_gelu,
                device,
            ),
            ln_post: clip_layer_norm(w, device),
            proj: Param::from_tensor(Tensor::zeros([w, cfg.embed_dim], device)),
        }
    }

    /// The `visual.*` tensors of an open_clip state dict.
    pub fn load(cfg: &ClipVisionConfig, weights: &Path, device: &B::Device) -> Result<Self> {
        let visual: BTreeMap<_, _> = read_state_dict(weights)?
            .into_iter()
            .filter(|(name, _)| name.starts_with("visual."))
            .collect();
        apply_state_dict(Self::new(cfg, device), visual, &CLIP_VISION_KEYS)
            .with_context(|| format!("loading the vision tower from {}", weights.display()))
    }

    /// Preprocessed images [N, 3, S, S] -> image embeddings [N, embed_dim].
    pub fn forward(&self, pixels: Tensor<B, 4>) -> Tensor<B, 2> {
        let n = pixels.dims()[0];
        let patches = self.conv1.forward(pixels);
        let [_, w, gh, gw] = patches.dims();
        let patches = patches.reshape([n, w, gh * gw]).swap_dims(1, 2);
        let class = self
            .class_embedding
            .val()
            .reshape([1, 1, w])
            .expand([n, 1, w]);
        let x = Tensor::cat(vec![class, patches], 1) + self.positional_embedding.val().unsqueeze();
        let x = self.transformer.forward(self.ln_pre.forward(x), false);
        let pooled = self.ln_post.forward(x.narrow(1, 0, 1)).reshape([n, w]);
        pooled.matmul(self.proj.val())
    }
}

/// An OpenCLIP model as a CLIP-score judge: both towers, both projections, the transform.
pub struct ClipScorer<B: MicroditBackend> {
    pub text: TextEncoder<B>,
    pub text_projection: Tensor<B, 2>,
    pub vision: ClipVisionEncoder<B>,
    pub preprocess: Preprocess,
    device: B::Device,
}

impl<B: MicroditBackend> ClipScorer<B> {
    /// From a local directory or Hub repository holding `open_clip_config.json` and the
    /// weights (`open_clip_model.safetensors` or `open_clip_pytorch_model.bin`).
    pub fn from_source(source: &str, hub: &Hub, device: &B::Device) -> Result<Self> {
        let (vision_cfg, preprocess) = read_config(&hub.file(source, "open_clip_config.json")?)?;
        let weights = hub
            .file(source, "open_clip_model.safetensors")
            .or_else(|e| {
                hub.file(source, "open_clip_pytorch_model.bin")
                    .map_err(|_| e)
            })?;
        let text = TextEncoder::from_source(source, hub, device)?;
        let projection = read_state_dict(&weights)?
            .remove("text_projection")
            .with_context(|| format!("{} has no text_projection", weights.display()))?;
        let projection = projection
            .to_data()
            .map_err(|e| anyhow::anyhow!("text_projection: {e:?}"))?
            .convert::<f32>();
        ensure!(
            projection.shape.as_slice() == [text.config.width, vision_cfg.embed_dim],
            "text_projection has shape {:?}, expected [{}, {}]",
            projection.shape,
            text.config.width,
            vision_cfg.embed_dim
        );
        Ok(Self {
            text,
            text_projection: Tensor::from_data(projection, device),
            vision: ClipVisionEncoder::load(&vision_cfg, &weights, device)?,
            preprocess,
            device: device.clone(),
        })
    }

    /// `encode_image` of each image [N, embed_dim].
    pub fn image_features(&self, images: &[RgbImage]) -> Result<Tensor<B, 2>> {
        let s = self.preprocess.size;
        let mut pixels = Vec::with_capacity(images.len() * 3 * s * s);
        for image in images {
            pixels.extend(self.preprocess.apply(image)?);
        }
        let pixels = Tensor::from_data(
            TensorData::new(pixels, [images.len(), 3, s, s]),
            &self.device,
        );
        Ok(self.vision.forward(pixels))
    }

    /// `encode_text` of each caption [N, embed_dim]: the end token's final state, projected.
    pub fn text_features(&self, captions: &[&str]) -> Tensor<B, 2> {
        let tokens = self.text.tokenize(captions, &self.device);
        let states = self.text.tower.forward(tokens.ids);
        let width = states.dims()[2];
        let ends: Vec<i64> = tokens
            .ends
            .iter()
            .flat_map(|&e| std::iter::repeat_n(e as i64, width))
            .collect();
        let index = Tensor::from_data(
            TensorData::new(ends, [captions.len(), 1, width]),
            &self.device,
        );
        let pooled = states.gather(1, index).reshape([captions.len(), width]);
        pooled.matmul(self.text_projection.clone())
    }

    /// 100 · cos(image, caption) per pair (torchmetrics' `_clip_score_update`).
    pub fn pair_scores(&self, images: &[RgbImage], captions: &[&str]) -> Result<Vec<f64>> {
        ensure!(
            images.len() == captions.len(),
            "{} images for {} captions",
            images.len(),
            captions.len()
        );
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let unit = |t: Tensor<B, 2>| t.clone() / t.powi_scalar(2).sum_dim(1).sqrt();
        let image = unit(self.image_features(images)?);
        let text = unit(self.text_features(captions));
        let cos: Vec<f32> = (image * text)
            .sum_dim(1)
            .into_data()
            .convert::<f32>()
            .to_vec()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok(cos.into_iter().map(|c| 100.0 * c as f64).collect())
    }
}

/// torchmetrics' `CLIPScore.compute`: the mean pair score, clamped at 0.
pub fn clip_score(pair_scores: &[f64]) -> f64 {
    if pair_scores.is_empty() {
        return 0.0;
    }
    (pair_scores.iter().sum::<f64>() / pair_scores.len() as f64).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vision_extra: &str, preprocess: &str) -> Result<(ClipVisionConfig, Preprocess)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("open_clip_config.json");
        let text = format!(
            r#"{{"model_cfg": {{"embed_dim": 1024, "quick_gelu": true,
              "vision_cfg": {{"image_size": 378, "layers": 32, "width": 1280, "head_width": 80,
                             "patch_size": 14 {vision_extra}}},
              "text_cfg": {{"context_length": 77, "vocab_size": 49408, "width": 1024,
                           "heads": 16, "layers": 24, "hf_tokenizer_name": "x"}}}},
              "preprocess_cfg": {{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5] {preprocess}}}}}"#
        );
        std::fs::write(&path, text).unwrap();
        read_config(&path)
    }

    #[test]
    fn reads_the_dfn5b_config_and_rejects_variants_it_does_not_implement() {
        let (vision, pre) = config(
            "",
            r#", "interpolation": "bicubic", "resize_mode": "squash""#,
        )
        .unwrap();
        assert_eq!(vision, ClipVisionConfig::dfn5b_vit_h_14_378());
        assert!(pre.squash && pre.size == 378 && pre.mean == [0.5; 3]);
        assert!(config(r#", "attentional_pool": false, "act_kwargs": null"#, "").is_ok());
        let err = config(r#", "attentional_pool": true"#, "")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("attentional_pool"), "{err}");
        let err = config("", r#", "resize_mode": "longest""#)
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("longest"), "{err}");
        let err = config("", r#", "interpolation": "bilinear""#)
            .map_err(|e| format!("{e:#}"))
            .unwrap_err();
        assert!(err.contains("bilinear"), "{err}");
    }
}
