//! `microdit demo`: the whole system learning text conditioning on captioned shapes, on a CPU.

mod budget;
pub mod curve;
mod evaluation;
mod options;
mod report;
pub mod run;
pub mod score;
pub mod shapes;

pub use evaluation::Scores;
pub use options::{DemoOptions, Variant, DEFAULT_IMAGE_SIZE};
pub use run::run;
