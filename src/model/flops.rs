//! Floating-point operations of one forward pass, from the config alone: matrix products
//! (2 per multiply-add) and the attention score and value products. What model FLOPs
//! utilisation (MFU) counts; element-wise work is left out, as is customary. A training
//! step costs three forward passes (the backward pass two).

use super::config::{BlockShape, DitConfig};
use super::embeddings::TIMESTEP_FREQUENCIES;

/// 2·m·k·n: one `[m, k] @ [k, n]` product.
fn product(m: usize, k: usize, n: usize) -> f64 {
    2.0 * m as f64 * k as f64 * n as f64
}

/// Self-attention over `t` tokens of width `d` with q/k/v width `q`: projections, scores
/// and the weighted sum.
fn self_attention(t: usize, d: usize, q: usize) -> f64 {
    product(t, d, 3 * q) + product(t, q, d) + 2.0 * product(t, q, t)
}

/// One DiT block over `t` tokens, cross-attending to `l` caption tokens of width `d`.
fn block(s: &BlockShape, cfg: &DitConfig, t: usize, l: usize) -> f64 {
    let d = s.dim;
    let cross = product(t, d, d) + product(l, d, 2 * d) + 2.0 * product(t, d, l) + product(t, d, d);
    let ffn = if s.moe {
        let (e, k) = (cfg.num_experts, cfg.tokens_per_expert(t));
        product(t, d, e)
            + e as f64 * (product(k, d, s.expert_hidden()) + product(k, s.expert_hidden(), d))
    } else {
        3.0 * product(t, d, s.swiglu_hidden())
    };
    product(1, cfg.dim, 6 * d) + self_attention(t, d, s.qkv_dim) + cross + ffn
}

/// FLOPs of one sample's forward pass with `kept` of the image tokens reaching the backbone
/// (all of them unmasked) and `caption_len` caption tokens.
pub fn forward_flops(cfg: &DitConfig, caption_len: usize, kept: usize) -> f64 {
    let (t, l, d) = (cfg.num_tokens(), caption_len, cfg.dim);
    let caption = cfg.caption_block();
    let mut total = product(t, cfg.patch_dim(), d)
        + product(1, TIMESTEP_FREQUENCIES, d)
        + product(1, d, d)
        + product(l, cfg.caption_channels, d)
        + product(l, d, d)
        + self_attention(l, d, d)
        + 3.0 * product(l, d, caption.swiglu_hidden())
        + 2.0 * product(1, d, d);
    total += cfg
        .mixer_blocks()
        .iter()
        .map(|s| block(s, cfg, t, l))
        .sum::<f64>();
    if cfg.has_mixer_projections() {
        let m = cfg.patch_mixer_dim;
        total += product(t, d, m) + product(l, d, m) + product(kept, m, d);
    }
    total += cfg
        .backbone_blocks()
        .iter()
        .map(|s| block(s, cfg, kept, l))
        .sum::<f64>();
    total + product(1, d, 2 * d) + product(kept, d, cfg.patch_dim())
}

/// FLOPs of a training step on `batch` samples: forward and backward (3 forwards).
pub fn train_step_flops(cfg: &DitConfig, caption_len: usize, kept: usize, batch: usize) -> f64 {
    3.0 * batch as f64 * forward_flops(cfg, caption_len, kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xl_forward_is_dominated_by_the_backbone_and_scales_with_kept_tokens() {
        let xl = DitConfig::preset("MicroDiT_XL_2").unwrap();
        let full = forward_flops(&xl, 77, 256);
        let masked = forward_flops(&xl, 77, 64);
        // About 2 FLOPs per active parameter per token: hundreds of GFLOPs at 256 tokens.
        assert!((1e11..1e12).contains(&full), "{full:e}");
        assert!(
            masked < 0.5 * full && masked > 0.15 * full,
            "{masked:e} vs {full:e}"
        );
    }
}
