//! MicroDiT — the Sparse Elucidated Latent Diffusion Transformer of *Stretching Each Dollar:
//! Diffusion Training from Scratch on a Micro-Budget* — on burn.
//!
//! Data flows one way: `data` → `model` → `edm` loss → `train` (optimiser); `edm` samplers
//! call `model`.

pub mod backend;
pub mod commands;
pub mod data;
pub mod demo;
pub mod edm;
pub mod eval;
pub mod hub;
pub mod io;
pub mod memory;
pub mod model;
pub mod nn;
pub mod pipeline;
pub mod png_io;
pub mod precompute;
pub mod progress;
pub mod random;
pub mod run_dir;
pub mod serve;
pub mod state_dict;
pub mod text;
pub mod train;
pub mod vae;
