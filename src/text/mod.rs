//! The frozen text side: the CLIP tokenizer and the OpenCLIP text tower.

pub mod tokenizer;

pub use tokenizer::ClipTokenizer;
