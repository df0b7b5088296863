//! A small training setup shared by the training tests: a generated MDS dataset the model
//! can learn, a tiny MicroDiT config, and a stage config over them.

use std::path::{Path, PathBuf};

use microdit::data::mds::{f16_bytes, MdsWriter};
use microdit::data::Value;
use microdit::model::DitConfig;

pub const CAPTION_TOKENS: usize = 4;
pub const CAPTION_DIM: usize = 16;

/// Four classes; a sample's caption embedding and latents are both fixed per class (plus a
/// little noise on the caption), so a model can learn to denoise from the caption.
pub fn write_dataset(dir: &Path, samples: usize, latent_side: usize) {
    let mut w = MdsWriter::create(
        dir,
        &[
            ("caption", "str"),
            ("caption_latents", "bytes"),
            ("latents", "bytes"),
        ],
        Some(3),
        1 << 14,
    )
    .unwrap();
    for i in 0..samples {
        let class = i % 4;
        let caption: Vec<f32> = (0..CAPTION_TOKENS * CAPTION_DIM)
            .map(|k| {
                if k % CAPTION_DIM == class {
                    1.0
                } else {
                    0.05 * ((i * 31 + k * 7) % 13) as f32 / 13.0
                }
            })
            .collect();
        let latents: Vec<f32> = (0..4 * latent_side * latent_side)
            .map(|k| {
                ((k / latent_side + class * 3) as f32 * 0.7).sin()
                    * if (k % latent_side + class).is_multiple_of(2) {
                        1.0
                    } else {
                        -0.5
                    }
            })
            .collect();
        w.write(&[
            Value::Str(format!("class {class}")),
            Value::Bytes(f16_bytes(&caption)),
            Value::Bytes(f16_bytes(&latents)),
        ])
        .unwrap();
    }
    w.finish().unwrap();
}

pub fn tiny_model() -> DitConfig {
    DitConfig {
        input_size: 8,
        patch_size: 2,
        in_channels: 4,
        dim: 32,
        depth: 2,
        head_dim: 16,
        multiple_of: 16,
        caption_channels: CAPTION_DIM,
        pos_interp_scale: 1.0,
        norm_eps: 1e-6,
        depth_init: true,
        qkv_multipliers: vec![1.0],
        ffn_multipliers: vec![2.0],
        use_patch_mixer: true,
        patch_mixer_depth: 2,
        patch_mixer_dim: 32,
        patch_mixer_qkv_ratio: 1.0,
        patch_mixer_mlp_ratio: 2.0,
        use_bias: false,
        num_experts: 2,
        expert_capacity: 1.0,
        experts_every_n: 2,
    }
}

pub struct Setup {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

pub fn setup(extra: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    write_dataset(&root.join("data"), 64, 8);
    std::fs::write(
        root.join("model.json"),
        serde_json::to_string(&tiny_model()).unwrap(),
    )
    .unwrap();
    let config = format!(
        "model = \"{}\"\ndata = [\"data\"]\nlatents_column = \"latents\"\nmask_ratio = 0.5\nglobal_batch = 8\nmicro_batch = 4\n\
         lr = 2e-3\nwarmup_steps = 10\nalpha_f = 0.2\nlog_every = 1\nseed = 3\n{extra}",
        root.join("model.json").display()
    );
    std::fs::write(root.join("stage.toml"), config).unwrap();
    Setup { _tmp: tmp, root }
}

/// The weights of a run's newest checkpoint, flattened.
pub fn latest_weights(run: &Path) -> Vec<f32> {
    let ckpt = microdit::run_dir::latest(run).unwrap();
    safetensors_values(&ckpt.join("weights.safetensors"))
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// Every value of a safetensors file, tensors in name order.
pub fn safetensors_values(path: &Path) -> Vec<f64> {
    microdit::state_dict::read_state_dict(path)
        .unwrap()
        .into_values()
        .flat_map(|t| {
            t.to_data()
                .unwrap()
                .convert::<f32>()
                .into_vec::<f32>()
                .unwrap()
        })
        .map(f64::from)
        .collect()
}

/// `train ROOT/CONFIG --run ROOT/RUN --quiet EXTRA…`: the command line after the binary.
pub fn train_args(s: &Setup, config: &str, run: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "train".to_string(),
        s.root.join(config).display().to_string(),
        "--run".into(),
        s.root.join(run).display().to_string(),
        "--quiet".into(),
    ];
    args.extend(extra.iter().map(|e| e.to_string()));
    args
}

/// `microdit train ROOT/CONFIG --run ROOT/RUN --quiet EXTRA…`: (exit code, everything
/// printed).
pub fn train_with(s: &Setup, config: &str, run: &str, extra: &[&str]) -> (Option<i32>, String) {
    let run = super::microdit(&train_args(s, config, run, extra));
    (run.code, run.log())
}

/// [`train_with`] the setup's `stage.toml`.
pub fn train(s: &Setup, run: &str, extra: &[&str]) -> (Option<i32>, String) {
    train_with(s, "stage.toml", run, extra)
}
