//! diffusers' `AutoencoderKL`: a convolutional encoder to a diagonal Gaussian over latents,
//! and a decoder back to pixels. Module paths follow diffusers' state-dict keys.

use crate::nn::linear::Linear;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, GroupNormConfig, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;

use super::config::VaeConfig;
use crate::backend::{conv2d_module as apply, group_norm as normalize, MicroditBackend};

const EPS: f64 = 1e-6;

fn conv<B: MicroditBackend>(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &B::Device,
) -> Conv2d<B> {
    Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .init(device)
}

fn group_norm<B: MicroditBackend>(
    groups: usize,
    channels: usize,
    device: &B::Device,
) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(EPS)
        .init(device)
}

/// `ResnetBlock2D` without a time embedding: two (GroupNorm, SiLU, 3×3 conv) stages and a
/// 1×1 shortcut when the width changes.
#[derive(Module, Debug)]
pub struct ResnetBlock<B: MicroditBackend> {
    pub norm1: GroupNorm<B>,
    pub conv1: Conv2d<B>,
    pub norm2: GroupNorm<B>,
    pub conv2: Conv2d<B>,
    pub conv_shortcut: Option<Conv2d<B>>,
}

impl<B: MicroditBackend> ResnetBlock<B> {
    fn new(c_in: usize, c_out: usize, groups: usize, device: &B::Device) -> Self {
        Self {
            norm1: group_norm(groups, c_in, device),
            conv1: conv(c_in, c_out, 3, 1, 1, device),
            norm2: group_norm(groups, c_out, device),
            conv2: conv(c_out, c_out, 3, 1, 1, device),
            conv_shortcut: (c_in != c_out).then(|| conv(c_in, c_out, 1, 1, 0, device)),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let h = apply(&self.conv1, normalize(&self.norm1, x.clone(), true));
        let h = apply(&self.conv2, normalize(&self.norm2, h, true));
        let x = match &self.conv_shortcut {
            Some(c) => apply(c, x),
            None => x,
        };
        x + h
    }
}

/// Single-head self-attention over all pixels (the mid block's `Attention`).
#[derive(Module, Debug)]
pub struct SpatialAttention<B: MicroditBackend> {
    pub group_norm: GroupNorm<B>,
    pub to_q: Linear<B>,
    pub to_k: Linear<B>,
    pub to_v: Linear<B>,
    pub to_out: Linear<B>,
}

impl<B: MicroditBackend> SpatialAttention<B> {
    fn new(c: usize, groups: usize, device: &B::Device) -> Self {
        let linear = || Linear::zeros(c, c, true, device);
        Self {
            group_norm: group_norm(groups, c, device),
            to_q: linear(),
            to_k: linear(),
            to_v: linear(),
            to_out: linear(),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let seq = normalize(&self.group_norm, x.clone(), false)
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let heads = |t: Tensor<B, 3>| t.unsqueeze_dim::<4>(1);
        let out = attention(
            heads(self.to_q.forward(seq.clone())),
            heads(self.to_k.forward(seq.clone())),
            heads(self.to_v.forward(seq)),
            None,
            None,
            AttentionModuleOptions::default(),
        );
        let out = self.to_out.forward(out.squeeze_dim::<3>(1));
        x + out.swap_dims(1, 2).reshape([b, c, h, w])
    }
}

#[derive(Module, Debug)]
pub struct MidBlock<B: MicroditBackend> {
    pub resnets: Vec<ResnetBlock<B>>,
    pub attentions: Vec<SpatialAttention<B>>,
}

impl<B: MicroditBackend> MidBlock<B> {
    fn new(c: usize, groups: usize, with_attention: bool, device: &B::Device) -> Self {
        Self {
            resnets: vec![
                ResnetBlock::new(c, c, groups, device),
                ResnetBlock::new(c, c, groups, device),
            ],
            attentions: if with_attention {
                vec![SpatialAttention::new(c, groups, device)]
            } else {
                vec![]
            },
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x);
        if let Some(attn) = self.attentions.first() {
            x = attn.forward(x);
        }
        self.resnets[1].forward(x)
    }
}

/// A stride-2 3×3 convolution after padding one zero row/column at the bottom/right
/// (diffusers' `Downsample2D` with `padding=0`).
#[derive(Module, Debug)]
pub struct Downsample<B: MicroditBackend> {
    pub conv: Conv2d<B>,
}

impl<B: MicroditBackend> Downsample<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let device = x.device();
        let x = Tensor::cat(vec![x, Tensor::zeros([b, c, h, 1], &device)], 3);
        let x = Tensor::cat(vec![x, Tensor::zeros([b, c, 1, w + 1], &device)], 2);
        apply(&self.conv, x)
    }
}

