//! Token subsets for sparse training: deferred masking hides a random share of the patches
//! from the backbone (MicroDiT), routing carries a random share past a span of its blocks
//! (TREAD, `routing.rs`). Both choose tokens the same way and gather and restore them here.

use burn::prelude::*;
use rand::Rng;

use crate::random::uniform;

/// Which tokens are kept, per sample, as the reference's `get_mask` (and TREAD's
/// `Router.get_mask`) chooses them: sort per-token uniform noise, keep the K lowest.
#[derive(Debug, Clone)]
pub struct PatchMask<B: Backend> {
    /// [B, K] kept token indices, in order of increasing noise.
    pub ids_keep: Tensor<B, 2, Int>,
    /// [B, T − K] the other tokens' indices, in order of increasing noise.
    ids_dropped: Tensor<B, 2, Int>,
    /// [B, T] position of each token in the (kept ++ dropped) order.
    pub ids_restore: Tensor<B, 2, Int>,
    /// [B, T] 1 where a patch was dropped, 0 where it was kept.
    pub mask: Tensor<B, 2>,
}

/// How many of `tokens` patches masking keeps: the reference's `int(T * (1 - ratio))`.
pub fn kept_tokens(tokens: usize, ratio: f64) -> usize {
    (tokens as f64 * (1.0 - ratio)) as usize
}

impl<B: Backend> PatchMask<B> {
    /// The `keep` tokens of lowest noise, from given noise `[batch * tokens]` (row-major),
    /// as the fixtures provide it.
    pub fn from_noise(
        noise: &[f32],
        batch: usize,
        tokens: usize,
        keep: usize,
        device: &B::Device,
    ) -> Self {
        assert_eq!(
            noise.len(),
            batch * tokens,
            "mask noise must hold batch * tokens values"
        );
        assert!(keep <= tokens, "cannot keep {keep} of {tokens} tokens");
        let (mut ids_keep, mut ids_dropped, mut ids_restore, mut mask) = (
            Vec::new(),
            Vec::new(),
            vec![0i64; batch * tokens],
            vec![1f32; batch * tokens],
        );
        for b in 0..batch {
            let row = &noise[b * tokens..(b + 1) * tokens];
            let mut order: Vec<usize> = (0..tokens).collect();
            order.sort_by(|&i, &j| row[i].total_cmp(&row[j]));
            for (rank, &token) in order.iter().enumerate() {
                ids_restore[b * tokens + token] = rank as i64;
                if rank < keep {
                    mask[b * tokens + token] = 0.0;
                }
            }
            ids_keep.extend(order[..keep].iter().map(|&i| i as i64));
            ids_dropped.extend(order[keep..].iter().map(|&i| i as i64));
        }
        Self {
            ids_keep: Tensor::from_data(TensorData::new(ids_keep, [batch, keep]), device),
            ids_dropped: Tensor::from_data(
                TensorData::new(ids_dropped, [batch, tokens - keep]),
                device,
            ),
            ids_restore: Tensor::from_data(TensorData::new(ids_restore, [batch, tokens]), device),
            mask: Tensor::from_data(TensorData::new(mask, [batch, tokens]), device),
        }
    }

    /// The `keep` tokens of lowest noise, the noise drawn from `rng`.
    pub fn random(
        rng: &mut impl Rng,
        batch: usize,
        tokens: usize,
        keep: usize,
        device: &B::Device,
    ) -> Self {
        Self::from_noise(&uniform(rng, batch * tokens), batch, tokens, keep, device)
    }

    /// [B, T, D] -> [B, K, D]: the kept tokens.
    pub fn keep(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        gather_tokens(x, &self.ids_keep)
    }

    /// [B, K, D] -> [B, T, D]: kept tokens back in place, `fill` [1, 1, D] everywhere else.
    pub fn restore(&self, x: Tensor<B, 3>, fill: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, k, d] = x.dims();
        let [_, t] = self.ids_restore.dims();
        self.put_back(x, fill.expand([b, t - k, d]))
    }

    /// [B, K, D] -> [B, T, D]: kept tokens back in place, every other token as it is in
    /// `others` [B, T, D] (routed tokens rejoining the ones that went through the span).
    pub fn merge(&self, x: Tensor<B, 3>, others: Tensor<B, 3>) -> Tensor<B, 3> {
        self.put_back(x, gather_tokens(others, &self.ids_dropped))
    }

    /// Kept tokens [B, K, D] and the others [B, T − K, D] (in `ids_dropped`'s order) back
    /// in their places.
    fn put_back(&self, x: Tensor<B, 3>, dropped: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, _, d] = x.dims();
        let [_, t] = self.ids_restore.dims();
        Tensor::cat(vec![x, dropped], 1).gather(
            1,
            self.ids_restore
                .clone()
                .reshape([b, t, 1])
                .expand([b, t, d]),
        )
    }
}

/// [B, T, D] -> [B, N, D]: the tokens `ids` [B, N] names, in its order.
fn gather_tokens<B: Backend>(x: Tensor<B, 3>, ids: &Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [b, _, d] = x.dims();
    let [_, n] = ids.dims();
    x.gather(1, ids.clone().reshape([b, n, 1]).expand([b, n, d]))
}
