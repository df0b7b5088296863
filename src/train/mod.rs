//! Training.

pub mod optim;
