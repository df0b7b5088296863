//! Training through the real CLI on a small generated dataset: the loss falls, a killed run
//! resumes to the same weights, and broken inputs fail clearly.

mod common;

use std::path::Path;

use common::training::{
    latest_weights, safetensors_values, setup, tiny_model, train, train_with, write_dataset,
    CAPTION_DIM, CAPTION_TOKENS,
};

/// `microdit ARGS…`: (exit code, everything printed).
fn microdit(args: &[&str]) -> (Option<i32>, String) {
    let run = common::microdit(args);
    (run.code, run.log())
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn a_tiny_model_learns_the_generated_dataset() {
    let s = setup("steps = 300\ncheckpoint_every = 100\n");
    let (code, log) = train(&s, "run", &[]);
    assert_eq!(code, Some(0), "{log}");
    let l = losses(&s.root.join("run"));
    assert_eq!(l.len(), 300);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (start, end) = (mean(&l[..30]), mean(&l[270..]));
    assert!(
        end < 0.6 * start,
        "loss fell from {start:.4} only to {end:.4}"
    );
    let (code, log) = microdit(&["plot", s.root.join("run").to_str().unwrap()]);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("steps 1..300"), "{log}");
    let png = std::fs::read(s.root.join("run/loss.png")).unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (800, 400));
    // keep_last = 3 by default: steps 100, 200, 300.
    let ckpts: Vec<_> = std::fs::read_dir(s.root.join("run/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(ckpts.len(), 3, "{ckpts:?}");
}

#[test]
fn a_killed_run_resumes_to_the_same_weights() {
    resumes_exactly(
        "steps = 20\ncheckpoint_every = 5\n",
        &["weights.safetensors"],
    );
}

#[test]
fn a_killed_run_with_ema_and_expert_rate_resumes_exactly() {
    resumes_exactly(
        "steps = 20\ncheckpoint_every = 5\nema_decay = 0.9\nema_start = 3\nexpert_lr_scale = 0.5\n",
        &["weights.safetensors", "ema.safetensors"],
    );
}

/// Routing (TREAD) draws its tokens from the training generator: a killed routed run
/// resumes bitwise, and the routing changes what is trained.
#[test]
fn a_killed_routed_run_resumes_exactly() {
    let routed = "steps = 20\ncheckpoint_every = 5\n[routing]\nshare = 0.5\nfirst_block = 0\n";
    resumes_exactly(routed, &["weights.safetensors"]);

    let s = setup(routed);
    std::fs::write(
        s.root.join("unrouted.toml"),
        std::fs::read_to_string(s.root.join("stage.toml"))
            .unwrap()
            .replace("[routing]\nshare = 0.5\nfirst_block = 0\n", ""),
    )
    .unwrap();
    for (config, run) in [("stage.toml", "routed"), ("unrouted.toml", "unrouted")] {
        let (code, log) = train_with(&s, config, run, &[]);
        assert_eq!(code, Some(0), "{log}");
    }
    assert!(
        latest_weights(&s.root.join("routed")) != latest_weights(&s.root.join("unrouted")),
        "routing changed nothing"
    );

    // A span past the backbone is refused before training starts.
    let bad = setup("steps = 5\n[routing]\nlast_block = 2\n");
    let (code, log) = train(&bad, "run", &[]);
    assert_ne!(code, Some(0));
    assert!(
        log.contains("routing span: blocks 1..=2 do not fit a backbone of 2 blocks"),
        "{log}"
    );
}

#[test]
fn the_weight_average_is_the_exponential_average_of_the_weights() {
    // The average starts as the weights after step 3 and then follows
    // ema ← 0.9·ema + 0.1·w after every step.
    let s =
        setup("steps = 8\ncheckpoint_every = 1\nkeep_last = 8\nema_decay = 0.9\nema_start = 3\n");
    let (code, log) = train(&s, "run", &[]);
    assert_eq!(code, Some(0), "{log}");
    let step = |k: usize| s.root.join(format!("run/checkpoints/step-{k:08}"));
    let mut expected = safetensors_values(&step(3).join("weights.safetensors"));
    for k in 4..=8 {
        let w = safetensors_values(&step(k).join("weights.safetensors"));
        for (e, w) in expected.iter_mut().zip(w) {
            *e = 0.9 * *e + 0.1 * w;
        }
    }
    let ema = safetensors_values(&step(8).join("ema.safetensors"));
    let weights = safetensors_values(&step(8).join("weights.safetensors"));
    assert_eq!(ema.len(), expected.len());
    let worst = ema
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1e-3))
        .fold(0f64, f64::max);
    assert!(
        worst < 1e-4,
        "the average differs from the expected one by {worst}"
    );
    assert!(ema != weights, "the average equals the weights");
    // The run folder samples with the average, as EDM does.
    let hub = microdit::hub::Hub::new(s.root.clone(), true);
    let run = s.root.join("run");
    let chosen = microdit::pipeline::load::resolve_checkpoint(&hub, run.to_str().unwrap());
    assert_eq!(chosen.unwrap(), step(8).join("ema.safetensors"));
}

