//! Captions to the embeddings the denoiser is conditioned on: CLIP tokens, then the text
//! tower's output states (77 of them for CLIP's context). What `precompute` stores and what
//! a pipeline samples from.

use anyhow::Result;
use burn::prelude::*;

use super::{ClipTextConfig, ClipTextEncoder, ClipTokenizer};
use crate::backend::MicroditBackend;
use crate::hub::Hub;

pub struct TextEncoder<B: MicroditBackend> {
    pub tokenizer: ClipTokenizer,
    pub tower: ClipTextEncoder<B>,
    pub config: ClipTextConfig,
}

/// Caption embeddings [N, context, width], and how many captions were longer than the
/// context
/// (cut, keeping the end token, as the reference does).
pub struct Embeddings<B: MicroditBackend> {
    pub states: Tensor<B, 3>,
    pub truncated: usize,
}

/// Token ids [N, context], where each caption's end token is, and how many were cut.
pub struct Tokens<B: MicroditBackend> {
    pub ids: Tensor<B, 2, Int>,
    pub ends: Vec<usize>,
    pub truncated: usize,
}

/// The end token has the largest id, so open_clip finds it with `argmax` (the first
/// maximum).
fn end_position(ids: &[u32]) -> usize {
    let largest = ids.iter().copied().max().unwrap_or(0);
    ids.iter().position(|&t| t == largest).unwrap_or(0)
}

impl<B: MicroditBackend> TextEncoder<B> {
    /// The tower of a local open_clip directory or Hub repository, with the bundled tokenizer.
    pub fn from_source(source: &str, hub: &Hub, device: &B::Device) -> Result<Self> {
        let (tower, config) = ClipTextEncoder::from_source(source, hub, device)?;
        Ok(Self {
            tokenizer: ClipTokenizer::new().with_context_length(config.context_length),
            tower,
            config,
        })
    }

    pub fn encode(&self, captions: &[&str], device: &B::Device) -> Embeddings<B> {
        let tokens = self.tokenize(captions, device);
        Embeddings {
            states: self.tower.forward(tokens.ids),
            truncated: tokens.truncated,
        }
    }

    pub fn tokenize(&self, captions: &[&str], device: &B::Device) -> Tokens<B> {
        let context = self.tokenizer.context_length;
        let mut ids = Vec::with_capacity(captions.len() * context);
        let (mut ends, mut truncated) = (Vec::new(), 0);
        for caption in captions {
            let (tokens, cut) = self.tokenizer.tokenize(caption);
            truncated += cut as usize;
            ends.push(end_position(&tokens));
            ids.extend(tokens.into_iter().map(i64::from));
        }
        let n = captions.len();
        Tokens {
            ids: Tensor::from_data(TensorData::new(ids, [n, context]), device),
            ends,
            truncated,
        }
    }
}
