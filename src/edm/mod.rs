//! Elucidated diffusion (EDM): preconditioning, the training loss and the samplers.

pub mod config;
pub mod dpm_solver;
pub mod loss;
pub mod precond;
pub mod sampler;

pub use config::EdmConfig;
pub use loss::{edm_loss, LossNoise};
pub use precond::{denoise, Guidance};
pub use sampler::{karras_sigmas, sample, Churn, Sampler};
