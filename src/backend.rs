//! The backends the binary runs on: burn-flex on CPU by default, CUDA with `--features cuda`.

pub type Cpu = burn::backend::Flex;
pub type CpuDevice = burn::backend::flex::FlexDevice;
pub type Trainable<B> = burn::backend::Autodiff<B>;

#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;
