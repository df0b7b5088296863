//! Progress bars for long work, one look everywhere: `label [=====>    ] 3/10 unit …`.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `len` items called `unit` (indicatif hides it when stderr is not a terminal).
pub fn bar(len: usize, label: &str, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let template =
        format!("{{prefix}} [{{bar:30}}] {unit} {{pos}}/{{len}} {{per_sec}} eta {{eta}}");
    bar.set_style(
        ProgressStyle::with_template(&template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}
