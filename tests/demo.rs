//! `microdit demo` end to end at a tiny size: every output is written, the scorer reads real
//! images, and a second call resumes instead of starting over.

use microdit::backend::Cpu;
use microdit::backend::{CpuDevice, Trainable};
use microdit::demo::{run, DemoOptions, Variant};

#[test]
fn a_tiny_demo_writes_its_outputs_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DemoOptions {
        out: dir.path().join("demo"),
        minutes: 0.2,
        variant: Variant::Masked,
        train_images: 120,
        eval_prompts: 3,
        seed: 5,
        quiet: true,
    };
    let device = CpuDevice::default();
    let scores = run::<Trainable<Cpu>>(&opts, &device).unwrap();
    for file in [
        "samples.png",
        "loss-stage1.png",
        "loss-stage2.png",
        "report.md",
        "report.json",
    ] {
        assert!(opts.out.join(file).exists(), "{file} missing");
    }
    assert_eq!(scores.scorer_accuracy_on_real_images, 1.0);
    assert_eq!(scores.accuracy.len(), 4);
    let data = microdit::data::MdsDataset::open(&opts.out.join("data")).unwrap();
    assert_eq!(data.len(), 120);

    let plan = std::fs::read(opts.out.join("plan.json")).unwrap();
    let again = run::<Trainable<Cpu>>(&opts, &device).unwrap();
    assert_eq!(std::fs::read(opts.out.join("plan.json")).unwrap(), plan);
    // Resumed from finished stages, the same weights give the same samples and scores.
    assert_eq!(again.frechet_distance, scores.frechet_distance);
}
