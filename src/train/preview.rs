//! Sample grids during training: fixed caption embeddings (read from a file, so the text
//! encoder is never loaded while training) sampled with the current weights every few steps.

use std::path::{Path, PathBuf};

use crate::backend::Backend;
use anyhow::{ensure, Context, Result};
use burn::prelude::*;

use crate::edm::generate::{sample_latents, SamplerSettings};
use crate::edm::{karras_sigmas, Churn, EdmConfig, Solver};
use crate::hub::Hub;
use crate::model::MicroDit;
use crate::state_dict::read_state_dict;
use crate::vae::{vae_subfolder, AutoencoderKl, VaeConfig};

pub struct Preview<B: Backend> {
    /// [N, L, Cc] caption embeddings.
    captions: Tensor<B, 3>,
    vae: Option<(AutoencoderKl<B>, VaeConfig)>,
    settings: SamplerSettings,
    dir: PathBuf,
}

impl<B: Backend> Preview<B> {
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
        let vae = match vae {
            Some(source) => Some(AutoencoderKl::<B>::from_source(
                source,
                vae_subfolder(source),
                &Hub::from_env(),
                device,
            )?),
            None => None,
        };
        let edm = EdmConfig::default();
        Ok(Self {
            captions: Tensor::from_data(TensorData::new(data.to_vec::<f32>()?, [n, l, c]), device),
            vae,
            settings: SamplerSettings {
                sigmas: karras_sigmas(&edm, steps),
                solver: Solver::Heun,
                churn: Churn::default(),
                guidance,
                guidance_interval: (0.0, f64::INFINITY),
            },
            dir: run.join("samples"),
        })
    }

    /// Writes `samples/step-NNNNNNNN.png`: one tile per caption, seeds 0, 1, ….
    pub fn render(&self, model: &MicroDit<B>, shape: [usize; 3], step: usize) -> Result<PathBuf> {
        let [c, s, _] = shape;
        let n = self.captions.dims()[0];
        let mut tiles = Vec::new();
        let mut side = s;
        for i in 0..n {
            let y = self.captions.clone().narrow(0, i, 1);
            let z = sample_latents(
                model,
                &EdmConfig::default(),
                y,
                [1, c, s, s],
                i as u64,
                &self.settings,
                |_| {},
            );
            let image = match &self.vae {
                Some((vae, cfg)) => vae.decode(cfg.from_model_latents(z)),
                // Latent preview: the first three channels, roughly in [-1, 1].
                None => {
                    z.narrow(1, 0, c.min(3))
                        .repeat_dim(1, 3usize.div_ceil(c.min(3)))
                        .narrow(1, 0, 3)
                        / 2.0
                }
            };
            side = image.dims()[2];
            tiles.push(crate::image::to_rgb8(image)?);
        }
        let path = self.dir.join(format!("step-{step:08}.png"));
        crate::image::write_grid(
            &path,
            &tiles.iter().map(Vec::as_slice).collect::<Vec<_>>(),
            side,
        )?;
        Ok(path)
    }
}