fn resumes_exactly(config: &str, files: &[&str]) {
    let s = setup(config);
    let (code, log) = train(&s, "straight", &[]);
    assert_eq!(code, Some(0), "{log}");

    let (code, _) = train(&s, "killed", &["--abort-after-step", "12"]);
    assert_ne!(code, Some(0), "the run should have been aborted");
    let (code, log) = train(&s, "killed", &[]);
    assert_ne!(code, Some(0));
    assert!(
        log.contains("--resume"),
        "restarting without --resume must refuse: {log}"
    );
    let (code, log) = train(&s, "killed", &["--resume"]);
    assert_eq!(code, Some(0), "{log}");
    assert!(
        log.contains("resuming from") && log.contains("step 10"),
        "{log}"
    );

    for file in files {
        let read = |run: &str| {
            std::fs::read(
                s.root
                    .join(run)
                    .join("checkpoints/step-00000020")
                    .join(file),
            )
            .unwrap()
        };
        assert!(
            read("straight") == read("killed"),
            "resumed {file} differs from the uninterrupted run's"
        );
    }
}

#[test]
fn broken_data_and_unwritable_checkpoints_fail_clearly() {
    let s = setup("steps = 4\ncheckpoint_every = 2\n");
    // A latent of the wrong shape for the model.
    write_dataset(&s.root.join("wrong"), 8, 4);
    let cfg = std::fs::read_to_string(s.root.join("stage.toml"))
        .unwrap()
        .replace("data = [\"data\"]", "data = [\"wrong\"]");
    std::fs::write(s.root.join("wrong.toml"), cfg).unwrap();
    let (code, log) = train_with(&s, "wrong.toml", "r1", &[]);
    assert_ne!(code, Some(0));
    assert!(
        log.contains("latents holds 64 values, the model expects 256"),
        "{log}"
    );

    // The same data with skip_bad_samples: every sample is unreadable for this model, so the
    // run reports that none is left rather than looping.
    let cfg =
        std::fs::read_to_string(s.root.join("wrong.toml")).unwrap() + "skip_bad_samples = true\n";
    std::fs::write(s.root.join("skip.toml"), cfg).unwrap();
    let (code, log) = train_with(&s, "skip.toml", "r0", &[]);
    assert_ne!(code, Some(0));
    assert!(
        log.contains("skipping sample") && log.contains("no readable sample left"),
        "{log}"
    );

    // A missing index.
    std::fs::remove_file(s.root.join("wrong/index.json")).unwrap();
    let (code, log) = train_with(&s, "wrong.toml", "r2", &[]);
    assert_ne!(code, Some(0));
    assert!(
        log.contains("index.json") && log.contains("no MDS index"),
        "{log}"
    );

    // A truncated shard.
    let shard = s.root.join("data/shard.00000.mds.zstd");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let (code, log) = train(&s, "r3", &[]);
    assert_ne!(code, Some(0));
    assert!(log.contains("shard.00000.mds.zstd"), "{log}");
    std::fs::write(&shard, &bytes).unwrap();

    // With skip_bad_samples, a damaged shard's samples are skipped and counted.
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let cfg =
        std::fs::read_to_string(s.root.join("stage.toml")).unwrap() + "skip_bad_samples = true\n";
    std::fs::write(s.root.join("skip2.toml"), cfg).unwrap();
    let (code, log) = train_with(&s, "skip2.toml", "r5", &[]);
    assert_eq!(code, Some(0), "{log}");
    let last = std::fs::read_to_string(s.root.join("r5/metrics.jsonl"))
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let skipped = serde_json::from_str::<serde_json::Value>(&last).unwrap()["skipped_samples"]
        .as_u64()
        .unwrap();
    assert!(skipped > 0, "{last}");
    std::fs::write(&shard, &bytes).unwrap();

    // Resumed with another architecture: an error naming the checkpoint, not burn's panic.
    let (code, _) = train(&s, "r6", &["--abort-after-step", "2"]);
    assert_ne!(code, Some(0), "the run should have been aborted");
    let mut wider = tiny_model();
    wider.dim = 48;
    std::fs::write(
        s.root.join("wider.json"),
        serde_json::to_string(&wider).unwrap(),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(s.root.join("stage.toml"))
        .unwrap()
        .replace("model.json", "wider.json");
    std::fs::write(s.root.join("wider.toml"), cfg).unwrap();
    let (code, log) = train_with(&s, "wider.toml", "r6", &["--resume"]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("another architecture") && log.contains("has shape"),
        "{log}"
    );
    // A next stage of another architecture, carrying the optimiser state: the same.
    std::fs::write(
        s.root.join("wider-stage.toml"),
        std::fs::read_to_string(s.root.join("wider.toml")).unwrap() + "init_from = \"r6\"\n",
    )
    .unwrap();
    let (code, log) = train_with(&s, "wider-stage.toml", "r7", &[]);
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("initialising from") && log.contains("has shape"),
        "{log}"
    );

    // The checkpoint cannot be written (something in the way, as a full disk would): the
    // run stops with an error and no half-written checkpoint is left to resume from.
    std::fs::create_dir_all(s.root.join("r4")).unwrap();
    std::fs::write(s.root.join("r4/checkpoints"), b"not a directory").unwrap();
    let (code, log) = train(&s, "r4", &[]);
    assert_ne!(code, Some(0));
    assert!(log.contains("checkpoint"), "{log}");
}

