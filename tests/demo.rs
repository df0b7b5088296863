//! `microdit demo` end to end at a tiny size: every output is written, the scorer reads real
//! images, and a second call resumes instead of starting over.

mod common;

use microdit::backend::Cpu;
use microdit::backend::{CpuDevice, Trainable};
use microdit::demo::{run, DemoOptions, Variant, DEFAULT_IMAGE_SIZE};
use microdit::model::Precision;

#[test]
fn a_tiny_demo_writes_its_outputs_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        out: dir.path().join("demo"),
        minutes: 0.2,
        variant: Variant::Masked,
        image_size: DEFAULT_IMAGE_SIZE,
        train_images: 120,
        eval_prompts: 3,
        seed: 5,
        quiet: true,
        sampling: DemoOptions::default_sampling(),
        dtype: Precision::F32,
        model: None,
    };
    // Two replicas, as `microdit demo` trains on a 2-core machine.
    let devices = [CpuDevice::default(), CpuDevice::default()];
    let scores = run::<Trainable<Cpu>>(&opts, &devices).unwrap();
    for file in [
        "samples.png",
        "loss-stage1.png",
        "loss-stage2.png",
        "report.md",
        "report.json",
        "curve.json",
        "adherence.png",
    ] {
        assert!(opts.out.join(file).exists(), "{file} missing");
    }
    // Scored part-way (the masked stage's thirds, its end) and at the end, in step order,
    // the last point being the final scores.
    let curve = microdit::demo::curve::Curve::load(&opts.out.join("curve.json")).unwrap();
    let steps: Vec<usize> = curve.points.iter().map(|p| p.step).collect();
    assert!(
        steps.len() >= 2 && steps.windows(2).all(|w| w[0] < w[1]),
        "{steps:?}"
    );
    assert_eq!(curve.points.last().unwrap().accuracy, scores.accuracy);
    let report = std::fs::read_to_string(opts.out.join("report.md")).unwrap();
    assert!(report.contains("## Learning"), "{report}");
    assert_eq!(scores.scorer_accuracy_on_real_images, 1.0);
    assert_eq!(scores.accuracy.len(), 4);
    let data = microdit::data::MdsDataset::open(&opts.out.join("data")).unwrap();
    assert_eq!(data.len(), 120);

    let plan = std::fs::read(opts.out.join("plan.json")).unwrap();
    let again = run::<Trainable<Cpu>>(&opts, &devices).unwrap();
    assert_eq!(std::fs::read(opts.out.join("plan.json")).unwrap(), plan);
    // Resumed from finished stages, the same weights give the same samples and scores.
    assert_eq!(again.frechet_distance, scores.frechet_distance);
    // A folder made at one image size is not resumed at another.
    let other = DemoOptions {
        image_size: 2 * DEFAULT_IMAGE_SIZE,
        ..opts.clone()
    };
    let refused = run::<Trainable<Cpu>>(&other, &devices).unwrap_err();
    assert!(
        format!("{refused:#}").contains(&format!("--image-size {DEFAULT_IMAGE_SIZE}")),
        "{refused:#}"
    );
    // Nor with another seed, whose prompts its text tower and weights were not made for.
    let reseeded = DemoOptions {
        seed: opts.seed + 1,
        ..opts.clone()
    };
    let refused = run::<Trainable<Cpu>>(&reseeded, &devices).unwrap_err();
    assert!(
        format!("{refused:#}").contains(&format!("--seed {}", opts.seed)),
        "{refused:#}"
    );
    // Nor with another architecture, which would leave its dit.json unlike its checkpoints.
    let dit = std::fs::read(opts.out.join("dit.json")).unwrap();
    let no_mixer = DemoOptions {
        variant: Variant::MaskedNoMixer,
        ..opts.clone()
    };
    let refused = run::<Trainable<Cpu>>(&no_mixer, &devices).unwrap_err();
    assert!(
        format!("{refused:#}").contains("another architecture"),
        "{refused:#}"
    );
    assert_eq!(std::fs::read(opts.out.join("dit.json")).unwrap(), dit);

    // `generate` finds the demo model's text tower and codec in its pipeline.json.
    let png = dir.path().join("red.png");
    let run = common::microdit(&[
        "generate".as_ref(),
        "--checkpoint".as_ref(),
        opts.out.join("stage2-finetune").as_os_str(),
        "a red circle".as_ref(),
        "--out".as_ref(),
        png.as_os_str(),
    ]);
    assert!(run.ok(), "{}", run.log());
    let settings = microdit::pipeline::GenerationSettings::from_png_text(
        microdit::png_io::read_png_text(&png).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            settings.vae.as_str(),
            settings.resolution,
            settings.sampling.steps
        ),
        ("space-to-depth:2", DEFAULT_IMAGE_SIZE, 18)
    );

    // The demo's folder itself means its newest stage, for `generate` as for `serve --run`.
    let whole = dir.path().join("whole.png");
    let run = common::microdit(&[
        "generate".as_ref(),
        "--checkpoint".as_ref(),
        opts.out.as_os_str(),
        "a red circle".as_ref(),
        "--out".as_ref(),
        whole.as_os_str(),
    ]);
    assert!(run.ok(), "{}", run.log());
    let pixels = |p: &std::path::Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(
        pixels(&whole),
        pixels(&png),
        "the newest stage is stage2-finetune"
    );
}