/// Nearest-neighbour ×2 then a 3×3 convolution (`Upsample2D`).
#[derive(Module, Debug)]
pub struct Upsample<B: MicroditBackend> {
    pub conv: Conv2d<B>,
}

impl<B: MicroditBackend> Upsample<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let x = x
            .reshape([b, c, h, 1, w, 1])
            .expand([b, c, h, 2, w, 2])
            .reshape([b, c, 2 * h, 2 * w]);
        apply(&self.conv, x)
    }
}

/// `count` ResNet blocks, the first changing the width from `c_in` to `c_out`.
fn resnet_stack<B: MicroditBackend>(
    c_in: usize,
    c_out: usize,
    count: usize,
    groups: usize,
    device: &B::Device,
) -> Vec<ResnetBlock<B>> {
    (0..count)
        .map(|j| ResnetBlock::new(if j == 0 { c_in } else { c_out }, c_out, groups, device))
        .collect()
}

#[derive(Module, Debug)]
pub struct DownBlock<B: MicroditBackend> {
    pub resnets: Vec<ResnetBlock<B>>,
    pub downsamplers: Vec<Downsample<B>>,
}

#[derive(Module, Debug)]
pub struct UpBlock<B: MicroditBackend> {
    pub resnets: Vec<ResnetBlock<B>>,
    pub upsamplers: Vec<Upsample<B>>,
}

#[derive(Module, Debug)]
pub struct Encoder<B: MicroditBackend> {
    pub conv_in: Conv2d<B>,
    pub down_blocks: Vec<DownBlock<B>>,
    pub mid_block: MidBlock<B>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

impl<B: MicroditBackend> Encoder<B> {
    fn new(cfg: &VaeConfig, device: &B::Device) -> Self {
        let (ch, g) = (&cfg.block_out_channels, cfg.norm_num_groups);
        let last = *ch.last().unwrap();
        let down_blocks = (0..ch.len())
            .map(|i| {
                let c_in = if i == 0 { ch[0] } else { ch[i - 1] };
                DownBlock {
                    resnets: resnet_stack(c_in, ch[i], cfg.layers_per_block, g, device),
                    downsamplers: (i + 1 < ch.len())
                        .then(|| Downsample {
                            conv: conv(ch[i], ch[i], 3, 2, 0, device),
                        })
                        .into_iter()
                        .collect(),
                }
            })
            .collect();
        Self {
            conv_in: conv(cfg.in_channels, ch[0], 3, 1, 1, device),
            down_blocks,
            mid_block: MidBlock::new(last, g, cfg.mid_block_add_attention, device),
            conv_norm_out: group_norm(g, last, device),
            conv_out: conv(last, 2 * cfg.latent_channels, 3, 1, 1, device),
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = apply(&self.conv_in, x);
        for block in &self.down_blocks {
            for r in &block.resnets {
                x = r.forward(x);
            }
            for d in &block.downsamplers {
                x = d.forward(x);
            }
        }
        let x = self.mid_block.forward(x);
        apply(&self.conv_out, normalize(&self.conv_norm_out, x, true))
    }
}

#[derive(Module, Debug)]
pub struct Decoder<B: MicroditBackend> {
    pub conv_in: Conv2d<B>,
    pub mid_block: MidBlock<B>,
    pub up_blocks: Vec<UpBlock<B>>,
    pub conv_norm_out: GroupNorm<B>,
    pub conv_out: Conv2d<B>,
}

impl<B: MicroditBackend> Decoder<B> {
    fn new(cfg: &VaeConfig, device: &B::Device) -> Self {
        let g = cfg.norm_num_groups;
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let up_blocks = (0..rev.len())
            .map(|i| {
                let c_in = if i == 0 { rev[0] } else { rev[i - 1] };
                UpBlock {
                    resnets: resnet_stack(c_in, rev[i], cfg.layers_per_block + 1, g, device),
                    upsamplers: (i + 1 < rev.len())
                        .then(|| Upsample {
                            conv: conv(rev[i], rev[i], 3, 1, 1, device),
                        })
                        .into_iter()
                        .collect(),
                }
            })
            .collect();
        let first = cfg.block_out_channels[0];
        Self {
            conv_in: conv(cfg.latent_channels, rev[0], 3, 1, 1, device),
            mid_block: MidBlock::new(rev[0], g, cfg.mid_block_add_attention, device),
            up_blocks,
            conv_norm_out: group_norm(g, first, device),
            conv_out: conv(first, cfg.out_channels, 3, 1, 1, device),
        }
    }

