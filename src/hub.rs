//! Where weights come from: a local directory, or a Hugging Face Hub repository through the
//! `hf-hub` crate and its cache (`HF_HOME`, `HF_HUB_OFFLINE` honoured as by the Python hub).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

/// The frozen parts and checkpoints the published model uses.
pub mod known {
    pub const CLIP_TEXT: &str = "apple/DFN5B-CLIP-ViT-H-14-378";
    pub const SDXL_VAE: &str = "stabilityai/stable-diffusion-xl-base-1.0";
    pub const SDXL_VAE_SUBFOLDER: &str = "vae";
    pub const SDXL_VAE_FP16_FIX: &str = "madebyollin/sdxl-vae-fp16-fix";
    pub const VAE_16_CHANNEL: &str = "ostris/vae-kl-f8-d16";
    pub const MICRODIT: &str = "VSehwag24/MicroDiT";
}

pub struct Hub {
    cache: Cache,
    offline: bool,
}

impl Hub {
    /// The Python hub's cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`); offline
    /// when `HF_HUB_OFFLINE` is set to 1/true/yes.
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        Self {
            cache: Cache::from_env(),
            offline,
        }
    }

    pub fn new(cache_dir: PathBuf, offline: bool) -> Self {
        Self {
            cache: Cache::new(cache_dir),
            offline,
        }
    }

    /// `file` of `source`: a local directory (used as is), or a Hub repository id, looked up
    /// in the cache first and downloaded when online.
    pub fn file(&self, source: &str, file: &str) -> Result<PathBuf> {
        let local = Path::new(source);
        if local.is_dir() {
            let path = local.join(file);
            if !path.exists() {
                bail!("{} has no {file}", local.display());
            }
            return Ok(path);
        }
        if let Some(path) = self.cache.model(source.to_string()).get(file) {
            return Ok(path);
        }
        let hint = format!(
            "fetch it on a connected machine with `huggingface-cli download {source} {file}` and copy \
             the Hugging Face cache ({}) here, or pass a local directory that holds {file}",
            self.cache.path().display()
        );
        if self.offline {
            bail!("{file} of {source} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: {hint}");
        }
        let api = ApiBuilder::from_cache(self.cache.clone())
            .with_progress(true)
            .build()?;
        api.model(source.to_string())
            .get(file)
            .map_err(|e| anyhow::anyhow!("could not download {file} of {source} ({e}): {hint}"))
    }
}