#[test]
fn the_recipe_stage_configs_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let stages = [
        "stage1_res256_mask75",
        "stage2_res256_unmasked",
        "stage3_res512_mask75",
        "stage4_res512_unmasked",
    ];
    let expected = [
        (256, 0.75, 250_000, 1.0),
        (256, 0.0, 30_000, 1.0),
        (512, 0.75, 50_000, 2.0),
        (512, 0.0, 5_000, 2.0),
    ];
    for (name, (res, mask, steps, interp)) in stages.iter().zip(expected) {
        let cfg =
            microdit::train::config::TrainConfig::from_file(&dir.join(format!("{name}.toml")))
                .unwrap();
        assert_eq!(
            (cfg.resolution, cfg.mask_ratio, cfg.steps),
            (Some(res), mask, steps),
            "{name}"
        );
        let dit = cfg.dit_config().unwrap();
        assert_eq!(
            (dit.input_size, dit.pos_interp_scale),
            (res / 8, interp),
            "{name}"
        );
        assert_eq!(cfg.latents_column().unwrap(), format!("latents_{res}"));
    }
    let stage1 =
        microdit::train::config::TrainConfig::from_file(&dir.join("stage1_res256_mask75.toml"))
            .unwrap();
    assert_eq!(stage1.lr_at(0), 0.0);
    assert!((stage1.lr_at(2500) - 2.4e-4).abs() < 1e-12);
    assert!((stage1.lr_at(250_000) - 0.33 * 2.4e-4).abs() < 1e-12);
}

