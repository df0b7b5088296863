//! Constructor parameters of the reference `DiT`, the derived per-block widths, and the
//! published presets.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Every constructor argument of the reference `DiT` (same names, so the reference's
/// `config.json` files load as they are; absent ones take the constructor's defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DitConfig {
    pub input_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub dim: usize,
    pub depth: usize,
    pub head_dim: usize,
    pub multiple_of: usize,
    pub caption_channels: usize,
    pub pos_interp_scale: f64,
    pub norm_eps: f64,
    pub depth_init: bool,
    /// One per block, or a shorter list split evenly across blocks.
    pub qkv_multipliers: Vec<f64>,
    /// One per block, or a shorter list split evenly across blocks.
    pub ffn_multipliers: Vec<f64>,
    pub use_patch_mixer: bool,
    pub patch_mixer_depth: usize,
    pub patch_mixer_dim: usize,
    pub patch_mixer_qkv_ratio: f64,
    pub patch_mixer_mlp_ratio: f64,
    pub use_bias: bool,
    pub num_experts: usize,
    pub expert_capacity: f64,
    pub experts_every_n: usize,
}

/// Widths of one transformer block, as the reference derives them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockShape {
    pub dim: usize,
    pub head_dim: usize,
    /// Width of the self-attention q/k/v space (grows with depth in the backbone).
    pub qkv_dim: usize,
    /// `int(dim * mlp_ratio)` before the feed-forward's own rounding.
    pub mlp_hidden: usize,
    pub multiple_of: usize,
    pub moe: bool,
    /// Initialisation std of the blocks' output projections.
    pub init_std: f64,
}

impl BlockShape {
    /// Hidden width of the SwiGLU feed-forward: two thirds of `mlp_hidden`, rounded up.
    pub fn swiglu_hidden(&self) -> usize {
        round_up(2 * self.mlp_hidden / 3, self.multiple_of)
    }
    /// Hidden width of each expert: `mlp_hidden` rounded up (no two-thirds factor).
    pub fn expert_hidden(&self) -> usize {
        round_up(self.mlp_hidden, self.multiple_of)
    }
}

pub fn round_up(x: usize, multiple: usize) -> usize {
    multiple * x.div_ceil(multiple)
}

/// `numpy.linspace(start, stop, num)`, bit for bit (the widths are `int(dim * ratio)`, so
/// a last-bit difference could change a layer's size).
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// The reference `DiT.__init__` defaults (`micro_diffusion/models/dit.py`).
impl Default for DitConfig {
    fn default() -> Self {
        Self {
            input_size: 32,
            patch_size: 2,
            in_channels: 4,
            dim: 1152,
            depth: 28,
            head_dim: 64,
            multiple_of: 256,
            caption_channels: 1024,
            pos_interp_scale: 1.0,
            norm_eps: 1e-6,
            depth_init: true,
            qkv_multipliers: vec![1.0],
            ffn_multipliers: vec![4.0],
            use_patch_mixer: true,
            patch_mixer_depth: 4,
            patch_mixer_dim: 512,
            patch_mixer_qkv_ratio: 1.0,
            patch_mixer_mlp_ratio: 1.0,
            use_bias: true,
            num_experts: 8,
            expert_capacity: 1.0,
            experts_every_n: 2,
        }
    }
}

/// Which architecture, at what size: a preset or config file, optionally moved to another
/// image resolution and number of latent channels. The one rule every command uses:
/// - presets are 256 px models; at `resolution` their latent side is
///   `resolution / downscale` and positions are interpolated by `resolution / 256` (the
///   reference's 512 px stages use `pos_interp_scale = 2`);
/// - a config file is used as written, except that a given resolution sets its latent side
///   (its `pos_interp_scale` stays what the file says);
/// - `in_channels`, when given, replaces the architecture's.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChoice {
    /// A preset name or a JSON/TOML config file.
    pub source: String,
    pub resolution: Option<usize>,
    /// Pixels per latent pixel (8 for the SDXL VAE, the recipe's codec).
    pub downscale: usize,
    pub in_channels: Option<usize>,
}

