//! Captions to the embeddings the denoiser is conditioned on: CLIP tokens, then the text
//! tower's 77 output states. What `precompute` stores and what a pipeline samples from.

use anyhow::Result;
use burn::prelude::*;

use super::tokenizer::CONTEXT_LENGTH;
use super::{ClipTextConfig, ClipTextEncoder, ClipTokenizer};
use crate::backend::Backend;
use crate::hub::Hub;

pub struct TextEncoder<B: Backend> {
    pub tokenizer: ClipTokenizer,
    pub tower: ClipTextEncoder<B>,
    pub config: ClipTextConfig,
}

/// Caption embeddings [N, 77, width], and how many captions were longer than 77 tokens
/// (cut, keeping the end token, as the reference does).
pub struct Embeddings<B: Backend> {
    pub states: Tensor<B, 3>,
    pub truncated: usize,
}

impl<B: Backend> TextEncoder<B> {
    /// The tower of a local open_clip directory or Hub repository, with the bundled tokenizer.
    pub fn from_source(source: &str, hub: &Hub, device: &B::Device) -> Result<Self> {
        let (tower, config) = ClipTextEncoder::from_source(source, hub, device)?;
        Ok(Self {
            tokenizer: ClipTokenizer::new(),
            tower,
            config,
        })
    }

    pub fn encode(&self, captions: &[&str], device: &B::Device) -> Embeddings<B> {
        let mut tokens = Vec::with_capacity(captions.len() * CONTEXT_LENGTH);
        let mut truncated = 0;
        for caption in captions {
            let (ids, cut) = self.tokenizer.tokenize(caption);
            truncated += cut as usize;
            tokens.extend(ids.into_iter().map(i64::from));
        }
        let n = captions.len();
        let states = self.tower.forward(Tensor::from_data(
            TensorData::new(tokens, [n, CONTEXT_LENGTH]),
            device,
        ));
        Embeddings { states, truncated }
    }
}
