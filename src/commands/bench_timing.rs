//! The benchmarks' clock and report lines, which `bench` and `bench_frozen` share.

use std::time::Instant;

/// Median of `iters` timed runs after `warmup` untimed ones; each run's time goes to stderr
/// as it finishes, labelled with `what`.
pub fn time(what: &str, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
    let mut timed = Vec::new();
    for i in 0..warmup + iters.max(1) {
        let start = Instant::now();
        f();
        let seconds = start.elapsed().as_secs_f64();
        let kind = if i < warmup { "warm-up" } else { "timed" };
        eprintln!("  {what}: run {} ({kind}) {seconds:.3} s", i + 1);
        if i >= warmup {
            timed.push(seconds);
        }
    }
    timed.sort_by(f64::total_cmp);
    timed[timed.len() / 2]
}

pub fn report(what: &str, seconds: f64, count: usize, unit: &str) {
    println!(
        "{what:<40} {seconds:>9.3} s   {:>8.2} {unit}/s",
        count as f64 / seconds
    );
}