impl ModelChoice {
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            resolution: None,
            downscale: 8,
            in_channels: None,
        }
    }

    pub fn resolve(&self) -> Result<DitConfig> {
        let path = Path::new(&self.source);
        let is_file = path.is_file();
        let mut cfg = if is_file {
            DitConfig::from_file(path)?
        } else {
            DitConfig::preset(&self.source).with_context(|| {
                format!(
                    "{} is neither a model config file nor a preset",
                    self.source
                )
            })?
        };
        let resolution = match (self.resolution, is_file) {
            (Some(r), _) => Some(r),
            (None, false) => Some(256),
            (None, true) => None,
        };
        if let Some(r) = resolution {
            let unit = self.downscale * cfg.patch_size;
            ensure!(
                r > 0 && r.is_multiple_of(unit),
                "resolution {r} is not a multiple of {unit} (latent downscale {} × patch size {})",
                self.downscale,
                cfg.patch_size
            );
            cfg.input_size = r / self.downscale;
            if !is_file {
                cfg.pos_interp_scale = (r as f64 / 256.0).max(1.0);
            }
        }
        if let Some(c) = self.in_channels {
            cfg.in_channels = c;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

impl DitConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let cfg: Self = if is_toml {
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        } else {
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", path.display()))?;
            // Fixture and training configs nest the constructor arguments under "dit".
            let inner = value.get("dit").cloned().unwrap_or(value);
            serde_json::from_value(inner).with_context(|| format!("parsing {}", path.display()))?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "MicroDiT_Tiny_2" => Ok(Self::micro_dit(512, 16, 32, 4, 512)),
            "MicroDiT_XL_2" => Ok(Self::micro_dit(1024, 28, 64, 6, 768)),
            _ => bail!("unknown preset '{name}' (known: {})", PRESETS.join(", ")),
        }
    }

    /// `MicroDiT_*_2` of the reference `dit.py`, at 256 px with 4 latent channels.
    fn micro_dit(
        dim: usize,
        depth: usize,
        head_dim: usize,
        mixer_depth: usize,
        mixer_dim: usize,
    ) -> Self {
        Self {
            input_size: 32,
            patch_size: 2,
            in_channels: 4,
            dim,
            depth,
            head_dim,
            multiple_of: 256,
            caption_channels: 1024,
            pos_interp_scale: 1.0,
            norm_eps: 1e-6,
            depth_init: true,
            qkv_multipliers: linspace(0.5, 1.0, depth),
            ffn_multipliers: linspace(0.5, 4.0, depth),
            use_patch_mixer: true,
            patch_mixer_depth: mixer_depth,
            patch_mixer_dim: mixer_dim,
            patch_mixer_qkv_ratio: 1.0,
            patch_mixer_mlp_ratio: 4.0,
            use_bias: false,
            num_experts: 8,
            expert_capacity: 2.0,
            experts_every_n: 2,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let ensure = |ok: bool, msg: String| {
            if ok {
                Ok(())
            } else {
                Err(anyhow::anyhow!(msg))
            }
        };
        ensure(
            self.patch_size > 0 && self.input_size.is_multiple_of(self.patch_size),
            format!(
                "input_size {} is not a multiple of patch_size {}",
                self.input_size, self.patch_size
            ),
        )?;
        ensure(
            self.head_dim > 0 && self.dim.is_multiple_of(self.head_dim),
            format!(
                "dim {} is not a multiple of head_dim {}",
                self.dim, self.head_dim
            ),
        )?;
        ensure(
            self.dim.is_multiple_of(4),
            format!(
                "dim {} must be a multiple of 4 (2-D sin-cos positions)",
                self.dim
            ),
        )?;
        ensure(self.depth > 0, "depth must be at least 1".into())?;
        ensure(
            self.multiple_of > 0,
            "multiple_of must be at least 1".into(),
        )?;
        ensure(
            self.experts_every_n > 0,
            "experts_every_n must be at least 1".into(),
        )?;
        ensure(
            self.qkv_multipliers.len() == self.ffn_multipliers.len()
                && !self.qkv_multipliers.is_empty(),
            "qkv_multipliers and ffn_multipliers must be non-empty and of equal length".into(),
        )?;
        ensure(
            self.depth.is_multiple_of(self.qkv_multipliers.len()),
            format!(
                "depth {} is not divisible by the {} multipliers",
                self.depth,
                self.qkv_multipliers.len()
            ),
        )?;
        if self.use_patch_mixer {
            ensure(
                self.patch_mixer_dim.is_multiple_of(self.head_dim),
                format!(
                    "patch_mixer_dim {} is not a multiple of head_dim {}",
                    self.patch_mixer_dim, self.head_dim
                ),
            )?;
        }
        let has_moe = self
            .backbone_blocks()
            .iter()
            .chain(&self.mixer_blocks())
            .any(|b| b.moe);
        if has_moe {
            ensure(
                self.num_experts > 0,
                "num_experts must be at least 1".into(),
            )?;
            // Each expert picks its top-k of the T tokens, so k = capacity*T/E must not exceed T.
            ensure(
                self.expert_capacity > 0.0 && self.expert_capacity <= self.num_experts as f64,
                format!(
                    "expert_capacity {} must be in (0, num_experts = {}]",
                    self.expert_capacity, self.num_experts
                ),
            )?;
        }
        Ok(())
    }

    pub fn grid_size(&self) -> usize {
        self.input_size / self.patch_size
    }

    pub fn num_tokens(&self) -> usize {
        self.grid_size() * self.grid_size()
    }

    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.in_channels
    }

    /// `int(capacity * T / E)`: how many tokens each expert picks from a sequence of `t`.
    pub fn tokens_per_expert(&self, t: usize) -> usize {
        (self.expert_capacity * t as f64 / self.num_experts as f64) as usize
    }

    /// Per-block (qkv_ratio, mlp_ratio) of the backbone: one per block, or each of a shorter
    /// list repeated over an equal share of the blocks.
    fn backbone_ratios(&self) -> Vec<(f64, f64)> {
        let per = self.depth / self.qkv_multipliers.len();
        self.qkv_multipliers
            .iter()
            .zip(&self.ffn_multipliers)
            .flat_map(|(&q, &f)| std::iter::repeat_n((q, f), per))
            .collect()
    }

    pub fn backbone_blocks(&self) -> Vec<BlockShape> {
        // The reference never puts experts in the last block.
        self.backbone_ratios()
            .into_iter()
            .enumerate()
            .map(|(i, (qkv_ratio, mlp_ratio))| {
                let moe = i < self.depth - 1 && (i + 1) % self.experts_every_n == 0;
                let init_std = if self.depth_init {
                    0.02 / (2.0 * (i + 1) as f64).sqrt()
                } else {
                    0.02 / (2.0 * self.depth as f64).sqrt()
                };
                self.block_shape(self.dim, qkv_ratio, mlp_ratio, moe, init_std)
            })
            .collect()
    }

    pub fn mixer_blocks(&self) -> Vec<BlockShape> {
        if !self.use_patch_mixer {
            return Vec::new();
        }
        // Mixer blocks use depth_init=False with num_layers=depth; the first is never MoE.
        let init_std = 0.02 / (2.0 * self.depth as f64).sqrt();
        (0..self.patch_mixer_depth)
            .map(|i| {
                let moe = i >= 1 && (i + 1) % self.experts_every_n == 0;
                self.block_shape(
                    self.patch_mixer_dim,
                    self.patch_mixer_qkv_ratio,
                    self.patch_mixer_mlp_ratio,
                    moe,
                    init_std,
                )
            })
            .collect()
    }

    fn block_shape(
        &self,
        dim: usize,
        qkv_ratio: f64,
        mlp_ratio: f64,
        moe: bool,
        init_std: f64,
    ) -> BlockShape {
        // Attention width rounded up to a multiple of two heads (reference `DiTBlock`).
        let qkv_dim = if qkv_ratio != 1.0 {
            round_up((dim as f64 * qkv_ratio) as usize, 2 * self.head_dim)
        } else {
            dim
        };
        BlockShape {
            dim,
            head_dim: self.head_dim,
            qkv_dim,
            mlp_hidden: (dim as f64 * mlp_ratio) as usize,
            multiple_of: self.multiple_of,
            moe,
            init_std,
        }
    }

    /// The widths of the caption self-attention block (`y_emb_preprocess`).
    pub fn caption_block(&self) -> BlockShape {
        self.block_shape(self.dim, 1.0, 4.0, false, 0.02)
    }

    pub fn has_mixer_projections(&self) -> bool {
        self.use_patch_mixer && self.patch_mixer_dim != self.dim
    }

    /// Width of the tokens that are masked and unmasked (the mixer's output width).
    pub fn mixer_width(&self) -> usize {
        if self.use_patch_mixer {
            self.patch_mixer_dim
        } else {
            self.dim
        }
    }
}

pub const PRESETS: [&str; 2] = ["MicroDiT_Tiny_2", "MicroDiT_XL_2"];
