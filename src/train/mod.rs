//! Training.

pub mod checkpoint;
pub mod config;
pub mod distributed;
pub mod optim;
pub mod plot;
pub mod preview;
pub mod stages;
pub mod trainer;
