//! The MicroDiT denoiser: patch-mixer over all patches, then (in training) a random 75% of
//! patches dropped and the deep backbone run on the rest, optionally with a random share of
//! those carried past a span of its blocks (TREAD routing).

use burn::prelude::*;
use burn::tensor::FloatDType;

use super::block::{BlockOptions, CaptionBlock, DitBlock, FinalLayer};
use super::config::DitConfig;
use super::embeddings::{sincos_pos_embed, unpatchify, PatchEmbed, TimestepEmbedder};
use super::init::Init;
use super::layers::{cast_like, residual, Mlp, NormLinear};
use super::routing::TrainingTokens;
use crate::backend::MicroditBackend;
use crate::nn::precision::{cast, to_f32, LowPrecisionCopy, Precision};

/// The fixed 2-D sin-cos positions of `cfg`'s patch grid, [1, T, D], in f32.
fn positions<B: MicroditBackend>(cfg: &DitConfig, device: &B::Device) -> Tensor<B, 3> {
    let grid = cfg.grid_size();
    let pos = sincos_pos_embed(cfg.dim, grid, grid, cfg.pos_interp_scale);
    Tensor::from_data(TensorData::new(pos, [1, grid * grid, cfg.dim]), device)
}

#[derive(Module, Debug)]
pub struct MicroDit<B: MicroditBackend> {
    pub x_embedder: PatchEmbed<B>,
    pub t_embedder: TimestepEmbedder<B>,
    /// Caption projection Cc -> D (`y_embedder.y_proj`).
    pub y_embedder: Mlp<B>,
    pub y_emb_preprocess: CaptionBlock<B>,
    pub pooled_y_emb_process: Mlp<B>,
    pub patch_mixer: Vec<DitBlock<B>>,
    /// Width adapters around the mixer, absent (identity) when its width is the backbone's.
    pub patch_mixer_map_xin: Option<NormLinear<B>>,
    pub patch_mixer_map_xout: Option<NormLinear<B>>,
    pub patch_mixer_map_y: Option<NormLinear<B>>,
    pub blocks: Vec<DitBlock<B>>,
    pub final_layer: FinalLayer<B>,
    /// [1, T, D] fixed 2-D sin-cos positions (a buffer, not trained; always f32, as the
    /// reference's float32 buffer stays under autocast).
    pos_embed: Tensor<B, 3>,
    /// [1, 1, p*p*C] what dropped patches read as in the output: zeros (a buffer).
    mask_token: Tensor<B, 3>,
    patch_size: usize,
    channels: usize,
}

impl<B: MicroditBackend> MicroDit<B> {
    pub fn new(cfg: &DitConfig, init: &mut Init<B>) -> Self {
        let (dim, eps) = (cfg.dim, cfg.norm_eps);
        let opts = BlockOptions {
            cond_dim: dim,
            bias: cfg.use_bias,
            eps,
            num_experts: cfg.num_experts,
            expert_capacity: cfg.expert_capacity,
        };
        let mixer_map = |init: &mut Init<B>, d_in, d_out| {
            cfg.has_mixer_projections()
                .then(|| NormLinear::new(d_in, d_out, cfg.use_bias, eps, init))
        };
        let device = init.device();
        Self {
            x_embedder: PatchEmbed::new(cfg.in_channels, dim, cfg.patch_size, init),
            t_embedder: TimestepEmbedder::new(dim, init),
            y_embedder: Mlp::new(cfg.caption_channels, dim, dim, eps, init),
            y_emb_preprocess: CaptionBlock::new(&cfg.caption_block(), cfg.use_bias, eps, init),
            pooled_y_emb_process: Mlp::new(dim, dim, dim, eps, init),
            patch_mixer: cfg
                .mixer_blocks()
                .iter()
                .map(|s| DitBlock::new(s, &opts, init))
                .collect(),
            patch_mixer_map_xin: mixer_map(init, dim, cfg.patch_mixer_dim),
            patch_mixer_map_xout: mixer_map(init, cfg.patch_mixer_dim, dim),
            patch_mixer_map_y: mixer_map(init, dim, cfg.patch_mixer_dim),
            blocks: cfg
                .backbone_blocks()
                .iter()
                .map(|s| DitBlock::new(s, &opts, init))
                .collect(),
            final_layer: FinalLayer::new(dim, cfg.patch_dim(), eps, init),
            pos_embed: positions(cfg, device),
            mask_token: Tensor::zeros([1, 1, cfg.patch_dim()], device),
            patch_size: cfg.patch_size,
            channels: cfg.in_channels,
        }
    }

    pub fn pos_embed(&self) -> Tensor<B, 3> {
        self.pos_embed.clone()
    }

