//! The OpenCLIP text tower: token + positional embeddings, a pre-LN causal transformer and
//! `ln_final`. MicroDiT conditions on all 77 output states (no pooling, no projection).

use std::collections::BTreeMap;
use std::path::Path;

use crate::backend::MicroditBackend;
use crate::nn::linear::{lazy_zeros, Linear};
use anyhow::{Context, Result};
use burn::module::Param;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::sigmoid;
use serde::Deserialize;
use serde_json::Value;

use crate::backend::{attention, gelu_exact};
use crate::nn::split_last;
use crate::state_dict::{apply_state_dict, read_state_dict, CLIP_TEXT_KEYS};
use crate::text::open_clip_config::{check_text_options, OpenClipConfig};

/// The text half of an open_clip `open_clip_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub context_length: usize,
    pub vocab_size: usize,
    pub width: usize,
    pub heads: usize,
    pub layers: usize,
    pub mlp_ratio: f64,
    /// `x * sigmoid(1.702 x)` instead of GELU (OpenAI-style and DFN5B weights).
    pub quick_gelu: bool,
}

/// `text_cfg` as open_clip reads it (absent sizes take open_clip's defaults).
#[derive(Deserialize)]
struct TextCfg {
    #[serde(default = "default_context")]
    context_length: usize,
    #[serde(default = "default_vocab")]
    vocab_size: usize,
    width: usize,
    heads: usize,
    layers: usize,
    #[serde(default = "default_mlp_ratio")]
    mlp_ratio: f64,
}

/// The `text_cfg` keys [`TextCfg`] reads.
const TEXT_KEYS: &[&str] = &[
    "context_length",
    "vocab_size",
    "width",
    "heads",
    "layers",
    "mlp_ratio",
];

fn default_context() -> usize {
    77
}
fn default_vocab() -> usize {
    49408
}
fn default_mlp_ratio() -> f64 {
    4.0
}

impl ClipTextConfig {
    /// The text tower of an `open_clip_config.json`; options it does not implement are
    /// errors.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_config(&OpenClipConfig::read(path)?)
            .with_context(|| format!("in {}", path.display()))
    }

    pub fn from_config(cfg: &OpenClipConfig) -> Result<Self> {
        let m = &cfg.model_cfg;
        check_text_options(&m.text_cfg, TEXT_KEYS)?;
        let t = TextCfg::deserialize(Value::Object(m.text_cfg.clone()))
            .context("model_cfg.text_cfg")?;
        anyhow::ensure!(
            t.heads > 0 && t.width.is_multiple_of(t.heads),
            "text width {} not divisible by {} heads",
            t.width,
            t.heads
        );
        Ok(Self {
            context_length: t.context_length,
            vocab_size: t.vocab_size,
            width: t.width,
            heads: t.heads,
            layers: t.layers,
            mlp_ratio: t.mlp_ratio,
            quick_gelu: m.quick_gelu,
        })
    }

    /// `apple/DFN5B-CLIP-ViT-H-14-378`'s text tower.
    pub fn dfn5b_vit_h_14() -> Self {
        Self {
            context_length: 77,
            vocab_size: 49408,
            width: 1024,
            heads: 16,
            layers: 24,
            mlp_ratio: 4.0,
            quick_gelu: true,
        }
    }
}

const LN_EPS: f64 = 1e-5;

#[derive(Module, Debug)]
pub struct ClipAttention<B: MicroditBackend> {
    /// PyTorch's packed `in_proj_weight`/`in_proj_bias` (q, k, v stacked).
    pub in_proj: Linear<B>,
    pub out_proj: Linear<B>,
    heads: usize,
}

impl<B: MicroditBackend> ClipAttention<B> {
    fn forward(&self, x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        let [b, n, w] = x.dims();
        let split = |t: Tensor<B, 3>| {
            t.reshape([b, n, self.heads, w / self.heads])
                .swap_dims(1, 2)
        };
        let [q, k, v] = split_last(self.in_proj.forward(x));
        let out = attention(split(q), split(k), split(v), causal);
        self.out_proj
            .forward(out.swap_dims(1, 2).reshape([b, n, w]))
    }
}

#[derive(Module, Debug)]
pub struct ClipMlp<B: MicroditBackend> {
    pub c_fc: Linear<B>,
    pub c_proj: Linear<B>,
    quick_gelu: bool,
}

impl<B: MicroditBackend> ClipMlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.c_fc.forward(x);
        let h = if self.quick_gelu {
            h.clone() * sigmoid(h * 1.702)
        } else {
            gelu_exact(h)
        };
        self.c_proj.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct ResidualAttentionBlock<B: MicroditBackend> {
    pub ln_1: LayerNorm<B>,
    pub attn: ClipAttention<B>,
    pub ln_2: LayerNorm<B>,
    pub mlp: ClipMlp<B>,
}

impl<B: MicroditBackend> ResidualAttentionBlock<B> {
    pub fn new(
        width: usize,
        heads: usize,
        mlp_ratio: f64,
        quick_gelu: bool,
        device: &B::Device,
    ) -> Self {
        let hidden = mlp_width(width, mlp_ratio);
        let ln = || {
            LayerNormConfig::new(width)
                .with_epsilon(LN_EPS)
                .init(device)
        };
        Self {
            ln_1: ln(),
            attn: ClipAttention {
                in_proj: Linear::zeros(width, 3 * width, true, device),
                out_proj: Linear::zeros(width, width, true, device),
                heads,
            },
            ln_2: ln(),
            mlp: ClipMlp {
                c_fc: Linear::zeros(width, hidden, true, device),
                c_proj: Linear::zeros(hidden, width, true, device),
                quick_gelu,
            },
        }
    }
}

