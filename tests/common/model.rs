//! A tiny text-to-image model for end-to-end tests: the fixtures' text tower and VAE, and a
//! small MicroDiT with random weights made here.

use std::path::{Path, PathBuf};

use burn::module::Module;
use microdit::backend::Cpu;
use microdit::model::init::{Perturb, RANDOM_WEIGHTS_NOISE};
use microdit::model::weights::save_weights;
use microdit::model::{DitConfig, Init, MicroDit};

pub struct TinyModel {
    _dir: tempfile::TempDir,
    /// A scratch folder that lives as long as the model.
    pub root: PathBuf,
    /// The model options of `generate` and `serve`: `resolution` px images, 3 steps.
    pub args: Vec<String>,
    /// Image side: 16 px, or the least the fixture VAE's downscale allows.
    pub resolution: usize,
}

pub fn tiny_model() -> TinyModel {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    // Whichever sets come first: every size below is taken from them.
    let text = super::fixture_sets("clip-text").remove(0);
    let vae = super::fixture_sets("vae").remove(0);
    let dit = super::fixture_sets("dit").remove(0);
    let width = microdit::text::ClipTextConfig::from_file(&text.join("open_clip_config.json"))
        .unwrap()
        .width;
    let vae_cfg = microdit::vae::VaeConfig::from_file(&vae.join("config.json")).unwrap();
    let base = DitConfig::from_file(&dit.join("config.json")).unwrap();
    let unit = vae_cfg.downscale() * base.patch_size;
    let resolution = 16usize.max(2 * unit).next_multiple_of(unit);
    let cfg = DitConfig {
        caption_channels: width,
        in_channels: vae_cfg.latent_channels,
        input_size: resolution / vae_cfg.downscale(),
        ..base
    };
    std::fs::write(root.join("dit.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    // The reference init zeroes the output layers, so a fresh model denoises to the same
    // image in any precision; perturbed weights make the network matter.
    let model = MicroDit::<Cpu>::new(&cfg, &mut Init::reference(1, &Default::default()))
        .map(&mut Perturb::new(1, RANDOM_WEIGHTS_NOISE));
    save_weights(&model, &root.join("dit.safetensors")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let args = vec![
        "--model".into(),
        s(&root.join("dit.json")),
        "--checkpoint".into(),
        s(&root.join("dit.safetensors")),
        "--vae".into(),
        s(&vae),
        "--text-encoder".into(),
        s(&text),
        "--resolution".into(),
        resolution.to_string(),
        "--steps".into(),
        "3".into(),
    ];
    TinyModel {
        _dir: dir,
        root,
        args,
        resolution,
    }
}