#[test]
fn the_expert_learning_rate_scale_applies_to_expert_parameters_only() {
    use burn::optim::GradientsParams;
    use microdit::backend::{Cpu, Trainable};
    use microdit::edm::{edm_loss, EdmConfig, LossNoise};
    use microdit::model::{Init, MicroDit};
    use microdit::state_dict::{reference_tensors, DIT_KEYS};
    use microdit::train::optim::{AdamWSettings, GroupedAdamW};
    use rand::SeedableRng;
    type AB = Trainable<Cpu>;

    let device = Default::default();
    let cfg = tiny_model();
    let model = MicroDit::<AB>::new(&cfg, &mut Init::reference(0, &device));
    let before = reference_tensors(&model, &DIT_KEYS).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let x0 = microdit::random::standard_normal::<AB, 4>(&mut rng, [2, 4, 8, 8], &device);
    let y = microdit::random::standard_normal::<AB, 3>(
        &mut rng,
        [2, CAPTION_TOKENS, CAPTION_DIM],
        &device,
    );
    let draws = LossNoise::draw(&mut rng, [2, 4, 8, 8], 2, &Default::default(), &device);
    let loss = edm_loss(&model, &EdmConfig::default(), x0, y, &draws, 2);
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    // Scale 0: the experts must not move, everything else must.
    let mut optim = GroupedAdamW::new(
        &AdamWSettings {
            weight_decay: 0.0,
            ..Default::default()
        },
        Some(0.0),
    );
    let after = reference_tensors(&optim.step(1e-2, model, grads), &DIT_KEYS).unwrap();
    let mut experts = 0;
    for (name, old) in &before {
        let moved = after[name] != *old;
        let expert = name.contains(".mlp.w1") && !name.ends_with(".weight")
            || name.contains(".mlp.w2") && !name.ends_with(".weight")
            || name.contains(".mlp.gate.");
        if expert {
            experts += 1;
            assert!(!moved, "{name} (an expert parameter) moved at scale 0");
        } else if name == "final_layer.linear.weight" {
            assert!(moved, "{name} did not move");
        }
    }
    // w1, w2 and the router of at least one expert-choice block were checked.
    assert!(
        experts >= 3,
        "only {experts} expert parameters in the model"
    );
}

#[test]
fn preview_grids_are_written_every_few_steps() {
    // A VAE for the training setup's 4-channel latents; its tiles are 8 latents a side.
    let (vae, vae_cfg) = common::fixture_sets("vae")
        .into_iter()
        .map(|dir| {
            let cfg = microdit::vae::VaeConfig::from_file(&dir.join("config.json")).unwrap();
            (dir, cfg)
        })
        .find(|(_, cfg)| cfg.latent_channels == 4)
        .expect("a 'vae' set with 4 latent channels");
    let tile = (8 * vae_cfg.downscale()) as u32;
    let s = setup(&format!(
        "steps = 4\ncheckpoint_every = 4\nsample_every = 2\nsample_steps = 2\nsample_captions = \"captions.safetensors\"\nsample_vae = \"{}\"\n",
        vae.display()
    ));
    let mut tensors = std::collections::BTreeMap::new();
    let captions: Vec<f32> = (0..2 * CAPTION_TOKENS * CAPTION_DIM)
        .map(|k| (k % 5) as f32 * 0.1)
        .collect();
    tensors.insert(
        "caption_latents".to_string(),
        burn::tensor::TensorData::new(captions, [2, CAPTION_TOKENS, CAPTION_DIM]),
    );
    microdit::io::write_safetensors(&s.root.join("captions.safetensors"), &tensors).unwrap();
    let (code, log) = train(&s, "run", &[]);
    assert_eq!(code, Some(0), "{log}");
    for step in ["step-00000002.png", "step-00000004.png"] {
        let png = std::fs::read(s.root.join("run/samples").join(step)).unwrap();
        let reader = png::Decoder::new(std::io::Cursor::new(png))
            .read_info()
            .unwrap();
        // Two tiles side by side.
        assert_eq!(
            (reader.info().width, reader.info().height),
            (2 * tile, tile),
            "{step}"
        );
    }
}

#[test]
fn two_data_parallel_replicas_train_like_one_device() {
    let s = setup("steps = 20\ncheckpoint_every = 10\n");
    let (code, log) = train(&s, "one", &[]);
    assert_eq!(code, Some(0), "{log}");
    let (code, log) = train(&s, "two", &["--device", "cpu,cpu"]);
    assert_eq!(code, Some(0), "{log}");
    // Same batches and randomness; only the order of summing micro-batch gradients differs.
    for (a, b) in losses(&s.root.join("one"))
        .iter()
        .zip(losses(&s.root.join("two")))
    {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "loss {a} vs {b}");
    }
    let (one, two) = (
        latest_weights(&s.root.join("one")),
        latest_weights(&s.root.join("two")),
    );
    assert_eq!(one.len(), two.len());
    let worst = one
        .iter()
        .zip(&two)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "weights differ by up to {worst}");

    // A data-parallel run's checkpoints resume on another number of devices.
    let (code, _) = train(
        &s,
        "mixed",
        &["--device", "cpu,cpu", "--abort-after-step", "12"],
    );
    assert_ne!(code, Some(0));
    let (code, log) = train(&s, "mixed", &["--resume"]);
    assert_eq!(code, Some(0), "{log}");
    let mixed = latest_weights(&s.root.join("mixed"));
    let worst = one
        .iter()
        .zip(&mixed)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-3, "weights differ by up to {worst}");
}

