//! `microdit generate` end to end through the real CLI, with tiny components: the fixtures'
//! text tower and VAE, and a small random-weight MicroDiT made here.

mod common;

use common::model::{tiny_model, TinyModel};

struct Setup {
    model: TinyModel,
    base: Vec<String>,
}

fn setup() -> Setup {
    let model = tiny_model();
    let mut base = vec!["generate".to_string()];
    base.extend(model.args.iter().cloned());
    Setup { model, base }
}

/// `microdit ARGS…` offline: (succeeded, everything printed).
fn microdit(args: &[String]) -> (bool, String) {
    let run = common::microdit_env(args, &[("HF_HUB_OFFLINE", "1".as_ref())]);
    (run.ok(), run.log())
}

fn generate(s: &Setup, extra: &[&str]) -> String {
    let mut args = s.base.clone();
    if extra.contains(&"--steps") {
        without(&mut args, "--steps");
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    let (ok, log) = microdit(&args);
    assert!(ok, "generate failed:\n{log}");
    log
}

/// Drops `flag` and its value from `args`.
fn without(args: &mut Vec<String>, flag: &str) {
    if let Some(at) = args.iter().position(|a| a == flag) {
        args.drain(at..at + 2);
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_image_and_png_reproduces_itself() {
    let s = setup();
    let path = |n: &str| s.model.root.join(n).to_str().unwrap().to_string();
    let log = generate(
        &s,
        &[
            "an owl with the moon behind it",
            "--seed",
            "7",
            "--out",
            &path("a.png"),
        ],
    );
    assert!(log.contains("wrote 1 image"), "{log}");
    generate(
        &s,
        &[
            "an owl with the moon behind it",
            "--seed",
            "7",
            "--out",
            &path("b.png"),
        ],
    );
    generate(
        &s,
        &[
            "an owl with the moon behind it",
            "--seed",
            "8",
            "--out",
            &path("c.png"),
        ],
    );
    let read = |n: &str| std::fs::read(s.model.root.join(n)).unwrap();
    assert_eq!(read("a.png"), read("b.png"), "same seed, same file");
    assert_ne!(read("a.png"), read("c.png"), "another seed, another image");

    let decoder = png::Decoder::new(std::io::Cursor::new(read("a.png")));
    let reader = decoder.read_info().unwrap();
    let side = s.model.resolution as u32;
    assert_eq!((reader.info().width, reader.info().height), (side, side));
    let text = microdit::png_io::read_png_text(&s.model.root.join("a.png")).unwrap();
    assert!(text.contains(&("prompt".into(), "an owl with the moon behind it".into())));
    assert!(text.contains(&("seed".into(), "7".into())));

    let (ok, log) = microdit(&[
        "generate".into(),
        "--from-png".into(),
        path("a.png"),
        "--out".into(),
        path("d.png"),
    ]);
    assert!(ok, "{log}");
    assert_eq!(
        read("a.png"),
        read("d.png"),
        "--from-png reproduces the file"
    );
}

#[test]
fn half_precision_generation_makes_nearly_the_same_image() {
    let s = setup();
    let path = |n: &str| s.model.root.join(n).to_str().unwrap().to_string();
    generate(
        &s,
        &["a lighthouse", "--seed", "3", "--out", &path("f32.png")],
    );
    generate(
        &s,
        &[
            "a lighthouse",
            "--seed",
            "3",
            "--dtype",
            "bf16",
            "--out",
            &path("bf16.png"),
        ],
    );
    let (a, b) = (
        pixels(&s.model.root.join("f32.png")),
        pixels(&s.model.root.join("bf16.png")),
    );
    assert_nearly_the_same(&a, &b, "bf16");
}

#[test]
fn int8_generation_quantises_as_it_loads_or_reads_a_quantised_file_alike() {
    let s = setup();
    let path = |n: &str| s.model.root.join(n).to_str().unwrap().to_string();
    let prompt = ["a lighthouse", "--seed", "3", "--out"];
    generate(&s, &[&prompt[..], &[&path("f32.png")]].concat());
    generate(
        &s,
        &[&prompt[..], &[&path("on-load.png"), "--dtype", "int8"]].concat(),
    );
    // `microdit quantize` with the same parts, then the file alone.
    let option = |flag: &str| {
        let at = s.base.iter().position(|a| a == flag).unwrap();
        s.base[at + 1].clone()
    };
    let mut quantize: Vec<String> = vec![
        "quantize".into(),
        option("--checkpoint"),
        path("int8.safetensors"),
    ];
    for flag in ["--model", "--resolution", "--vae"] {
        quantize.extend([flag.to_string(), option(flag)]);
    }
    let (ok, log) = microdit(&quantize);
    assert!(
        ok && log.contains("--dtype int8"),
        "quantize failed:\n{log}"
    );
    let mut from_file = s.base.clone();
    without(&mut from_file, "--checkpoint");
    from_file
        .extend(["--checkpoint", &path("int8.safetensors"), "--dtype", "int8"].map(String::from));
    from_file.extend(prompt.map(String::from));
    from_file.push(path("from-file.png"));
    let (ok, log) = microdit(&from_file);
    assert!(ok, "generate from the quantised file failed:\n{log}");

    let [float, on_load, from_file] =
        ["f32.png", "on-load.png", "from-file.png"].map(|n| pixels(&s.model.root.join(n)));
    assert_eq!(
        on_load, from_file,
        "the quantised file and quantising on load differ"
    );
    assert_nearly_the_same(&float, &on_load, "int8");
    let png = std::fs::read(s.model.root.join("from-file.png")).unwrap();
    let text = String::from_utf8_lossy(&png);
    assert!(
        text.contains("int8"),
        "the PNG does not record its precision"
    );
}

/// The `dtype` image differs from the f32 one (the option was not ignored), by less than 8
/// grey levels on average.
fn assert_nearly_the_same(float: &[u8], other: &[u8], dtype: &str) {
    assert_ne!(
        float, other,
        "--dtype {dtype} made the very image f32 made: is it ignored?"
    );
    let mean_diff = float
        .iter()
        .zip(other)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / float.len() as f64;
    assert!(
        mean_diff < 8.0,
        "{dtype} image differs by {mean_diff} grey levels on average"
    );
}

/// The decoded pixels of a PNG file.
fn pixels(path: &std::path::Path) -> Vec<u8> {
    common::png_pixels(&std::fs::read(path).unwrap())
}

#[test]
fn several_prompts_make_a_folder_of_seeded_images_and_a_grid() {
    let s = setup();
    let out = s.model.root.join("out");
    let prompts = s.model.root.join("prompts.txt");
    std::fs::write(&prompts, "a red circle\n\na blue square\n").unwrap();
    generate(
        &s,
        &[
            "--prompts",
            prompts.to_str().unwrap(),
            "--num-images",
            "2",
            "--seed",
            "10",
            "--grid",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let images = [
        ("000-00-seed10.png", "a red circle", 10),
        ("000-01-seed11.png", "a red circle", 11),
        ("001-00-seed12.png", "a blue square", 12),
        ("001-01-seed13.png", "a blue square", 13),
    ];
    for (name, prompt, seed) in images {
        let text = microdit::png_io::read_png_text(&out.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let settings = microdit::pipeline::GenerationSettings::from_png_text(text).unwrap();
        assert_eq!((settings.prompt.as_str(), settings.seed), (prompt, seed));
    }
    // Each image is the one its prompt and seed make alone.
    let alone = s.model.root.join("alone.png");
    generate(
        &s,
        &[
            "a blue square",
            "--seed",
            "13",
            "--out",
            alone.to_str().unwrap(),
        ],
    );
    assert_eq!(pixels(&alone), pixels(&out.join("001-01-seed13.png")));
    assert_ne!(
        pixels(&out.join("001-00-seed12.png")),
        pixels(&out.join("001-01-seed13.png"))
    );
    let grid = png::Decoder::new(std::io::Cursor::new(
        std::fs::read(out.join("grid.png")).unwrap(),
    ));
    let info = grid.read_info().unwrap();
    let (w, h) = (info.info().width, info.info().height);
    assert!(
        w * h >= 4 * 16 * 16 && w % 16 == 0 && h % 16 == 0,
        "grid {w}x{h}"
    );
}

#[test]
fn dpm_solver_images_record_their_sampler_and_reproduce() {
    let s = setup();
    let path = |n: &str| s.model.root.join(n);
    for (sampler, steps) in [("dpmpp-2m", "20"), ("dpmpp-2m-sde", "6")] {
        let file = path(&format!("{sampler}.png"));
        let log = generate(
            &s,
            &[
                "a lighthouse",
                "--sampler",
                sampler,
                "--steps",
                steps,
                "--out",
                file.to_str().unwrap(),
            ],
        );
        assert!(log.contains(&format!("{steps} steps, {sampler}")), "{log}");
        let text = microdit::png_io::read_png_text(&file).unwrap();
        assert!(
            text.contains(&("sampler".into(), sampler.into())),
            "{text:?}"
        );
        assert!(text.contains(&("steps".into(), steps.into())), "{text:?}");
        let again = path(&format!("{sampler}-again.png"));
        let (ok, log) = microdit(&[
            "generate".into(),
            "--from-png".into(),
            file.to_str().unwrap().into(),
            "--out".into(),
            again.to_str().unwrap().into(),
        ]);
        assert!(ok, "{log}");
        assert_eq!(
            std::fs::read(&file).unwrap(),
            std::fs::read(&again).unwrap()
        );
    }
    assert_ne!(
        pixels(&path("dpmpp-2m.png")),
        pixels(&path("dpmpp-2m-sde.png"))
    );
}

/// `generate` refuses what the server refuses, with the very message
/// (`Sampling::validate`, which both apply).
#[test]
fn out_of_range_sampling_is_refused_as_the_server_refuses_it() {
    let s = setup();
    let defaults = microdit::pipeline::Sampling::default();
    for (flags, change) in [
        (vec!["--steps", "0"], serde_json::json!({"steps": 0})),
        (vec!["--guidance=-1"], serde_json::json!({"guidance": -1.0})),
        (
            vec!["--guidance-interval", "3", "1"],
            serde_json::json!({"guidance_interval": [3.0, 1.0]}),
        ),
        (vec!["--s-noise", "0"], serde_json::json!({"s_noise": 0.0})),
        (
            vec!["--sampler", "dpmpp-2m", "--s-churn", "1"],
            serde_json::json!({"sampler": "dpmpp-2m", "s_churn": 1.0}),
        ),
    ] {
        let expected = defaults
            .with(change.as_object().unwrap().clone())
            .unwrap_err()
            .to_string();
        let mut args = s.base.clone();
        without(&mut args, "--steps");
        args.push("x".into());
        args.extend(flags.iter().map(|f| f.to_string()));
        let (ok, log) = microdit(&args);
        assert!(
            !ok && log.contains(&expected),
            "{flags:?}: want '{expected}':\n{log}"
        );
    }
}

#[test]
fn bad_requests_fail_clearly() {
    let s = setup();
    let mut args = s.base.clone();
    args.extend(["x".into(), "--dtype".into(), "f64".into()]);
    let (ok, log) = microdit(&args);
    assert!(!ok && log.contains("invalid value 'f64'"), "{log}");

    let mut args = s.base.clone();
    let at = args.iter().position(|a| a == "--checkpoint").unwrap() + 1;
    args[at] = "someone/missing-repo/model.pt".into();
    args.push("x".into());
    let (ok, log) = microdit(&args);
    assert!(
        !ok && log.contains("huggingface-cli download someone/missing-repo model.pt"),
        "{log}"
    );

    let (ok, log) = microdit(&s.base);
    assert!(!ok && log.contains("no prompt given"), "{log}");
}

/// A text tower of `width` and `layers` with zero weights, streamed to `dir` (OpenCLIP's
/// names and layout); returns the weights' size in bytes.
fn write_zero_text_tower(dir: &std::path::Path, width: usize, layers: usize) -> u64 {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({"model_cfg": {"embed_dim": width, "text_cfg": {
        "context_length": 77, "vocab_size": 49408, "width": width, "heads": width / 64,
        "layers": layers}}});
    std::fs::write(dir.join("open_clip_config.json"), config.to_string()).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embedding.weight".into(), vec![49408, width]),
        ("positional_embedding".into(), vec![77, width]),
        ("ln_final.weight".into(), vec![width]),
        ("ln_final.bias".into(), vec![width]),
    ];
    for l in 0..layers {
        let block =
            |name: &str, shape: Vec<usize>| (format!("transformer.resblocks.{l}.{name}"), shape);
        shapes.extend([
            block("attn.in_proj_weight", vec![3 * width, width]),
            block("attn.in_proj_bias", vec![3 * width]),
            block("attn.out_proj.weight", vec![width, width]),
            block("attn.out_proj.bias", vec![width]),
            block("ln_1.weight", vec![width]),
            block("ln_1.bias", vec![width]),
            block("ln_2.weight", vec![width]),
            block("ln_2.bias", vec![width]),
            block("mlp.c_fc.weight", vec![4 * width, width]),
            block("mlp.c_fc.bias", vec![4 * width]),
            block("mlp.c_proj.weight", vec![width, 4 * width]),
            block("mlp.c_proj.bias", vec![width]),
        ]);
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &shapes {
        let len = 4 * shape.iter().product::<usize>();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape,
            "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header).unwrap();
    header.resize(header.len().next_multiple_of(8), b' ');
    let file = std::fs::File::create(dir.join("open_clip_model.safetensors")).unwrap();
    let mut f = std::io::BufWriter::new(file);
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for chunk in (0..offset).step_by(zeros.len()) {
        f.write_all(&zeros[..zeros.len().min(offset - chunk)])
            .unwrap();
    }
    f.flush().unwrap();
    offset as u64
}

/// `peak memory X GiB` from generate's report, in bytes.
fn reported_peak(log: &str) -> u64 {
    let gib: f64 = log
        .split("peak memory ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no peak memory in the report:\n{log}"));
    (gib * (1u64 << 30) as f64) as u64
}

/// `generate` lets the text tower go once the prompts are encoded, before the denoiser
/// loads, and reads safetensors without mapping them: with a tower and a denoiser of a few
/// hundred MB each, its peak stays below the two together (held at once, or either one
/// beside its mapped file, it was above).
#[test]
fn generate_holds_the_text_tower_and_the_denoiser_one_at_a_time() {
    use microdit::model::{DitConfig, Init, MicroDit};
    let s = setup();
    let width = 1024;
    let text_dir = s.model.root.join("big-text");
    let text_bytes = write_zero_text_tower(&text_dir, width, 2);
    let tiny = DitConfig::from_file(&s.model.root.join("dit.json")).unwrap();
    // Two blocks (the first with four experts), whichever fixture set the tiny model came
    // from.
    let big = DitConfig {
        dim: width,
        head_dim: 64,
        caption_channels: width,
        depth: 2,
        qkv_multipliers: vec![1.0],
        ffn_multipliers: vec![4.0],
        num_experts: 4,
        experts_every_n: 1,
        patch_mixer_dim: 64,
        ..tiny
    };
    let dit_json = s.model.root.join("big-dit.json");
    std::fs::write(&dit_json, serde_json::to_string(&big).unwrap()).unwrap();
    let weights = s.model.root.join("big-dit.safetensors");
    let model =
        MicroDit::<microdit::backend::Cpu>::new(&big, &mut Init::reference(1, &Default::default()));
    microdit::model::weights::save_weights(&model, &weights).unwrap();
    drop(model);
    let dit_bytes = std::fs::metadata(&weights).unwrap().len();
    assert!(
        text_bytes > 250 << 20 && dit_bytes > 250 << 20,
        "{text_bytes} {dit_bytes}"
    );

    let mut args = s.base.clone();
    for flag in ["--model", "--checkpoint", "--text-encoder"] {
        without(&mut args, flag);
    }
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    args.extend([
        "--model".into(),
        path(&dit_json),
        "--checkpoint".into(),
        path(&weights),
        "--text-encoder".into(),
        path(&text_dir),
        "--out".into(),
        path(&s.model.root.join("big.png")),
        "a red circle".into(),
    ]);
    let (ok, log) = microdit(&args);
    assert!(ok, "generate failed:\n{log}");
    let peak = reported_peak(&log);
    assert!(
        peak < text_bytes + dit_bytes,
        "peak memory {} MiB, the text tower {} MiB and the denoiser {} MiB\n{log}",
        peak >> 20,
        text_bytes >> 20,
        dit_bytes >> 20
    );
}
