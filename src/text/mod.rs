//! The frozen text side: the CLIP tokenizer and the OpenCLIP text tower.

pub mod clip;
pub mod encoder;
pub mod open_clip_config;
pub mod tokenizer;

pub use clip::{ClipTextConfig, ClipTextEncoder};
pub use encoder::{Embeddings, TextEncoder, Tokens};

pub use tokenizer::ClipTokenizer;