#[test]
fn data_parallel_devices_must_split_the_micro_batches() {
    let s = setup("steps = 2\n");
    let (code, log) = train(&s, "three", &["--device", "cpu,cpu,cpu"]);
    assert_ne!(code, Some(0));
    assert!(log.contains("cannot be split evenly over 3 ranks"), "{log}");
    let (code, log) = train(&s, "mixed", &["--device", "cpu,cuda:0"]);
    assert_ne!(code, Some(0));
    assert!(log.contains("mixes cpu and cuda"), "{log}");
    // A failure only rank 0 meets (its preview captions are missing) stops every rank
    // instead of leaving the others waiting for it.
    let config = std::fs::read_to_string(s.root.join("stage.toml")).unwrap()
        + "sample_every = 1\nsample_captions = \"missing.safetensors\"\n";
    std::fs::write(s.root.join("preview.toml"), config).unwrap();
    let (code, log) = train_with(&s, "preview.toml", "preview", &["--device", "cpu,cpu"]);
    assert_ne!(code, Some(0));
    assert!(log.contains("missing.safetensors"), "{log}");
}

#[test]
fn bf16_compute_trains_f32_master_weights_like_f32() {
    let s = setup("steps = 20\ncheckpoint_every = 10\n");
    let bf16 =
        std::fs::read_to_string(s.root.join("stage.toml")).unwrap() + "precision = \"bf16\"\n";
    std::fs::write(s.root.join("bf16.toml"), bf16).unwrap();
    let (code, log) = train(&s, "f32", &[]);
    assert_eq!(code, Some(0), "{log}");
    let (code, log) = train_with(&s, "bf16.toml", "bf16", &[]);
    assert_eq!(code, Some(0), "{log}");
    let (a, b) = (losses(&s.root.join("f32")), losses(&s.root.join("bf16")));
    assert_ne!(a, b, "bf16 compute should round differently");
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() < 0.05 * x.abs(),
            "loss {x} (f32) vs {y} (bf16)"
        );
    }
    let path = s
        .root
        .join("bf16/checkpoints/step-00000020/weights.safetensors");
    for (name, t) in microdit::state_dict::read_state_dict(&path).unwrap() {
        assert_eq!(t.dtype, burn::tensor::DType::F32, "{name} is not f32");
    }
    let (one, two) = (
        latest_weights(&s.root.join("f32")),
        latest_weights(&s.root.join("bf16")),
    );
    let worst = one
        .iter()
        .zip(&two)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.05, "weights differ by up to {worst}");
}

#[test]
fn a_later_stage_continues_the_previous_stages_optimiser_state() {
    let s = setup("steps = 10\ncheckpoint_every = 10\n");
    let (code, log) = train(&s, "stage1", &[]);
    assert_eq!(code, Some(0), "{log}");
    let lr = 1e-3;
    for carry in [true, false] {
        let config = std::fs::read_to_string(s.root.join("stage.toml"))
            .unwrap()
            .replace("warmup_steps = 10", "warmup_steps = 0")
            .replace("\nsteps = 10", "\nsteps = 1")
            .replace("lr = 2e-3", &format!("lr = {lr}"))
            + &format!("weight_decay = 0.0\ninit_from = \"stage1\"\ncarry_optimizer = {carry}\n");
        std::fs::write(s.root.join(format!("stage2-{carry}.toml")), config).unwrap();
        let run = format!("stage2-{carry}");
        let (code, log) = train_with(&s, &format!("stage2-{carry}.toml"), &run, &[]);
        assert_eq!(code, Some(0), "{log}");
        // A fresh AdamW's first step moves a weight by lr·g/(|g| + ε): ±lr unless its
        // gradient is tiny. Continued moments make much smaller steps of many sizes.
        let before = latest_weights(&s.root.join("stage1"));
        let after = latest_weights(&s.root.join(&run));
        let mut moved: Vec<f32> = before
            .iter()
            .zip(&after)
            .map(|(a, b)| (a - b).abs() / lr)
            .collect();
        moved.sort_by(f32::total_cmp);
        let median = moved[moved.len() / 2];
        if carry {
            assert!(median < 0.5, "median step {median}·lr: moments not carried");
        } else {
            assert!(
                median > 0.7,
                "median step {median}·lr for a fresh optimiser"
            );
        }
    }
}
