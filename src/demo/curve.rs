//! The adherence curve: the demo's model scored at a few points of its training
//! (`curve.json`, `adherence.png`), so that a person sees learning happen beside the loss
//! plots.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::score::Accuracy;
use crate::train::plot::Chart;

/// Files in the demo folder: the adherence curve and its plot.
pub const CURVE: &str = "curve.json";
pub const CURVE_PLOT: &str = "adherence.png";

/// One scoring of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    /// The stage's folder name (`stage1-masked`, …).
    pub stage: String,
    /// Optimiser steps over all stages so far.
    pub step: usize,
    /// Prompts per group (seen and held-out) it was scored on.
    pub prompts: usize,
    /// Per attribute, as in `report.json`.
    pub accuracy: Vec<Accuracy>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Curve {
    pub points: Vec<CurvePoint>,
}

/// The line colour of each attribute in `adherence.png`, in `score::CHANCE`'s order.
pub const LINE_COLOURS: [(&str, [u8; 3]); 4] = [
    ("red", [210, 40, 40]),
    ("blue", [40, 80, 210]),
    ("green", [30, 150, 60]),
    ("orange", [230, 140, 20]),
];

impl Curve {
    /// The curve saved in `path`, or an empty one.
    pub fn load(path: &Path) -> Result<Self> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", path.display())),
            Err(_) => Ok(Self::default()),
        }
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_json(path, self)
    }

    /// Whether the model was scored at `step` already.
    pub fn has(&self, step: usize) -> bool {
        self.points.iter().any(|p| p.step == step)
    }

    /// Adds a point, replacing one at the same step (a re-scored finished demo).
    pub fn record(&mut self, point: CurvePoint) {
        self.points.retain(|p| p.step != point.step);
        self.points.push(point);
        self.points.sort_by_key(|p| p.step);
    }

    /// Held-out accuracy per attribute against steps, each attribute's chance level as a
    /// faint horizontal line; accuracy 0 to 1 upwards.
    pub fn plot(&self, out: &Path) -> Result<()> {
        let last = self.points.last().map_or(1, |p| p.step).max(1) as f64;
        let mut chart = Chart::new((0.0, last), (0.0, 1.0));
        let attributes = self.points.first().map_or(0, |p| p.accuracy.len());
        let mut legend = Vec::new();
        for (k, (name, rgb)) in LINE_COLOURS.iter().enumerate().take(attributes) {
            let held: Vec<(f64, f64)> = self
                .points
                .iter()
                .filter_map(|p| Some((p.step as f64, p.accuracy[k].held_out?)))
                .collect();
            let chance = self.points[0].accuracy[k].chance;
            let faint = rgb.map(|c| 255 - (255 - c) / 4);
            chart.series(&[(0.0, chance), (last, chance)], faint);
            chart.series(&held, *rgb);
            chart.markers(&held, *rgb);
            legend.push(format!("{}: {name}", self.points[0].accuracy[k].attribute));
        }
        let meta = vec![
            (
                "lines".to_string(),
                format!(
                    "held-out accuracy per attribute ({}); faint: chance",
                    legend.join(", ")
                ),
            ),
            (
                "axes".to_string(),
                format!("steps 0 to {last}, accuracy 0 to 1"),
            ),
        ];
        chart.write(out, &meta)
    }

    /// The curve as a markdown table of held-out accuracies.
    pub fn table(&self) -> String {
        let Some(first) = self.points.first() else {
            return String::new();
        };
        let names: Vec<&str> = first
            .accuracy
            .iter()
            .map(|a| a.attribute.as_str())
            .collect();
        let mut md = format!("| step | stage | prompts | {} |\n", names.join(" | "));
        md += &format!("| ---: | --- | ---: |{}\n", " ---: |".repeat(names.len()));
        for p in &self.points {
            let cells: Vec<String> = p.accuracy.iter().map(|a| percent(a.held_out)).collect();
            md += &format!(
                "| {} | {} | {} | {} |\n",
                p.step,
                p.stage,
                p.prompts,
                cells.join(" | ")
            );
        }
        md
    }
}

/// The arm a demo folder belongs to: its name without a trailing `-SEED`.
fn arm_of(label: &str) -> &str {
    match label.rsplit_once('-') {
        Some((arm, seed)) if !seed.is_empty() && seed.bytes().all(|b| b.is_ascii_digit()) => arm,
        _ => label,
    }
}

/// The mean of a point's held-out accuracies (the attributes that have held-out prompts).
fn held_out_adherence(point: &CurvePoint) -> Option<f64> {
    let held: Vec<f64> = point.accuracy.iter().filter_map(|a| a.held_out).collect();
    (!held.is_empty()).then(|| held.iter().sum::<f64>() / held.len() as f64)
}

