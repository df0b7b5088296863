//! Initialisation, checkpoint saving/loading and the errors a wrong checkpoint gives.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use microdit::backend::Cpu;
use microdit::model::weights::{load_weights, save_weights};
use microdit::model::{DitConfig, Init, MicroDit};
use microdit::state_dict::{reference_tensors, DIT_KEYS};

type B = Cpu;

/// Every denoiser fixture set: its folder and configuration.
fn dit_sets() -> Vec<(PathBuf, DitConfig)> {
    common::fixture_sets("dit")
        .into_iter()
        .map(|dir| {
            let cfg = DitConfig::from_file(&dir.join("config.json")).unwrap();
            (dir, cfg)
        })
        .collect()
}

fn values(t: &BTreeMap<String, TensorData>, name: &str) -> Vec<f32> {
    t.get(name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .clone()
        .convert::<f32>()
        .to_vec()
        .unwrap()
}

fn std_dev(v: &[f32]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt()
}

fn init(cfg: &DitConfig, seed: u64) -> BTreeMap<String, TensorData> {
    let device = Default::default();
    let model = MicroDit::<B>::new(cfg, &mut Init::reference(seed, &device));
    reference_tensors(&model, &DIT_KEYS).unwrap()
}

#[test]
fn from_scratch_initialisation_follows_the_reference_scheme() {
    let cfg = DitConfig {
        input_size: 8,
        dim: 256,
        depth: 4,
        head_dim: 32,
        caption_channels: 32,
        qkv_multipliers: vec![1.0],
        ffn_multipliers: vec![4.0],
        depth_init: true,
        use_patch_mixer: true,
        patch_mixer_depth: 2,
        patch_mixer_dim: 192,
        ..DitConfig::preset("MicroDiT_XL_2").unwrap()
    };
    let t = init(&cfg, 7);
    for (name, data) in &t {
        let v = data.clone().convert::<f32>().to_vec::<f32>().unwrap();
        let zero = name.contains("adaLN_modulation")
            || name.starts_with("final_layer.linear")
            || name == "y_emb_preprocess.attn.proj.weight"
            || name == "y_emb_preprocess.mlp.w3.weight"
            || name.ends_with(".bias");
        if zero {
            assert!(v.iter().all(|&x| x == 0.0), "{name} should start at zero");
        } else if name.contains("norm") && !name.contains("_map_")
            || name.ends_with(".0.weight") && name.contains("_map_")
        {
            assert!(
                v.iter().all(|&x| x == 1.0),
                "{name} (LayerNorm scale) should start at one"
            );
        }
    }
    // Depth-scaled output projections: std 0.02 / sqrt(2 (i + 1)) in backbone block i.
    let s = std_dev(&values(&t, "blocks.3.attn.proj.weight"));
    assert!(
        (s / (0.02 / 8f64.sqrt()) - 1.0).abs() < 0.1,
        "blocks.3.attn.proj std {s}"
    );
    let s = std_dev(&values(&t, "blocks.0.attn.qkv.weight"));
    assert!((s / 0.02 - 1.0).abs() < 0.1, "qkv std {s}");
    // Mixer blocks use the depth-independent 0.02 / sqrt(2 depth).
    let s = std_dev(&values(&t, "patch_mixer.0.mlp.w3.weight"));
    assert!(
        (s / (0.02 / (2.0 * cfg.depth as f64).sqrt()) - 1.0).abs() < 0.1,
        "mixer w3 std {s}"
    );
    // Xavier-uniform base init of the mixer projections.
    let v = values(&t, "patch_mixer_map_xin.1.weight");
    let bound = (6.0 / (256.0 + 192.0f64)).sqrt();
    assert!(v.iter().all(|&x| (x as f64).abs() <= bound));
    assert!((std_dev(&v) / (bound / 3f64.sqrt()) - 1.0).abs() < 0.1);

    assert_eq!(t, init(&cfg, 7), "same seed, same model");
    assert_ne!(
        values(&t, "blocks.0.attn.qkv.weight"),
        values(&init(&cfg, 8), "blocks.0.attn.qkv.weight")
    );
}

#[test]
fn saved_weights_load_back_identically() {
    let (_, cfg) = dit_sets().remove(0);
    let device = Default::default();
    let model = MicroDit::<B>::new(&cfg, &mut Init::reference(3, &device));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    save_weights(&model, &path).unwrap();
    let loaded = load_weights(MicroDit::<B>::new(&cfg, &mut Init::empty(&device)), &path).unwrap();
    assert_eq!(
        reference_tensors(&model, &DIT_KEYS).unwrap(),
        reference_tensors(&loaded, &DIT_KEYS).unwrap()
    );
    // Buffers are written too, so the reference `load_state_dict` accepts the file.
    let bytes = std::fs::read(&path).unwrap();
    let names = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    assert!(names.contains(&"pos_embed".to_string()) && names.contains(&"mask_token".to_string()));
    assert!(
        std::fs::read_dir(dir.path()).unwrap().count() == 1,
        "no temporary files left behind"
    );
}

fn load_error(cfg: &DitConfig, path: &Path) -> String {
    let device = Default::default();
    let model = MicroDit::<B>::new(cfg, &mut Init::empty(&device));
    format!(
        "{:#}",
        load_weights(model, path).expect_err("loading should fail")
    )
}

#[test]
fn a_checkpoint_that_does_not_fit_names_each_problem() {
    let mut with_mixer_maps = 0;
    for (dir, cfg) in dit_sets() {
        let weights = dir.join("weights.safetensors");
        // The last block never holds experts, so its SwiGLU is there in every architecture.
        let last = cfg.depth - 1;
        let wider = DitConfig {
            ffn_multipliers: cfg.ffn_multipliers.iter().map(|m| 2.0 * m).collect(),
            ..cfg.clone()
        };
        let e = load_error(&wider, &weights);
        let hidden = |c: &DitConfig| c.backbone_blocks()[last].swiglu_hidden();
        let expected = format!(
            "tensor 'blocks.{last}.mlp.w1.weight' has shape [{}, {d}], the model expects [{}, {d}]",
            hidden(&cfg),
            hidden(&wider),
            d = cfg.dim
        );
        assert!(e.contains(&expected), "{}: {e}", dir.display());

        let other_bias = DitConfig {
            use_bias: !cfg.use_bias,
            ..cfg.clone()
        };
        let e = load_error(&other_bias, &weights);
        let expected = if cfg.use_bias {
            "unexpected tensor 'blocks.0.attn.qkv.bias'"
        } else {
            "missing tensor 'blocks.0.attn.qkv.bias'"
        };
        assert!(e.contains(expected), "{}: {e}", dir.display());

        if cfg.has_mixer_projections() {
            with_mixer_maps += 1;
            let without_mixer_maps = DitConfig {
                patch_mixer_dim: cfg.dim,
                ..cfg.clone()
            };
            let e = load_error(&without_mixer_maps, &weights);
            assert!(
                e.contains("unexpected tensor 'patch_mixer_map_xin.1.weight'"),
                "{}: {e}",
                dir.display()
            );
        }

        let e = load_error(&cfg, &dir.join("missing.safetensors"));
        assert!(e.contains("does not exist"), "{e}");
    }
    assert!(with_mixer_maps > 0, "no 'dit' set with mixer projections");
}

#[test]
fn positions_made_with_another_interpolation_scale_are_refused() {
    for (dir, cfg) in dit_sets() {
        let other = if cfg.pos_interp_scale == 1.0 {
            2.0
        } else {
            1.0
        };
        let wrong = DitConfig {
            pos_interp_scale: other,
            ..cfg
        };
        let e = load_error(&wrong, &dir.join("weights.safetensors"));
        assert!(e.contains("pos_interp_scale"), "{}: {e}", dir.display());
    }
}

#[test]
fn configs_load_from_json_and_toml() {
    let dir = tempfile::tempdir().unwrap();
    let xl = DitConfig::preset("MicroDiT_XL_2").unwrap();
    let toml_path = dir.path().join("xl.toml");
    std::fs::write(&toml_path, toml::to_string(&xl).unwrap()).unwrap();
    assert_eq!(DitConfig::from_file(&toml_path).unwrap(), xl);
    let json_path = dir.path().join("xl.json");
    std::fs::write(&json_path, serde_json::to_string(&xl).unwrap()).unwrap();
    assert_eq!(DitConfig::from_file(&json_path).unwrap(), xl);

    let bad = DitConfig { depth: 27, ..xl };
    std::fs::write(&json_path, serde_json::to_string(&bad).unwrap()).unwrap();
    let e = format!("{:#}", DitConfig::from_file(&json_path).unwrap_err());
    assert!(e.contains("depth 27 is not divisible"), "{e}");
}

#[test]
fn whole_latent_diffusion_state_dicts_load_their_denoiser() {
    let (_, cfg) = dit_sets().remove(0);
    let device = Default::default();
    let model = MicroDit::<B>::new(&cfg, &mut Init::reference(5, &device));
    let mut tensors: BTreeMap<String, TensorData> = reference_tensors(&model, &DIT_KEYS)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (format!("dit.{k}"), v))
        .collect();
    tensors.insert(
        "vae.decoder.conv_in.weight".into(),
        TensorData::new(vec![0f32; 4], [2, 2]),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latent_diffusion.safetensors");
    microdit::io::write_safetensors(&path, &tensors).unwrap();
    let loaded = load_weights(MicroDit::<B>::new(&cfg, &mut Init::empty(&device)), &path).unwrap();
    assert_eq!(
        reference_tensors(&model, &DIT_KEYS).unwrap(),
        reference_tensors(&loaded, &DIT_KEYS).unwrap()
    );
}