    /// The same weights for images of another size: `cfg` is this architecture at another
    /// `input_size` (and `pos_interp_scale`); only the positions change.
    pub fn resized(&self, cfg: &DitConfig) -> Self {
        let mut model = self.clone();
        model.pos_embed = positions(cfg, &self.pos_embed.device());
        model
    }

    /// The same model computing its products in `dtype` (bf16/f16 halve the weights'
    /// memory), with autocast's rules (`precision.rs`): LayerNorm weights and the positions
    /// stay f32. Inputs and outputs of [`Self::forward`] keep their own dtype.
    pub fn cast(self, dtype: FloatDType) -> Self {
        let mut model = self.map(&mut LowPrecisionCopy::new(dtype));
        model.mask_token = model.mask_token.cast(dtype);
        model
    }

    /// The model computing in the float `precision`: itself in f32, else [`Self::cast`].
    /// Inside an autodiff graph the cast is part of the graph, so a low-precision copy's
    /// gradients arrive on these f32 master weights (mixed-precision training). An int8
    /// model is a model of another shape, built by [`super::weights::quantize`]; callers
    /// refuse int8 before they get here.
    pub fn in_precision(self, precision: Precision) -> Self {
        match precision {
            Precision::F32 => self,
            Precision::Int8 => unreachable!("int8 models come from weights::quantize"),
            low => self.cast(low.dtype()),
        }
    }

    /// The raw network output `F_x` [B, C, H, W] for latents `x` [B, C, H, W], noise-level
    /// input `t` [B] or [1] (already `c_noise`) and caption embeddings `y` [B, L, Cc].
    /// In training, `tokens` may mask patches (only kept ones go through the backbone,
    /// dropped ones read as the mask token) and route some past a span of blocks.
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        y: Tensor<B, 3>,
        tokens: &TrainingTokens<B>,
    ) -> Tensor<B, 4> {
        let (io_dtype, batch) = (x.dtype(), x.dims()[0]);
        let x = to_f32(self.x_embedder.forward(x)) + self.pos_embed.clone();
        let t = self.t_embedder.forward(to_f32(t).expand([batch]));

        let y = self.y_emb_preprocess.forward(self.y_embedder.forward(y));
        let y_pooled = self
            .pooled_y_emb_process
            .forward(y.clone().mean_dim(1).squeeze_dim::<2>(1));
        let c = residual(t, y_pooled);

        let map = |m: &Option<NormLinear<B>>, v: Tensor<B, 3>| match m {
            Some(m) => m.forward(v),
            None => v,
        };
        let mut x = map(&self.patch_mixer_map_xin, x);
        let y_mixer = map(&self.patch_mixer_map_y, y.clone());
        for block in &self.patch_mixer {
            x = block.forward(x, y_mixer.clone(), c.clone());
        }
        if let Some(mask) = &tokens.mask {
            x = mask.keep(x);
        }
        // Project to the backbone width after masking: less work.
        let mut x = map(&self.patch_mixer_map_xout, x);
        // The tokens as they entered the routed span; the routed ones rejoin from here.
        let mut before_span = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let route = tokens.route.as_ref();
            if let Some(route) = route.filter(|r| r.span.first_block == i) {
                before_span = Some(x.clone());
                x = route.through.keep(x);
            }
            x = block.forward(x, y.clone(), c.clone());
            if let Some(route) = route.filter(|r| r.span.last_block == i) {
                let before = before_span
                    .take()
                    .expect("the span's first block came first");
                x = route.through.merge(x, before);
            }
        }
        let mut x = self.final_layer.forward(x, c);
        if let Some(mask) = &tokens.mask {
            x = mask.restore(x.clone(), cast_like(self.mask_token.clone(), &x));
        }
        cast(unpatchify(x, self.patch_size, self.channels), io_dtype)
    }

    /// Classifier-free guidance: `uncond + scale * (cond - uncond)`, the unconditional branch
    /// seeing an all-zero caption (what 10% of training captions were replaced by).
    pub fn forward_cfg(
        &self,
        x: Tensor<B, 4>,
        t: Tensor<B, 1>,
        y: Tensor<B, 3>,
        scale: f64,
    ) -> Tensor<B, 4> {
        let batch = x.dims()[0];
        let t = if t.dims()[0] == 1 {
            t
        } else {
            Tensor::cat(vec![t.clone(), t], 0)
        };
        let out = self.forward(
            Tensor::cat(vec![x.clone(), x], 0),
            t,
            Tensor::cat(vec![y.clone(), y.zeros_like()], 0),
            &TrainingTokens::all(),
        );
        let cond = out.clone().narrow(0, 0, batch);
        let uncond = out.narrow(0, batch, batch);
        uncond.clone() + (cond - uncond) * scale
    }
}
