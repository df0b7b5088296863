//! A tiny text-to-image model for end-to-end tests: the fixtures' text tower and VAE, and a
//! small MicroDiT with random weights made here.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Distribution, Tensor};
use microdit::backend::Cpu;
use microdit::model::weights::save_weights;
use microdit::model::{DitConfig, Init, MicroDit};

pub struct TinyModel {
    _dir: tempfile::TempDir,
    /// A scratch folder that lives as long as the model.
    pub root: PathBuf,
    /// The model options of `generate` and `serve`: 16 px images, 3 steps.
    pub args: Vec<String>,
}

/// Adds N(0, 0.05²) noise to every parameter.
struct Perturb;

impl ModuleMapper<Cpu> for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<Cpu, D>>) -> Param<Tensor<Cpu, D>> {
        param.map(|t| {
            let noise = Tensor::random(t.shape(), Distribution::Normal(0.0, 0.05), &t.device());
            t + noise
        })
    }
}

pub fn tiny_model() -> TinyModel {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let text = super::fixture_dirs_with("open_clip_config.json").remove(0);
    let vae = super::fixture_dirs_with("diffusion_pytorch_model.safetensors").remove(0);
    let width = microdit::text::ClipTextConfig::from_file(&text.join("open_clip_config.json"))
        .unwrap()
        .width;
    let cfg = DitConfig {
        caption_channels: width,
        ..DitConfig::from_file(&super::fixtures_dir().join("dit-tiny/config.json")).unwrap()
    };
    std::fs::write(root.join("dit.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    // The reference init zeroes the output layers, so a fresh model denoises to the same
    // image in any precision; perturbed weights make the network matter.
    let model =
        MicroDit::<Cpu>::new(&cfg, &mut Init::reference(1, &Default::default())).map(&mut Perturb);
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
        "16".into(),
        "--steps".into(),
        "3".into(),
    ];
    TinyModel {
        _dir: dir,
        root,
        args,
    }
}
