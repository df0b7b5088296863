//! The demo's report: what each stage trained, the final scores and the adherence curve, as
//! `report.md` (also printed) and `report.json`.

use std::path::PathBuf;

use anyhow::Result;

use super::curve::{percent, Curve, CURVE, CURVE_PLOT, LINE_COLOURS};
use super::evaluation::Scores;
use super::options::DemoOptions;
use crate::model::routing::{RouteSpan, Sparsity};

/// What a finished stage did, for the report.
pub(super) struct TrainedStage {
    pub dir: PathBuf,
    pub steps: usize,
    pub sparsity: Sparsity,
}

/// ", routing 50% past blocks 1..=2", or nothing.
pub(super) fn routing_note(route: Option<RouteSpan>) -> String {
    route.map_or(String::new(), |span| {
        format!(
            ", routing {:.0}% past blocks {}..={}",
            100.0 * span.share,
            span.first_block,
            span.last_block
        )
    })
}

pub(super) fn write_report(
    opts: &DemoOptions,
    trained: &[TrainedStage],
    scores: &Scores,
    curve: &Curve,
    seconds: f64,
) -> Result<()> {
    let mut md = format!(
        "# microdit demo: {:?}\n\nBudget {} min, this run {:.1} min. {} training images ({} px), {} \
         prompts per group.\n\n",
        opts.variant,
        opts.minutes,
        seconds / 60.0,
        opts.train_images,
        opts.image_size,
        opts.eval_prompts
    );
    for stage in trained {
        md += &format!(
            "- {}: {} steps, mask ratio {}{}\n",
            stage.dir.display(),
            stage.steps,
            stage.sparsity.mask_ratio,
            routing_note(stage.sparsity.route)
        );
    }
    let s = &opts.sampling;
    md += &format!(
        "- samples: {} {} steps ({} network evaluations), guidance {}, denoiser in {}\n",
        s.steps,
        s.sampler,
        s.evaluations(),
        s.guidance,
        opts.dtype
    );
    md += "\n| attribute | seen combinations | held-out combinations | chance |\n| --- | ---: | ---: | ---: |\n";
    for a in &scores.accuracy {
        md += &format!(
            "| {} | {} | {} | {} |\n",
            a.attribute,
            percent(a.seen),
            percent(a.held_out),
            percent(Some(a.chance))
        );
    }
    md += &format!(
        "\nFréchet distance to the generator's images (scorer features): {:.4} (two draws of \
         real images: {:.4}). The scorer reads the generator's own images right {:.0}% of the \
         time.\n\n`samples.png`: each prompt's sample beside a real image for it (seen prompts \
         first, then held-out); `loss-stage*.png`: training losses.\n",
        scores.frechet_distance,
        scores.frechet_distance_between_real_sets,
        100.0 * scores.scorer_accuracy_on_real_images
    );
    let lines: Vec<String> = scores
        .accuracy
        .iter()
        .zip(LINE_COLOURS)
        .map(|(a, (colour, _))| format!("{} {colour}", a.attribute))
        .collect();
    md += &format!(
        "\n## Learning\n\nHeld-out accuracy as training went (`{CURVE}`; plotted in \
         `{CURVE_PLOT}`: {}, chance as faint lines; the points before the last are scored on \
         the first quarter of the prompts):\n\n{}",
        lines.join(", "),
        curve.table()
    );
    crate::io::write_atomic(&opts.out.join("report.md"), |f| {
        std::io::Write::write_all(f, md.as_bytes())
    })?;
    crate::io::write_json(&opts.out.join("report.json"), scores)?;
    eprintln!("{md}");
    Ok(())
}
