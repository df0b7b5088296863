//! Sample grids during training: fixed caption embeddings (read from a file, so the text
//! encoder is never loaded while training) sampled with the current weights every few steps.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use burn::prelude::*;

use crate::backend::MicroditBackend;
use crate::edm::EdmConfig;
use crate::hub::Hub;
use crate::model::MicroDit;
use crate::pipeline::{sample_latents, Image, Sampling};
use crate::state_dict::read_state_dict;
use crate::vae::LatentCodec;

pub struct Preview<B: MicroditBackend> {
    /// [N, L, Cc] caption embeddings.
    captions: Tensor<B, 3>,
    /// Without one, the grid shows the first three latent channels.
    codec: Option<LatentCodec<B>>,
    sampling: Sampling,
    dir: PathBuf,
}

impl<B: MicroditBackend> Preview<B> {
    /// `captions`: a safetensors file whose `caption_latents` tensor is [N, L, Cc] or
    /// [N, 1, L, Cc]; `vae`: a directory or Hub repo to decode with (without one the grid
    /// shows the first three latent channels).
    pub fn new(
        captions: &Path,
        vae: Option<&str>,
        steps: usize,
        guidance: f64,
        run: &Path,
        device: &B::Device,
    ) -> Result<Self> {
        let tensors = read_state_dict(captions)?;
        let t = tensors
            .get("caption_latents")
            .with_context(|| format!("{} has no 'caption_latents' tensor", captions.display()))?;
        let shape = t.shape.to_vec();
        let data = t
            .to_data()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .convert::<f32>();
        let (n, l, c) = match shape.as_slice() {
            [n, l, c] | [n, 1, l, c] => (*n, *l, *c),
            other => anyhow::bail!(
                "caption_latents of shape {other:?}: expected [N, L, C] or [N, 1, L, C]"
            ),
        };
        ensure!(n > 0, "no preview captions in {}", captions.display());
        let codec = match vae {
            Some(source) => Some(LatentCodec::load(source, &Hub::from_env(), device)?),
            None => None,
        };
        Ok(Self {
            captions: Tensor::from_data(TensorData::new(data.to_vec::<f32>()?, [n, l, c]), device),
            codec,
            sampling: Sampling::heun(steps, guidance),
            dir: run.join(crate::run_dir::SAMPLES),
        })
    }

    /// Writes `samples/step-NNNNNNNN.png`: one tile per caption, seeds 0, 1, ….
    pub fn render(&self, model: &MicroDit<B>, shape: [usize; 3], step: usize) -> Result<PathBuf> {
        let [c, s, _] = shape;
        let n = self.captions.dims()[0];
        let mut tiles = Vec::new();
        for i in 0..n {
            let y = self.captions.clone().narrow(0, i, 1);
            let edm = EdmConfig::default();
            let z = sample_latents(
                model,
                &edm,
                y,
                [1, c, s, s],
                i as u64,
                &self.sampling,
                |_| {},
            );
            let image = match &self.codec {
                Some(codec) => codec.decode(z),
                // Latent preview: the first three channels, roughly in [-1, 1].
                None => {
                    z.narrow(1, 0, c.min(3))
                        .repeat_dim(1, 3usize.div_ceil(c.min(3)))
                        .narrow(1, 0, 3)
                        / 2.0
                }
            };
            tiles.push(Image::from_tensor(image)?);
        }
        let path = self.dir.join(format!("step-{step:08}.png"));
        let rgb: Vec<&[u8]> = tiles.iter().map(|t| t.rgb.as_slice()).collect();
        crate::png_io::write_grid(&path, &rgb, tiles[0].side)?;
        Ok(path)
    }
}
