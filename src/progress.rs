//! Progress bars for long work, one look everywhere:
//! `label [=====>    ] unit 3/10 1.2/s eta 5s message`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar over `len` items called `unit` (indicatif hides it when stderr is not a terminal);
/// `set_message` text follows the counts.
pub fn bar(len: usize, label: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let template =
        format!("{{prefix}} [{{bar:30}}] {unit} {{pos}}/{{len}} {{per_sec}} eta {{eta}} {{msg}}");
    bar.set_style(
        ProgressStyle::with_template(&template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// [`bar`], drawn nowhere when `quiet` (tests, logs, ranks other than the first).
pub fn bar_unless(quiet: bool, len: usize, label: &str, unit: &str) -> ProgressBar {
    let bar = bar(len, label, unit);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar
}