/// open_clip's `Transformer`, shared by the text tower (causal) and the vision tower.
#[derive(Module, Debug)]
pub struct ClipTransformer<B: MicroditBackend> {
    pub resblocks: Vec<ResidualAttentionBlock<B>>,
}

impl<B: MicroditBackend> ClipTransformer<B> {
    pub fn new(
        width: usize,
        heads: usize,
        layers: usize,
        mlp_ratio: f64,
        quick_gelu: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            resblocks: (0..layers)
                .map(|_| ResidualAttentionBlock::new(width, heads, mlp_ratio, quick_gelu, device))
                .collect(),
        }
    }

    pub fn forward(&self, mut x: Tensor<B, 3>, causal: bool) -> Tensor<B, 3> {
        for block in &self.resblocks {
            x = x.clone() + block.attn.forward(block.ln_1.forward(x), causal);
            x = x.clone() + block.mlp.forward(block.ln_2.forward(x));
        }
        x
    }
}

/// The hidden width of a block's MLP: `int(width * mlp_ratio)`, as open_clip sizes it.
fn mlp_width(width: usize, mlp_ratio: f64) -> usize {
    (width as f64 * mlp_ratio) as usize
}

/// open_clip's `LayerNorm` (ε = 1e-5).
pub fn clip_layer_norm<B: MicroditBackend>(width: usize, device: &B::Device) -> LayerNorm<B> {
    LayerNormConfig::new(width)
        .with_epsilon(LN_EPS)
        .init(device)
}

#[derive(Module, Debug)]
pub struct ClipTextEncoder<B: MicroditBackend> {
    pub token_embedding: Embedding<B>,
    pub positional_embedding: Param<Tensor<B, 2>>,
    pub transformer: ClipTransformer<B>,
    pub ln_final: LayerNorm<B>,
}

impl<B: MicroditBackend> ClipTextEncoder<B> {
    /// Zero-initialised structure, for weights that are about to be loaded.
    pub fn new(cfg: &ClipTextConfig, device: &B::Device) -> Self {
        let w = cfg.width;
        Self {
            token_embedding: Embedding {
                weight: lazy_zeros([cfg.vocab_size, w], device),
            },
            positional_embedding: lazy_zeros([cfg.context_length, w], device),
            transformer: ClipTransformer::new(
                w,
                cfg.heads,
                cfg.layers,
                cfg.mlp_ratio,
                cfg.quick_gelu,
                device,
            ),
            ln_final: clip_layer_norm(w, device),
        }
    }

    /// The tower with burn's default initialisation, drawn from the backend's generator in
    /// construction order (the token embedding N(0, 1); each linear layer's weight, then
    /// bias, Kaiming-uniform; the positional embedding zeros, the norms unit scales): the
    /// demo's random, frozen tower. [`Self::new`] is all zeros, for weights about to load.
    pub fn random(cfg: &ClipTextConfig, device: &B::Device) -> Self {
        let w = cfg.width;
        let mut tower = Self::new(cfg, device);
        tower.token_embedding = EmbeddingConfig::new(cfg.vocab_size, w).init(device);
        let random = |d_in: usize, d_out: usize| {
            let layer = LinearConfig::new(d_in, d_out).init(device);
            Linear::new(layer.weight, layer.bias)
        };
        let hidden = mlp_width(w, cfg.mlp_ratio);
        for block in &mut tower.transformer.resblocks {
            block.attn.in_proj = random(w, 3 * w);
            block.attn.out_proj = random(w, w);
            block.mlp.c_fc = random(w, hidden);
            block.mlp.c_proj = random(hidden, w);
        }
        tower
    }

    /// Builds the tower and loads its weights from an open_clip state dict
    /// (`open_clip_model.safetensors` or `open_clip_pytorch_model.bin`). Only the text
    /// tensors are read; the vision tower in the same file is never loaded.
    pub fn load(cfg: &ClipTextConfig, weights: &Path, device: &B::Device) -> Result<Self> {
        let text_only: BTreeMap<_, _> = read_state_dict(weights)?
            .into_iter()
            .filter(|(name, _)| is_text_tensor(name))
            .collect();
        apply_state_dict(Self::new(cfg, device), text_only, &CLIP_TEXT_KEYS)
            .with_context(|| format!("loading the text tower from {}", weights.display()))
    }

    /// From a local directory or Hub repository holding `open_clip_config.json` and
    /// `open_clip_model.safetensors` (or `open_clip_pytorch_model.bin`).
    pub fn from_source(
        source: &str,
        hub: &crate::hub::Hub,
        device: &B::Device,
    ) -> Result<(Self, ClipTextConfig)> {
        let cfg = ClipTextConfig::from_file(&hub.file(source, "open_clip_config.json")?)?;
        let weights = hub
            .file(source, "open_clip_model.safetensors")
            .or_else(|e| {
                hub.file(source, "open_clip_pytorch_model.bin")
                    .map_err(|_| e)
            })?;
        Ok((Self::load(&cfg, &weights, device)?, cfg))
    }

    /// Token ids [B, L] -> `ln_final` states [B, L, width], causal attention.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let x =
            self.token_embedding.forward(tokens) + self.positional_embedding.val().unsqueeze::<3>();
        self.ln_final.forward(self.transformer.forward(x, true))
    }
}

fn is_text_tensor(name: &str) -> bool {
    name == "positional_embedding"
        || ["token_embedding.", "transformer.", "ln_final."]
            .iter()
            .any(|p| name.starts_with(p))
}