    pub fn forward(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.mid_block.forward(apply(&self.conv_in, z));
        for block in &self.up_blocks {
            for r in &block.resnets {
                x = r.forward(x);
            }
            for u in &block.upsamplers {
                x = u.forward(x);
            }
        }
        apply(&self.conv_out, normalize(&self.conv_norm_out, x, true))
    }
}

/// The encoder's output distribution over latents (diffusers' `DiagonalGaussianDistribution`).
#[derive(Debug, Clone)]
pub struct LatentDistribution<B: MicroditBackend> {
    pub mean: Tensor<B, 4>,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor<B, 4>,
}

impl<B: MicroditBackend> LatentDistribution<B> {
    pub fn std(&self) -> Tensor<B, 4> {
        (self.logvar.clone() * 0.5).exp()
    }

    /// `mean + std * noise` for caller-drawn standard normal `noise`.
    pub fn sample(&self, noise: Tensor<B, 4>) -> Tensor<B, 4> {
        self.mean.clone() + self.std() * noise
    }
}

#[derive(Module, Debug)]
pub struct AutoencoderKl<B: MicroditBackend> {
    pub encoder: Encoder<B>,
    pub quant_conv: Option<Conv2d<B>>,
    pub post_quant_conv: Option<Conv2d<B>>,
    pub decoder: Decoder<B>,
}

impl<B: MicroditBackend> AutoencoderKl<B> {
    /// Structure only (weights to be loaded).
    pub fn new(cfg: &VaeConfig, device: &B::Device) -> Self {
        let z2 = 2 * cfg.latent_channels;
        Self {
            encoder: Encoder::new(cfg, device),
            quant_conv: cfg.use_quant_conv.then(|| conv(z2, z2, 1, 1, 0, device)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv(cfg.latent_channels, cfg.latent_channels, 1, 1, 0, device)),
            decoder: Decoder::new(cfg, device),
        }
    }

    /// Images in [-1, 1], [B, 3, H, W] -> latent distribution [B, C, H/8, W/8] (unscaled).
    pub fn encode(&self, images: Tensor<B, 4>) -> LatentDistribution<B> {
        let mut moments = self.encoder.forward(images);
        if let Some(q) = &self.quant_conv {
            moments = apply(q, moments);
        }
        let [mean, logvar] = split_channels(moments);
        LatentDistribution {
            mean,
            logvar: logvar.clamp(-30.0, 20.0),
        }
    }

    /// Unscaled latents -> images (nominally in [-1, 1]).
    pub fn decode(&self, z: Tensor<B, 4>) -> Tensor<B, 4> {
        let z = match &self.post_quant_conv {
            Some(p) => apply(p, z),
            None => z,
        };
        self.decoder.forward(z)
    }
}

/// `torch.chunk(moments, 2, dim=1)`.
fn split_channels<B: MicroditBackend>(x: Tensor<B, 4>) -> [Tensor<B, 4>; 2] {
    let c = x.dims()[1] / 2;
    [x.clone().narrow(1, 0, c), x.narrow(1, c, c)]
}
