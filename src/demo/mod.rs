//! `microdit demo`: the whole system learning text conditioning on captioned shapes, on a CPU.

pub mod curve;
pub mod run;
pub mod score;
pub mod shapes;

pub use run::{run, DemoOptions, Scores, Variant, DEFAULT_IMAGE_SIZE};
