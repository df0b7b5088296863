//! int8 generation: the quantised product against burn's operations, a quantised denoiser
//! against its float self, the quantised file, and what is refused.

mod common;

use std::collections::BTreeMap;

use burn::module::Module;
use burn::prelude::*;
use microdit::backend::{
    int8_matmul, int8_matmul_unfused, int8_row_sums, test_device, TestBackend,
};
use microdit::model::init::{Perturb, RANDOM_WEIGHTS_NOISE};
use microdit::model::weights::{load_quantized, quantize, save_weights};
use microdit::model::{DitConfig, Init, MicroDit, TrainingTokens};
use microdit::state_dict::read_state_dict;

type B = TestBackend;

fn normal<const D: usize>(seed: u64, shape: [usize; D]) -> Tensor<B, D> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    microdit::random::standard_normal(&mut rng, shape, &test_device())
}

/// Every denoiser fixture set's architecture (mixer projections, experts, both biases).
fn configs() -> Vec<DitConfig> {
    common::fixture_sets("dit")
        .iter()
        .map(|dir| DitConfig::from_file(&dir.join("config.json")).unwrap())
        .collect()
}

/// A model of `cfg` whose every layer acts.
fn random_model(cfg: &DitConfig) -> MicroDit<B> {
    MicroDit::new(cfg, &mut Init::reference(0, &test_device()))
        .map(&mut Perturb::new(1, RANDOM_WEIGHTS_NOISE))
}

/// The raw network output for a fixed draw of inputs.
fn output(model: &MicroDit<B>, cfg: &DitConfig) -> Vec<f32> {
    let x = normal(2, [2, cfg.in_channels, cfg.input_size, cfg.input_size]);
    let y = normal(3, [2, 7, cfg.caption_channels]);
    let t = Tensor::from_floats([0.3, -0.2], &test_device());
    let out = model.forward(x, t, y, &TrainingTokens::all());
    out.into_data().to_vec().unwrap()
}

fn relative_l2(a: &[f32], b: &[f32]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm).sqrt()
}

#[test]
fn the_int8_product_equals_the_same_arithmetic_in_burns_operations() {
    // Odd sizes: tails past every SIMD step, tile and task; two matrices per call.
    let (batch, m, n, k) = (2, 67, 37, 131);
    let x = normal(4, [batch, m, k]);
    let w = normal(5, [batch * n, k]);
    let scales = w.clone().abs().max_dim(1).reshape([batch * n]) / 127.0;
    let values = (w / scales.clone().unsqueeze_dim(1)).round().int();
    let values = Tensor::<B, 2, Int>::from_data(
        values.into_data().convert::<i8>(),
        (&test_device(), burn::tensor::DType::I8),
    );
    let row_sums = int8_row_sums(values.clone());
    let fused = int8_matmul(x.clone(), values.clone(), scales.clone(), row_sums);
    let unfused = int8_matmul_unfused(x, values, scales);
    let (fused, unfused): (Vec<f32>, Vec<f32>) = (
        fused.into_data().to_vec().unwrap(),
        unfused.into_data().to_vec().unwrap(),
    );
    assert_eq!(fused.len(), batch * m * n);
    let worst = fused
        .iter()
        .zip(&unfused)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
        .fold(0f32, f32::max);
    assert!(worst < 1e-5, "relative difference {worst}");
}

#[test]
fn an_int8_denoiser_evaluation_is_within_one_percent_of_float() {
    let configs = configs();
    assert!(!configs.is_empty(), "no dit fixture sets");
    for cfg in configs {
        let model = random_model(&cfg);
        let quantized = quantize(&model, &cfg).unwrap();
        let error = relative_l2(&output(&quantized, &cfg), &output(&model, &cfg));
        // Above zero: the int8 products ran, not the float ones.
        assert!(error > 1e-6 && error < 0.01, "relative L2 {error}");
    }
}

#[test]
fn a_quantised_file_holds_int8_weights_and_loads_to_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    for cfg in configs() {
        let quantized = quantize(&random_model(&cfg), &cfg).unwrap();
        let path = dir.path().join("int8.safetensors");
        save_weights(&quantized, &path).unwrap();
        let tensors = read_state_dict(&path).unwrap();
        let int8 = tensors
            .values()
            .filter(|t| t.dtype == burn::tensor::DType::I8);
        assert!(int8.count() > 0, "no int8 tensors in the file");
        assert!(!tensors.contains_key("blocks.0.attn.qkv.weight"));
        let loaded = load_quantized::<B>(&cfg, tensors, &test_device()).unwrap();
        assert_eq!(output(&loaded, &cfg), output(&quantized, &cfg));
    }
}

#[test]
fn an_int8_weight_of_minus_128_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = &configs()[0];
    let quantized = quantize(&random_model(cfg), cfg).unwrap();
    let path = dir.path().join("int8.safetensors");
    save_weights(&quantized, &path).unwrap();
    let mut tensors: BTreeMap<String, TensorData> = read_state_dict(&path)
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.to_data().unwrap()))
        .collect();
    let name = "blocks.0.attn.qkv.weight_int8.values";
    let values = tensors.get_mut(name).expect("a quantised qkv");
    let mut raw: Vec<i8> = values.to_vec().unwrap();
    raw[3] = i8::MIN;
    *values = TensorData::new(raw, values.shape.clone());
    microdit::io::write_safetensors(&path, &tensors).unwrap();
    let error = load_quantized::<B>(cfg, read_state_dict(&path).unwrap(), &test_device())
        .expect_err("a -128 refused");
    assert!(format!("{error:#}").contains("-128"), "{error:#}");
}
