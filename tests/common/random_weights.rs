//! The weights `tests/fixtures/eval/make.py` fills its random models with (its header
//! defines the generator): fixture sets list tensor names and shapes instead of storing
//! weights.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::TensorData;

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF29CE484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001B3)
    })
}

/// Uniform on [−1, 1), element i of tensor `name`.
fn uniform(seed: u64, name: &str, n: usize) -> Vec<f32> {
    let base = fnv1a64(format!("{seed}:{name}").as_bytes());
    (1..=n as u64)
        .map(|i| {
            let mut z = base.wrapping_add(i.wrapping_mul(0x9E3779B97F4A7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub fn random_tensor(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let u = uniform(seed, name, n);
    let scale = (6.0 / (n / shape.first().copied().unwrap_or(1).max(1)) as f64).sqrt() as f32;
    u.into_iter()
        .map(|u| {
            if name.ends_with("running_var") {
                1.0 + 0.1 * u.abs()
            } else if shape.len() == 1 && name.ends_with("weight") {
                1.0 + 0.1 * u
            } else if shape.len() <= 1 {
                0.1 * u
            } else {
                u * scale
            }
        })
        .collect()
}

/// The state dict a set's `config.json` lists (`"state_dict": [[name, shape], …]`, `"seed"`),
/// written as safetensors to `path`.
pub fn write_state_dict(config: &serde_json::Value, path: &Path) {
    let seed = config["seed"].as_u64().expect("config.json seed");
    let tensors: BTreeMap<String, TensorData> = config["state_dict"]
        .as_array()
        .expect("config.json state_dict")
        .iter()
        .map(|entry| {
            let name = entry[0].as_str().unwrap().to_string();
            let shape: Vec<usize> = entry[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            let values = random_tensor(seed, &name, &shape);
            (name, TensorData::new(values, shape))
        })
        .collect();
    microdit::io::write_safetensors(path, &tensors).unwrap();
}
