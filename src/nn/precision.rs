//! Mixed precision as PyTorch's autocast does it: matrix products and attention in the
//! low-precision weights' type (bf16/f16, f32 accumulation), layer norms and softmax in f32,
//! and every other operation in the wider of its operands' types. In f32 every cast here
//! is the identity.

use burn::module::{ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, FloatDType};
use serde::{Deserialize, Serialize};

use crate::backend::{matmul, scaled_layer_norm, MicroditBackend};

/// The type a model computes its products in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
    /// Generation only: the transformer blocks' weights in int8, activations quantised per
    /// token at run time, everything else in f32 (`model::weights::load_quantized`).
    Int8,
}

/// As the command line and the settings files spell it.
impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let value = clap::ValueEnum::to_possible_value(self).expect("no variant is skipped");
        f.write_str(value.get_name())
    }
}

impl Precision {
    /// The float type of the weights that stay float and of the activations.
    pub fn dtype(self) -> FloatDType {
        match self {
            Self::F32 | Self::Int8 => FloatDType::F32,
            Self::Bf16 => FloatDType::BF16,
            Self::F16 => FloatDType::F16,
        }
    }
}

/// `x` in `dtype`; no operation (and no autodiff node) when it already is.
pub fn cast<B: MicroditBackend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype {
        x
    } else {
        x.cast(FloatDType::from(dtype))
    }
}

pub fn to_f32<B: MicroditBackend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    cast(x, DType::F32)
}

/// The wider of two float types (f32 over bf16/f16), as PyTorch promotes mixed operands.
fn wider(a: DType, b: DType) -> DType {
    if a == DType::F32 || b == DType::F32 {
        DType::F32
    } else {
        a
    }
}

/// The widest of some float types, as PyTorch promotes mixed operands.
pub fn widest(types: &[DType]) -> DType {
    types.iter().copied().fold(types[0], wider)
}

/// Both operands in the wider of their types.
pub fn promote<B: MicroditBackend, const D: usize, const E: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, E>,
) -> (Tensor<B, D>, Tensor<B, E>) {
    let dtype = wider(a.dtype(), b.dtype());
    (cast(a, dtype), cast(b, dtype))
}

/// `x @ w` in `w`'s type (autocast casts a product's operands to the low precision).
pub fn matmul_in_weight_type<B: MicroditBackend, const D: usize>(
    x: Tensor<B, D>,
    w: Tensor<B, D>,
) -> Tensor<B, D> {
    matmul(cast(x, w.dtype()), w)
}

/// LayerNorm without parameters over the last dimension (the q/k norms), in f32: the
/// layer norm with a scale of ones (exact: x·1 = x).
pub fn normalize<B: MicroditBackend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    let x = to_f32(x);
    let ones = Tensor::<B, 1>::ones([x.dims()[D - 1]], (&x.device(), DType::F32));
    scaled_layer_norm(x, ones, eps)
}

/// Softmax in f32.
pub fn softmax_f32<B: MicroditBackend, const D: usize>(
    x: Tensor<B, D>,
    dim: usize,
) -> Tensor<B, D> {
    softmax(to_f32(x), dim)
}

/// Casts every float parameter to `dtype` except LayerNorm weights, which autocast keeps in
/// f32 (a norm computes in f32 from its f32 master weights).
pub struct LowPrecisionCopy {
    pub dtype: FloatDType,
    containers: Vec<String>,
}

impl LowPrecisionCopy {
    pub fn new(dtype: FloatDType) -> Self {
        Self {
            dtype,
            containers: Vec::new(),
        }
    }
}

impl<B: MicroditBackend> ModuleMapper<B> for LowPrecisionCopy {
    fn enter_module(&mut self, _name: &str, container_type: &str) {
        self.containers.push(container_type.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.containers.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if self.containers.last().map(String::as_str) == Some("Struct:LayerNorm") {
            return param;
        }
        let dtype = self.dtype;
        param.map(|t| t.cast(dtype))
    }
}
