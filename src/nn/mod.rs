//! Pieces both the frozen text tower and the denoiser are built from: autocast-style mixed
//! precision ([`precision`]) and small tensor helpers. Below `text/`, `vae/` and `model/`,
//! so that neither imports the other.

pub mod linear;
pub mod precision;

use burn::prelude::*;

/// Splits the last dimension of `x` into `N` equal parts (PyTorch's `chunk(N, -1)`).
pub fn split_last<B: Backend, const D: usize, const N: usize>(
    x: Tensor<B, D>,
) -> [Tensor<B, D>; N] {
    <[Tensor<B, D>; N]>::try_from(x.chunk(N, D - 1)).expect("last dimension divisible into N parts")
}