/// Several demos' held-out adherence (the mean of the attributes' held-out accuracies)
/// against steps, in one plot: `runs` are (folder name, curve), one line each; the folders
/// of one arm (names that differ only in a trailing `-SEED`) share a colour. Returns each
/// arm with its colour's name.
pub fn plot_runs(runs: &[(String, Curve)], out: &Path) -> Result<Vec<(String, &'static str)>> {
    let mut arms: Vec<&str> = Vec::new();
    for (label, _) in runs {
        if !arms.contains(&arm_of(label)) {
            arms.push(arm_of(label));
        }
    }
    ensure!(
        arms.len() <= LINE_COLOURS.len(),
        "{} arms ({}): one plot draws {} at most",
        arms.len(),
        arms.join(", "),
        LINE_COLOURS.len()
    );
    let last = runs
        .iter()
        .filter_map(|(_, c)| c.points.last())
        .map(|p| p.step)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut chart = Chart::new((0.0, last as f64), (0.0, 1.0));
    for (label, curve) in runs {
        let arm = arms.iter().position(|a| *a == arm_of(label)).unwrap_or(0);
        let rgb = LINE_COLOURS[arm].1;
        let line: Vec<(f64, f64)> = curve
            .points
            .iter()
            .filter_map(|p| Some((p.step as f64, held_out_adherence(p)?)))
            .collect();
        chart.series(&line, rgb);
        chart.markers(&line, rgb);
    }
    let legend: Vec<(String, &str)> = arms
        .iter()
        .zip(LINE_COLOURS)
        .map(|(arm, (colour, _))| (arm.to_string(), colour))
        .collect();
    let described: Vec<String> = legend.iter().map(|(a, c)| format!("{c}: {a}")).collect();
    let meta = vec![
        (
            "lines".to_string(),
            format!(
                "held-out adherence (mean of the attributes' held-out accuracy), one line per \
                 folder; {}",
                described.join(", ")
            ),
        ),
        (
            "axes".to_string(),
            format!("steps 0 to {last}, adherence 0 to 1"),
        ),
    ];
    chart.write(out, &meta)?;
    Ok(legend)
}

/// A rate as a whole percentage; a group without a prompt of some kind has none: "–".
pub fn percent(rate: Option<f64>) -> String {
    rate.map_or("–".to_string(), |r| format!("{:.0}%", 100.0 * r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(step: usize, colour: f64) -> CurvePoint {
        let accuracy = |attribute: &str, seen, held_out, chance| Accuracy {
            attribute: attribute.into(),
            seen,
            held_out,
            chance,
        };
        CurvePoint {
            stage: "stage1-masked".into(),
            step,
            prompts: 8,
            accuracy: vec![
                accuracy("colour", Some(0.5), Some(colour), 1.0 / 6.0),
                accuracy("count", None, None, 1.0 / 3.0),
            ],
        }
    }

    #[test]
    fn one_arms_seeds_share_a_colour_and_too_many_arms_are_refused() {
        assert_eq!(arm_of("p256-masked-routed-2"), "p256-masked-routed");
        assert_eq!(arm_of("abl-masked-10"), "abl-masked");
        assert_eq!(arm_of("demo"), "demo");
        assert_eq!(arm_of("run-a"), "run-a");
        let curve = Curve {
            points: vec![point(100, 0.25), point(200, 0.75)],
        };
        let runs: Vec<(String, Curve)> = ["masked-0", "masked-1", "routed-0", "unmasked-0"]
            .iter()
            .map(|l| (l.to_string(), curve.clone()))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("arms.png");
        let legend = plot_runs(&runs, &out).unwrap();
        let arms: Vec<&str> = legend.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(arms, ["masked", "routed", "unmasked"]);
        assert_eq!(legend[0].1, LINE_COLOURS[0].0);
        assert!(out.is_file());
        let five: Vec<(String, Curve)> = (0..5)
            .map(|k| (format!("arm{k}-0"), curve.clone()))
            .collect();
        let refused = plot_runs(&five, &dir.path().join("five.png")).unwrap_err();
        assert!(refused.to_string().contains("5 arms"), "{refused}");
        assert_eq!(held_out_adherence(&curve.points[1]), Some(0.75));
    }

    #[test]
    fn points_stay_in_step_order_and_a_rescored_step_replaces_its_point() {
        let mut curve = Curve::default();
        curve.record(point(200, 0.5));
        curve.record(point(100, 0.25));
        curve.record(point(200, 0.75));
        let steps: Vec<(usize, Option<f64>)> = curve
            .points
            .iter()
            .map(|p| (p.step, p.accuracy[0].held_out))
            .collect();
        assert_eq!(steps, vec![(100, Some(0.25)), (200, Some(0.75))]);
        assert!(curve.has(100) && !curve.has(150));
        let table = curve.table();
        assert!(
            table.contains("| 200 | stage1-masked | 8 | 75% | – |"),
            "{table}"
        );
    }

    #[test]
    fn the_curve_round_trips_through_its_file_and_plots() {
        let dir = tempfile::tempdir().unwrap();
        let mut curve = Curve::default();
        curve.record(point(10, 0.2));
        curve.record(point(20, 0.6));
        curve.save(&dir.path().join("curve.json")).unwrap();
        let back = Curve::load(&dir.path().join("curve.json")).unwrap();
        assert_eq!(back.points, curve.points);
        back.plot(&dir.path().join("adherence.png")).unwrap();
        assert!(Curve::load(&dir.path().join("missing.json"))
            .unwrap()
            .points
            .is_empty());
    }
}
