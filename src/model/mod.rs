//! The MicroDiT denoiser.

pub mod attention;
pub mod block;
pub mod config;
pub mod dit;
pub mod embeddings;
pub mod expert_choice;
pub mod feed_forward;
pub mod flops;
pub mod init;
pub mod layers;
pub mod masking;
pub mod params;
pub mod routing;
pub mod weights;

pub use crate::nn::precision::Precision;
pub use config::DitConfig;
pub use dit::MicroDit;
pub use init::Init;
pub use masking::PatchMask;
pub use routing::{Routing, TokenRoute, TrainingTokens};
