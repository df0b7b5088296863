//! Initialisation, checkpoint saving/loading and the errors a wrong checkpoint gives.

mod common;

use std::collections::BTreeMap;

use burn::tensor::TensorData;
use microdit::backend::Cpu;
use microdit::model::weights::{load_weights, save_weights};
use microdit::model::{DitConfig, Init, MicroDit};
use microdit::state_dict::{reference_tensors, DIT_KEYS};

type B = Cpu;

fn tiny() -> DitConfig {
    DitConfig::from_file(&common::fixtures_dir().join("dit-tiny/config.json")).unwrap()
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
        dim: 256,
        head_dim: 32,
        patch_mixer_dim: 192,
        ..tiny()
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
    let cfg = tiny();
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

fn load_error(cfg: &DitConfig, file: &str) -> String {
    let device = Default::default();
    let path = common::fixtures_dir().join(file);
    let model = MicroDit::<B>::new(cfg, &mut Init::empty(&device));
    format!(
        "{:#}",
        load_weights(model, &path).expect_err("loading should fail")
    )
}

#[test]
fn a_checkpoint_that_does_not_fit_names_each_problem() {
    let wider = DitConfig {
        ffn_multipliers: vec![4.0; 4],
        ..tiny()
    };
    let e = load_error(&wider, "dit-tiny/weights.safetensors");
    assert!(
        e.contains(
            "tensor 'blocks.0.mlp.w1.weight' has shape [32, 64], the model expects [176, 64]"
        ),
        "{e}"
    );

    let with_bias = DitConfig {
        use_bias: true,
        ..tiny()
    };
    let e = load_error(&with_bias, "dit-tiny/weights.safetensors");
    assert!(e.contains("missing tensor 'blocks.0.attn.qkv.bias'"), "{e}");

    let without_mixer_maps = DitConfig {
        patch_mixer_dim: 64,
        ..tiny()
    };
    let e = load_error(&without_mixer_maps, "dit-tiny/weights.safetensors");
    assert!(
        e.contains("unexpected tensor 'patch_mixer_map_xin.1.weight'"),
        "{e}"
    );

    let e = load_error(&tiny(), "dit-tiny/missing.safetensors");
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn positions_made_with_another_interpolation_scale_are_refused() {
    let dir = common::fixtures_dir().join("dit-interp-samedim");
    let cfg = DitConfig::from_file(&dir.join("config.json")).unwrap();
    let wrong = DitConfig {
        pos_interp_scale: 1.0,
        ..cfg
    };
    let e = load_error(&wrong, "dit-interp-samedim/weights.safetensors");
    assert!(e.contains("pos_interp_scale"), "{e}");
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
    let cfg = tiny();
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
