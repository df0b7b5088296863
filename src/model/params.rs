//! Parameter counts from the config alone (no weights allocated), part by part.

use super::config::{BlockShape, DitConfig};
use super::embeddings::TIMESTEP_FREQUENCIES;

fn linear(d_in: usize, d_out: usize, bias: bool) -> usize {
    d_in * d_out + if bias { d_out } else { 0 }
}

/// Weight-only LayerNorm, then linear.
fn norm_linear(d_in: usize, d_out: usize, bias: bool) -> usize {
    d_in + linear(d_in, d_out, bias)
}

fn swiglu(dim: usize, hidden: usize, bias: bool) -> usize {
    2 * linear(dim, hidden, bias) + linear(hidden, dim, bias)
}

fn self_attention(dim: usize, qkv: usize, bias: bool) -> usize {
    linear(dim, 3 * qkv, bias) + linear(qkv, dim, bias)
}

fn dit_block(s: &BlockShape, cfg: &DitConfig) -> usize {
    let (d, bias) = (s.dim, cfg.use_bias);
    let cross = linear(d, d, bias) + linear(d, 2 * d, bias) + linear(d, d, bias);
    let ffn = if s.moe {
        2 * cfg.num_experts * d * s.expert_hidden() + d * cfg.num_experts
    } else {
        swiglu(d, s.swiglu_hidden(), bias)
    };
    3 * d + self_attention(d, s.qkv_dim, bias) + cross + ffn + linear(cfg.dim, 6 * d, true)
}

/// (part, parameters) in model order; the sum is the model's parameter count.
pub fn param_breakdown(cfg: &DitConfig) -> Vec<(&'static str, usize)> {
    let (d, bias) = (cfg.dim, cfg.use_bias);
    let mlp_with_norm = |d_in: usize| linear(d_in, d, true) + d + linear(d, d, true);
    let caption = cfg.caption_block();
    let mut parts = vec![
        ("patch embedding", cfg.patch_dim() * d + d),
        (
            "noise-level embedding",
            linear(TIMESTEP_FREQUENCIES, d, true) + linear(d, d, true),
        ),
        ("caption projection", mlp_with_norm(cfg.caption_channels)),
        (
            "caption attention block",
            2 * d + self_attention(d, d, bias) + swiglu(d, caption.swiglu_hidden(), bias),
        ),
        ("pooled caption MLP", mlp_with_norm(d)),
        (
            "patch-mixer blocks",
            cfg.mixer_blocks().iter().map(|s| dit_block(s, cfg)).sum(),
        ),
    ];
    if cfg.has_mixer_projections() {
        let m = cfg.patch_mixer_dim;
        parts.push((
            "patch-mixer projections",
            2 * norm_linear(d, m, bias) + norm_linear(m, d, bias),
        ));
    }
    let blocks = cfg.backbone_blocks();
    let (moe, dense): (Vec<&BlockShape>, Vec<&BlockShape>) = blocks.iter().partition(|s| s.moe);
    parts.push((
        "backbone dense blocks",
        dense.iter().map(|s| dit_block(s, cfg)).sum(),
    ));
    parts.push((
        "backbone expert blocks",
        moe.iter().map(|s| dit_block(s, cfg)).sum(),
    ));
    parts.push((
        "final layer",
        d + linear(d, cfg.patch_dim(), true) + linear(d, 2 * d, true),
    ));
    parts
}

pub fn param_count(cfg: &DitConfig) -> usize {
    param_breakdown(cfg).iter().map(|(_, n)| n).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::model::{Init, MicroDit};
    use burn::module::Module;

    #[test]
    fn presets_have_the_published_parameter_counts() {
        let tiny = DitConfig::preset("MicroDiT_Tiny_2").unwrap();
        let xl = DitConfig::preset("MicroDiT_XL_2").unwrap();
        assert_eq!(param_count(&tiny), 200_692_752);
        assert_eq!(param_count(&xl), 1_165_442_320);
        assert_eq!(
            param_count(&DitConfig {
                in_channels: 16,
                ..xl.clone()
            }),
            1_165_540_672
        );
        assert_eq!(
            param_count(
                &crate::model::config::ModelChoice {
                    resolution: Some(512),
                    ..crate::model::config::ModelChoice::new("MicroDiT_XL_2")
                }
                .resolve()
                .unwrap()
            ),
            1_165_442_320,
            "positions are a buffer, not parameters"
        );
    }

    #[test]
    fn counting_agrees_with_the_built_model() {
        let base = DitConfig {
            input_size: 8,
            patch_size: 2,
            in_channels: 4,
            dim: 64,
            depth: 4,
            head_dim: 16,
            multiple_of: 16,
            caption_channels: 24,
            pos_interp_scale: 1.0,
            norm_eps: 1e-6,
            depth_init: true,
            qkv_multipliers: vec![0.5, 1.0],
            ffn_multipliers: vec![1.0, 4.0],
            use_patch_mixer: true,
            patch_mixer_depth: 3,
            patch_mixer_dim: 48,
            patch_mixer_qkv_ratio: 0.5,
            patch_mixer_mlp_ratio: 2.0,
            use_bias: false,
            num_experts: 3,
            expert_capacity: 1.5,
            experts_every_n: 2,
        };
        let variants = [
            base.clone(),
            DitConfig {
                use_bias: true,
                ..base.clone()
            },
            DitConfig {
                patch_mixer_dim: 64,
                experts_every_n: 1,
                in_channels: 16,
                ..base.clone()
            },
        ];
        let device = Default::default();
        for cfg in variants {
            let model = MicroDit::<Cpu>::new(&cfg, &mut Init::empty(&device));
            assert_eq!(model.num_params(), param_count(&cfg), "{cfg:?}");
        }
    }
}
