//! Training data: MDS shards of precomputed latents and caption embeddings.

pub mod batch;
pub mod latents;
pub mod mds;
pub mod preprocess;
pub mod sources;

pub use mds::{MdsDataset, Sample, Value};
