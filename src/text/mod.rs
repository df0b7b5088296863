//! The frozen text side: the CLIP tokenizer and the OpenCLIP text tower.

pub mod clip;
pub mod tokenizer;

pub use clip::{ClipTextConfig, ClipTextEncoder};

pub use tokenizer::ClipTokenizer;
