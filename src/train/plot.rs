//! `microdit plot`: the loss curve of a run (`metrics.jsonl`) as a PNG — raw loss in grey,
//! a running average in blue, log-scaled loss axis. The axis ranges go into the PNG's
//! text chunks and to stdout (no font rendering here).

use std::path::Path;

use anyhow::{ensure, Context, Result};

const W: usize = 800;
const H: usize = 400;
const MARGIN: usize = 20;

/// (step, loss) pairs of a run's metrics file; later lines win for a repeated step (a
/// resumed run logs the steps after its checkpoint again).
pub fn read_losses(metrics: &Path) -> Result<Vec<(f64, f64)>> {
    let text = std::fs::read_to_string(metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let mut by_step = std::collections::BTreeMap::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: line {}", metrics.display(), n + 1))?;
        if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
            by_step.insert(step, loss);
        }
    }
    Ok(by_step.into_iter().map(|(s, l)| (s as f64, l)).collect())
}

pub fn plot(run: &Path, out: &Path) -> Result<()> {
    let metrics = run.join(crate::run_dir::METRICS);
    let points = read_losses(&metrics)?;
    ensure!(
        points.len() >= 2,
        "{} has fewer than two logged steps",
        metrics.display()
    );
    let (x0, x1) = (points[0].0, points[points.len() - 1].0);
    let logs: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.1.max(1e-12).ln())).collect();
    let (y0, y1) = logs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &(_, v)| {
            (a.min(v), b.max(v))
        });
    let mut avg = logs[0].1;
    let smooth: Vec<(f64, f64)> = logs
        .iter()
        .map(|&(x, l)| {
            avg = 0.95 * avg + 0.05 * l;
            (x, avg)
        })
        .collect();
    let mut chart = Chart::new((x0, x1), (y0, y1));
    chart.series(&logs, [170, 170, 170]);
    chart.series(&smooth, [30, 80, 200]);
    let meta = vec![
        ("steps".to_string(), format!("{x0} to {x1}")),
        (
            "loss range".to_string(),
            format!("{:.5} to {:.5} (log scale)", y0.exp(), y1.exp()),
        ),
        ("run".to_string(), run.display().to_string()),
    ];
    chart.write(out, &meta)?;
    println!(
        "wrote {}: steps {x0}..{x1}, loss {:.5}..{:.5} (log scale), last {:.5}",
        out.display(),
        y0.exp(),
        y1.exp(),
        points[points.len() - 1].1
    );
    Ok(())
}

/// A line chart on a white canvas: two axes, then series drawn in data coordinates.
/// Labels go into the PNG's text chunks (no font rendering here).
pub struct Chart {
    canvas: Vec<u8>,
    x: (f64, f64),
    y: (f64, f64),
}

impl Chart {
    pub fn new(x: (f64, f64), y: (f64, f64)) -> Self {
        let mut chart = Self {
            canvas: vec![255u8; W * H * 3],
            x,
            y,
        };
        let (left, right, top, bottom) = (
            MARGIN as i64,
            (W - MARGIN) as i64,
            MARGIN as i64,
            (H - MARGIN) as i64,
        );
        line(
            &mut chart.canvas,
            (left, bottom),
            (right, bottom),
            [0, 0, 0],
        );
        line(&mut chart.canvas, (left, top), (left, bottom), [0, 0, 0]);
        chart
    }

    fn to_px(&self, (x, y): (f64, f64)) -> (i64, i64) {
        let (x0, x1) = self.x;
        let (y0, y1) = self.y;
        let px = MARGIN as f64 + (x - x0) / (x1 - x0).max(1e-12) * (W - 2 * MARGIN) as f64;
        let py = (H - MARGIN) as f64 - (y - y0) / (y1 - y0).max(1e-12) * (H - 2 * MARGIN) as f64;
        (px.round() as i64, py.round() as i64)
    }

    /// Straight segments through `points`.
    pub fn series(&mut self, points: &[(f64, f64)], rgb: [u8; 3]) {
        let px: Vec<(i64, i64)> = points.iter().map(|&p| self.to_px(p)).collect();
        for pair in px.windows(2) {
            line(&mut self.canvas, pair[0], pair[1], rgb);
        }
    }

    /// A 5×5 square at each point.
    pub fn markers(&mut self, points: &[(f64, f64)], rgb: [u8; 3]) {
        for &p in points {
            let (x, y) = self.to_px(p);
            for dy in -2..=2 {
                line(&mut self.canvas, (x - 2, y + dy), (x + 2, y + dy), rgb);
            }
        }
    }

    pub fn write(&self, out: &Path, meta: &[(String, String)]) -> Result<()> {
        crate::png_io::write_png(out, &self.canvas, W, H, meta)
    }
}

/// Bresenham's line, clipped to the canvas.
fn line(canvas: &mut [u8], (mut x, mut y): (i64, i64), (x1, y1): (i64, i64), rgb: [u8; 3]) {
    let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
    let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            canvas[i..i + 3].copy_from_slice(&rgb);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}
