//! `nn.Linear` as every network here uses it: its weight f32 (or bf16/f16) as trained, or
//! int8 for generation ([`Int8Matrix`]).
//!
//! Named `Linear` with `weight` and `bias`, as burn's is, so that burn-store's PyTorch
//! adapters transpose and name it as they do burn's. A quantised layer has no `weight`;
//! its `weight_int8` holds the rows of PyTorch's `Linear.weight` ([d_out, d_in]), each
//! output channel with its own scale.

use burn::module::{Param, ParamId};
use burn::prelude::*;
use burn::tensor::DType;

use crate::backend::{self, MicroditBackend};
use crate::nn::precision::cast;

#[derive(Module, Debug)]
pub struct Linear<B: MicroditBackend> {
    /// [d_in, d_out]; `None` in a quantised layer.
    pub weight: Option<Param<Tensor<B, 2>>>,
    /// The weight in int8; `None` unless quantised.
    pub weight_int8: Option<Int8Matrix<B>>,
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: MicroditBackend> Linear<B> {
    /// A float layer of `weight` [d_in, d_out].
    pub fn new(weight: Param<Tensor<B, 2>>, bias: Option<Param<Tensor<B, 1>>>) -> Self {
        Self {
            weight: Some(weight),
            weight_int8: None,
            bias,
        }
    }

    /// A float layer `d_in -> d_out` of zeros, allocated only if read before weights are
    /// loaded into it.
    pub fn zeros(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        Self::new(
            lazy_zeros([d_in, d_out], device),
            bias.then(|| lazy_zeros([d_out], device)),
        )
    }

    /// A quantised layer `d_in -> d_out` of zeros, to load weights into.
    pub fn int8_zeros(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Self {
        Self {
            weight: None,
            weight_int8: Some(Int8Matrix::zeros(d_out, d_in, device)),
            bias: bias.then(|| lazy_zeros([d_out], device)),
        }
    }

    /// The width of the output.
    pub fn d_out(&self) -> usize {
        match (&self.weight, &self.weight_int8) {
            (Some(w), _) => w.lazy_shape().dims::<2>()[1],
            (None, Some(w)) => w.rows(),
            (None, None) => unreachable!("a linear layer holds a float or an int8 weight"),
        }
    }

    /// `x W + b` over the last dimension, leading dimensions folded into one matrix: in the
    /// weight's type (autocast casts a product's operands to the low precision), or through
    /// the int8 product from f32.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let d_in = dims[D - 1];
        let y = match (&self.weight, &self.weight_int8) {
            (Some(w), _) => {
                let w = w.val();
                backend::matmul(cast(x, w.dtype()).reshape([rows, d_in]), w)
            }
            (None, Some(w)) => w
                .matmul(x.reshape([1, rows, d_in]))
                .reshape([rows, w.rows()]),
            (None, None) => unreachable!("a linear layer holds a float or an int8 weight"),
        };
        let y = match &self.bias {
            Some(bias) => y + bias.val().unsqueeze_dim(0),
            None => y,
        };
        dims[D - 1] = y.dims()[1];
        y.reshape(dims)
    }
}

/// A weight in int8, one scale per row: row `r` stands for `values[r] · scales[r]`. The
/// rows are the outputs of the product and hold its inputs contiguously (PyTorch's
/// `Linear.weight` layout), as [`backend::int8`]'s kernels read them.
#[derive(Module, Debug)]
pub struct Int8Matrix<B: MicroditBackend> {
    /// [rows, k] in [-127, 127].
    pub values: Param<Tensor<B, 2, Int>>,
    /// [rows], f32.
    pub scales: Param<Tensor<B, 1>>,
    /// Σ of each row of `values`, summed at the first product and kept (the weights do not
    /// change once loaded; every loader fills a new skeleton). Not part of the state dict.
    #[module(skip)]
    row_sums: std::sync::OnceLock<Vec<i32>>,
}

impl<B: MicroditBackend> Int8Matrix<B> {
    /// `rows` × `k` zeros, allocated only if read before weights are loaded into them.
    pub fn zeros(rows: usize, k: usize, device: &B::Device) -> Self {
        let values = Param::uninitialized(
            ParamId::new(),
            move |device, _| {
                Tensor::from_data(untouched_zeros::<i8, 2>([rows, k]), (device, DType::I8))
            },
            device.clone(),
            false,
            Shape::new([rows, k]),
        );
        Self {
            values,
            scales: lazy_zeros([rows], device),
            row_sums: std::sync::OnceLock::new(),
        }
    }

    pub fn rows(&self) -> usize {
        self.scales.lazy_shape().num_elements()
    }

    /// `x · Wᵀ` for `x` [batch, m, k] against the rows as `batch` matrices of `rows / batch`
    /// rows each: [batch, m, rows / batch], in f32.
    pub fn matmul(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let values = self.values.val();
        let row_sums = self.row_sums.get_or_init(|| {
            let sums = backend::int8_row_sums(values.clone()).into_data();
            sums.convert::<i32>().into_vec().expect("I32 sums")
        });
        let row_sums = Tensor::from_data(
            TensorData::new(row_sums.clone(), [row_sums.len()]),
            (&values.device(), DType::I32),
        );
        backend::int8_matmul(cast(x, DType::F32), values, self.scales.val(), row_sums)
    }
}

/// A parameter of zeros that is allocated when first read: weights about to be loaded
/// never are, and where something reads them first (burn-store's collection of a model's
/// names and shapes does) their pages stay untouched ([`untouched_zeros`]).
pub fn lazy_zeros<B: MicroditBackend, const D: usize>(
    shape: [usize; D],
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::uninitialized(
        ParamId::new(),
        move |device, require_grad| {
            Tensor::from_data(untouched_zeros::<f32, D>(shape), (device, DType::F32))
                .set_require_grad(require_grad)
        },
        device.clone(),
        true,
        Shape::new(shape),
    )
}

/// Zeros in a freshly allocated zeroed vector, which the CPU backend keeps as it is: pages
/// the system maps in only once they are written, so a model skeleton about to be loaded
/// costs no resident memory (burn's `zeros` copies its zeros into an aligned buffer,
/// touching every page).
fn untouched_zeros<E: burn::tensor::Element + Default, const D: usize>(
    shape: [usize; D],
) -> TensorData {
    TensorData::new(vec![E::default(); shape.iter().product()], shape)
}
