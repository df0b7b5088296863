//! A fixed latent codec for tiny images: each `factor`×`factor` block of pixels becomes
//! `3·factor²` channels. Lossless and free, so the demo can train on a
//! CPU in minutes without first training a VAE; its "latents" are just rearranged pixels.

use burn::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpaceToDepth {
    pub factor: usize,
}

/// How configs and settings name the codec: `space-to-depth:F`.
const NAME_PREFIX: &str = "space-to-depth:";

impl SpaceToDepth {
    pub fn name(&self) -> String {
        format!("{NAME_PREFIX}{}", self.factor)
    }

    /// The codec a name means, `None` when the name is not `space-to-depth:…`.
    pub fn from_name(name: &str) -> Option<anyhow::Result<Self>> {
        let factor = name.strip_prefix(NAME_PREFIX)?;
        Some(
            factor
                .parse()
                .ok()
                .filter(|&f| f > 0)
                .map(|factor| Self { factor })
                .ok_or_else(|| anyhow::anyhow!("{name}: the factor must be a positive integer")),
        )
    }

    pub fn channels(&self) -> usize {
        3 * self.factor * self.factor
    }

    /// `[B, 3, H, W]` → `[B, 3·f², H/f, W/f]`, channel index `c·f² + dy·f + dx`.
    pub fn encode<B: Backend>(&self, images: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = images.dims();
        let f = self.factor;
        images
            .reshape([b, c, h / f, f, w / f, f])
            .permute([0, 1, 3, 5, 2, 4])
            .reshape([b, c * f * f, h / f, w / f])
    }

    /// The inverse of [`Self::encode`].
    pub fn decode<B: Backend>(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, cf, h, w] = latents.dims();
        let f = self.factor;
        let c = cf / (f * f);
        latents
            .reshape([b, c, f, f, h, w])
            .permute([0, 1, 4, 2, 5, 3])
            .reshape([b, c, h * f, w * f])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuDevice};

    #[test]
    fn decode_inverts_encode_and_blocks_become_channels() {
        let codec = SpaceToDepth { factor: 2 };
        let values: Vec<f32> = (0..2 * 3 * 4 * 6).map(|v| v as f32).collect();
        let x = Tensor::<Cpu, 4>::from_data(
            TensorData::new(values, [2, 3, 4, 6]),
            &CpuDevice::default(),
        );
        let z = codec.encode(x.clone());
        assert_eq!(z.dims(), [2, 12, 2, 3]);
        // Channel 1 of latent pixel (0, 0) is image pixel (row 0, column 1) of colour 0.
        let z0: Vec<f32> = z.clone().into_data().into_vec().unwrap();
        assert_eq!(z0[2 * 3], 1.0);
        let back: Vec<f32> = codec.decode(z).into_data().into_vec().unwrap();
        assert_eq!(back, x.into_data().into_vec::<f32>().unwrap());
    }
}
