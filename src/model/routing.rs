//! Token routing (TREAD: Krause et al. 2025, "Token Routing for Efficient
//! Architecture-agnostic Diffusion Training"; CompVis/tread `routing_module.py`, `dit.py`):
//! in training, a random share of the tokens entering the backbone skips a span of its
//! blocks and rejoins, unchanged, after the span's last block, so every token still reaches
//! the loss. Routing has no weights (checkpoints do not change) and never runs at sampling.
//!
//! With deferred masking on, routing chooses among the tokens masking kept.

use anyhow::{ensure, Result};
use burn::prelude::*;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::masking::{kept_tokens, PatchMask};
use crate::random::uniform;

/// Which tokens skip which blocks: a stage config's `[routing]` table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Routing {
    /// Share of the backbone's tokens that skip the span (TREAD's `selection_ratio`).
    pub share: f64,
    /// First backbone block of the span (0-based).
    pub first_block: usize,
    /// Last backbone block of the span (0-based, inclusive; default the second-to-last).
    pub last_block: Option<usize>,
}

impl Default for Routing {
    /// TREAD's recipe: half the tokens, from the second block to the second-to-last.
    fn default() -> Self {
        Self {
            share: 0.5,
            first_block: 1,
            last_block: None,
        }
    }
}

impl Routing {
    /// The span in a backbone of `depth` blocks, checked.
    pub fn span(&self, depth: usize) -> Result<RouteSpan> {
        ensure!(
            self.share > 0.0 && self.share < 1.0,
            "routing share must be in (0, 1), not {}",
            self.share
        );
        let last = self.last_block.unwrap_or(depth.saturating_sub(2));
        ensure!(
            self.first_block <= last && last < depth,
            "routing span: blocks {}..={last} do not fit a backbone of {depth} blocks \
             (first_block ≤ last_block < {depth})",
            self.first_block,
        );
        Ok(RouteSpan {
            share: self.share,
            first_block: self.first_block,
            last_block: last,
        })
    }
}

/// [`Routing`] checked against a backbone: the share, and the span's first and last block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouteSpan {
    pub share: f64,
    pub first_block: usize,
    pub last_block: usize,
}

/// How many of `tokens` go through the span: TREAD's `T − int(T · share)`.
pub fn routed_kept(tokens: usize, share: f64) -> usize {
    tokens - (tokens as f64 * share) as usize
}

/// One training step's routing: per sample, the tokens that go through the span (the
/// others skip it), and the span.
#[derive(Debug, Clone)]
pub struct TokenRoute<B: Backend> {
    pub through: PatchMask<B>,
    pub span: RouteSpan,
}

impl<B: Backend> TokenRoute<B> {
    /// From given noise `[batch * tokens]` (TREAD's `torch.rand(batch, tokens)`): the
    /// tokens of lowest noise go through the span.
    pub fn from_noise(
        noise: &[f32],
        [batch, tokens]: [usize; 2],
        span: RouteSpan,
        device: &B::Device,
    ) -> Self {
        let keep = routed_kept(tokens, span.share);
        Self {
            through: PatchMask::from_noise(noise, batch, tokens, keep, device),
            span,
        }
    }
}

/// What a training stage hides from the backbone or routes past its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sparsity {
    /// Share of the patches masking hides (0: none).
    pub mask_ratio: f64,
    pub route: Option<RouteSpan>,
}

/// Which tokens the backbone's blocks see in one training step: masking's subset, and
/// routing's within it. `all()` (no masking, no routing) at sampling.
#[derive(Debug, Clone)]
pub struct TrainingTokens<B: Backend> {
    pub mask: Option<PatchMask<B>>,
    pub route: Option<TokenRoute<B>>,
}

impl<B: Backend> TrainingTokens<B> {
    pub fn all() -> Self {
        Self {
            mask: None,
            route: None,
        }
    }

    /// Fresh draws for `batch` samples of `tokens` patches: masking's noise, then
    /// routing's over the tokens masking kept (the reference's order: `get_mask` in the
    /// forward, then the router at the span).
    pub fn draw(
        rng: &mut impl Rng,
        [batch, tokens]: [usize; 2],
        sparsity: &Sparsity,
        device: &B::Device,
    ) -> Self {
        let ratio = sparsity.mask_ratio;
        let mask = (ratio > 0.0)
            .then(|| PatchMask::random(rng, batch, tokens, kept_tokens(tokens, ratio), device));
        let kept = mask.as_ref().map_or(tokens, |m| m.ids_keep.dims()[1]);
        let route = sparsity.route.map(|span| {
            let noise = uniform(rng, batch * kept);
            TokenRoute::from_noise(&noise, [batch, kept], span, device)
        });
        Self { mask, route }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_span_defaults_to_treads_and_refuses_what_does_not_fit() {
        let span = |r: Routing, depth| r.span(depth).map(|s| (s.first_block, s.last_block));
        assert_eq!(span(Routing::default(), 4).unwrap(), (1, 2));
        assert_eq!(span(Routing::default(), 28).unwrap(), (1, 26));
        let late = Routing {
            last_block: Some(4),
            ..Routing::default()
        };
        let err = late.span(4).unwrap_err().to_string();
        assert!(
            err.contains("blocks 1..=4 do not fit a backbone of 4 blocks"),
            "{err}"
        );
        let none = Routing {
            share: 1.0,
            ..Routing::default()
        };
        assert!(none.span(4).unwrap_err().to_string().contains("(0, 1)"));
        assert!(Routing::default().span(2).is_err());
    }

    #[test]
    fn routed_counts_round_as_tread_does() {
        // TREAD drops int(T · share) tokens; masking keeps int(T · (1 − share)).
        assert_eq!(routed_kept(48, 0.3), 34);
        assert_eq!(kept_tokens(48, 0.3), 33);
        assert_eq!(routed_kept(64, 0.5), 32);
    }
}
