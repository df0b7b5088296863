//! Training.

pub mod checkpoint;
pub mod config;
pub mod optim;
pub mod plot;
pub mod preview;
pub mod trainer;
