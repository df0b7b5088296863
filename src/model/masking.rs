//! Patch masking for sparse training: the backbone sees only the kept patches.

use burn::prelude::*;
use rand::{Rng, RngExt};

/// Which patches survive, per sample, as the reference's `get_mask` chooses them:
/// sort per-patch uniform noise, keep the `int(T * (1 - ratio))` lowest.
#[derive(Debug, Clone)]
pub struct PatchMask<B: Backend> {
    /// [B, K] kept token indices, in order of increasing noise.
    pub ids_keep: Tensor<B, 2, Int>,
    /// [B, T] position of each token in the (kept ++ dropped) order.
    pub ids_restore: Tensor<B, 2, Int>,
    /// [B, T] 1 where a patch was dropped, 0 where it was kept.
    pub mask: Tensor<B, 2>,
}

pub fn kept_tokens(tokens: usize, ratio: f64) -> usize {
    (tokens as f64 * (1.0 - ratio)) as usize
}

impl<B: Backend> PatchMask<B> {
    /// From given noise `[batch * tokens]` (row-major), as the fixtures provide it.
    pub fn from_noise(
        noise: &[f32],
        batch: usize,
        tokens: usize,
        ratio: f64,
        device: &B::Device,
    ) -> Self {
        assert_eq!(
            noise.len(),
            batch * tokens,
            "mask noise must hold batch * tokens values"
        );
        let keep = kept_tokens(tokens, ratio);
        let (mut ids_keep, mut ids_restore, mut mask) = (
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
        }
        Self {
            ids_keep: Tensor::from_data(TensorData::new(ids_keep, [batch, keep]), device),
            ids_restore: Tensor::from_data(TensorData::new(ids_restore, [batch, tokens]), device),
            mask: Tensor::from_data(TensorData::new(mask, [batch, tokens]), device),
        }
    }

    pub fn random(
        rng: &mut impl Rng,
        batch: usize,
        tokens: usize,
        ratio: f64,
        device: &B::Device,
    ) -> Self {
        let noise: Vec<f32> = (0..batch * tokens).map(|_| rng.random::<f32>()).collect();
        Self::from_noise(&noise, batch, tokens, ratio, device)
    }

    /// [B, T, D] -> [B, K, D]: the kept tokens.
    pub fn keep(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, _, d] = x.dims();
        let [_, k] = self.ids_keep.dims();
        x.gather(
            1,
            self.ids_keep.clone().reshape([b, k, 1]).expand([b, k, d]),
        )
    }

    /// [B, K, D] -> [B, T, D]: kept tokens back in place, `fill` [1, 1, D] everywhere else.
    pub fn restore(&self, x: Tensor<B, 3>, fill: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, k, d] = x.dims();
        let [_, t] = self.ids_restore.dims();
        let dropped = fill.expand([b, t - k, d]);
        Tensor::cat(vec![x, dropped], 1).gather(
            1,
            self.ids_restore
                .clone()
                .reshape([b, t, 1])
                .expand([b, t, d]),
        )
    }
}
