//! The backends microdit runs on, and the operations it adds to burn's through burn's
//! backend extension (a trait over `burn::tensor::backend::Backend`, implemented per
//! backend, with its own backward under autodiff).
//!
//! - CPU: burn-flex (`Cpu`), the default.
//! - NVIDIA GPUs: burn's cubecl backend on the CUDA runtime (`Cuda`, with `--features cuda`),
//!   without burn's operation fusion: the hot operations are microdit's own kernels with
//!   fixed strategies (`cube.rs`), so a cold start compiles few kernels and nothing is
//!   autotuned on the hot path.
//!
//! What each precision computes in (the same on every backend):
//! - f32: true f32 arithmetic. On CUDA the matrix products run on the plain f32 units, not
//!   TF32 tensor cores, so CPU and GPU agree to float32 rounding (as PyTorch's default
//!   `allow_tf32 = False` for matmuls).
//! - bf16/f16: matrix products and attention with f16/bf16 operands and f32 accumulation;
//!   layer norms, softmax and the loss in f32 (PyTorch autocast's rules, `nn::precision`).

mod autodiff;
#[cfg(feature = "cuda")]
pub mod cube;
#[cfg(feature = "cuda")]
pub mod cublas;
#[cfg(feature = "cuda")]
pub mod cuda_runtime;
mod flex;
pub mod gelu;
pub mod layer_norm;
pub mod modulation;
// cuBLAS's product plans, a pure function tested on the CPU (used by `cublas.rs`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod gemm_plan;
#[cfg(feature = "cuda")]
pub mod nccl;

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions, FloatTensor, IntTensor, ModuleOps};
use burn::tensor::{Bool, DType, FloatDType, Int, Shape, Tensor, TensorMetadata, TensorPrimitive};

pub type Cpu = burn::backend::Flex;
pub type CpuDevice = burn::backend::flex::FlexDevice;
pub type Trainable<B> = burn::backend::Autodiff<B>;

/// burn's cubecl backend on CUDA, without fusion (see the module documentation).
#[cfg(feature = "cuda")]
pub type Cuda = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
#[cfg(feature = "cuda")]
pub type CudaDevice = cubecl::cuda::CudaDevice;

/// The backend the parity tests run on: the CPU, or CUDA with `--features cuda-tests`.
#[cfg(not(feature = "cuda-tests"))]
pub type TestBackend = Cpu;
#[cfg(feature = "cuda-tests")]
pub type TestBackend = Cuda;

/// The test backend's default device (on CUDA, after setting cubecl's caches).
pub fn test_device() -> burn::tensor::Device<TestBackend> {
    #[cfg(feature = "cuda-tests")]
    cuda_runtime::configure();
    Default::default()
}

/// burn's backend plus the operations microdit computes its own way.
pub trait Backend: burn::tensor::backend::Backend {
    /// `lhs @ rhs` over the last two dimensions (leading dimensions broadcast), in the
    /// operands' precision with f32 accumulation: f32 operands are multiplied in f32,
    /// never rounded to TF32.
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::float_matmul(lhs, rhs)
    }

    /// PyTorch's `conv2d`: x `[B, C_in, H, W]`, weight `[C_out, C_in / groups, kh, kw]`.
    /// The default is burn's convolution.
    fn convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        <Self as ModuleOps<Self>>::conv2d(x, weight, bias, options)
    }

    /// A group norm of x `[B, C, H, W]` with per-channel `gamma` and `beta` `[C]`, then
    /// SiLU when the options say so (the VAE's norm → SiLU pairs). The default is burn's
    /// operations, [`group_norm_unfused`].
    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        options: GroupNormOptions,
    ) -> FloatTensor<Self> {
        group_norm_unfused_primitive::<Self>(x, gamma, beta, options)
    }

    /// Average or max pooling of x `[B, C, H, W]` over windows of each plane. The default
    /// is burn's pools ([`pool2d_unfused`]).
    fn pool2d(x: FloatTensor<Self>, options: PoolOptions) -> FloatTensor<Self> {
        pool2d_unfused::<Self>(x, options)
    }

    /// GELU with the exact error function, element by element (any shape). The default is
    /// burn's `gelu` ([`gelu::gelu_exact_unfused`]).
    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu::gelu_exact_unfused::<Self>(x)
    }

    /// The gradient of [`Backend::gelu_exact`], `grad·(Φ(x) + x·φ(x))` (burn's own default
    /// `gelu_backward` is the tanh approximation's; see [`gelu`]). The default is burn's
    /// operations.
    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        gelu::gelu_exact_backward_unfused::<Self>(x, grad)
    }

    /// LayerNorm over the last dimension with a scale `gamma` and no shift:
    /// `(x − mean)·(var + ε)^-½·γ`, the biased variance. The default is burn's layer norm
    /// ([`layer_norm::scaled_layer_norm_unfused`]).
    fn scaled_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        layer_norm::scaled_layer_norm_unfused::<Self>(x, gamma, epsilon)
    }

    /// `[dx, d_gamma]` of [`Backend::scaled_layer_norm`] from its output's gradient (the
    /// formulas in [`layer_norm`]). The default is burn's operations.
    fn scaled_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> [FloatTensor<Self>; 2] {
        layer_norm::scaled_layer_norm_backward_unfused::<Self>(x, gamma, grad, epsilon)
    }

    /// SwiGLU's gated product `silu(gate) · value`, element by element (one shape). The
    /// default is burn's operations ([`swiglu_unfused`]).
    fn swiglu(gate: FloatTensor<Self>, value: FloatTensor<Self>) -> FloatTensor<Self> {
        swiglu_unfused::<Self>(gate, value)
    }

    /// The gradients `[d_gate, d_value]` of [`Backend::swiglu`] given its output's
    /// gradient `grad`: `d_value = grad · silu(gate)` and
    /// `d_gate = grad · value · σ(gate) · (1 + gate · (1 − σ(gate)))`. The default is
    /// burn's operations ([`swiglu_backward_unfused`]).
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        value: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        swiglu_backward_unfused::<Self>(gate, value, grad)
    }

    /// AdaLN's modulation `x · (1 + scale) + shift` of tokens x `[B, N, D]` by per-sample
    /// `shift` and `scale` `[B, D]`. The default is burn's operations
    /// ([`modulation::modulate_unfused`]).
    fn modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        modulation::modulate_unfused::<Self>(x, shift, scale)
    }

    /// `[dx, d_shift, d_scale]` of [`Backend::modulate`] from its output's gradient:
    /// `dx = grad · (1 + scale)`, `d_shift = Σ_tokens grad`, `d_scale = Σ_tokens grad · x`.
    fn modulate_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        modulation::modulate_backward_unfused::<Self>(x, scale, grad)
    }

    /// The gated residual update `x + gate · branch` of tokens x, branch `[B, N, D]` with a
    /// per-sample `gate` `[B, D]`. The default is burn's operations.
    fn gated_residual(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        branch: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        modulation::gated_residual_unfused::<Self>(x, gate, branch)
    }

    /// `[dx, d_gate, d_branch]` of [`Backend::gated_residual`]: `dx = grad`,
    /// `d_gate = Σ_tokens grad · branch`, `d_branch = grad · gate`.
    fn gated_residual_backward(
        gate: FloatTensor<Self>,
        branch: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        modulation::gated_residual_backward_unfused::<Self>(gate, branch, grad)
    }

    /// `softmax(q kᵀ / √d) v` for q [B, H, N, d], k and v [B, H, L, d], optionally causal
    /// (key j hidden from query i when j > i). The default is burn's attention module.
    fn scaled_dot_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self> {
        attention_module::<Self>(q, k, v, causal)
    }

    /// The gradients `[dq, dk, dv]` of [`Backend::scaled_dot_attention`] given its
    /// output's gradient `grad`; the default recomputes the probabilities and follows
    /// [`attention_unfused`] step by step ([`attention_backward_unfused`]).
    fn scaled_dot_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        causal: bool,
    ) -> [FloatTensor<Self>; 3] {
        attention_backward_unfused::<Self>(q, k, v, grad, causal)
    }

    /// One AdamW step for one f32 parameter tensor: returns the new parameter and first
    /// and second moments. The default is burn's `AdamW` update, operation by operation
    /// (PyTorch's `AdamW` math); a backend may fuse it into one pass over memory.
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: &AdamWStep,
    ) -> [FloatTensor<Self>; 3] {
        adamw_step_unfused::<Self>(param, grad, moment_1, moment_2, step)
    }

    /// `buffer` (flat f32 gradients) summed over the ranks of an NCCL group, on the device.
    /// Only the CUDA backend has it; the default refuses (others sum through the host).
    #[cfg(feature = "cuda")]
    fn nccl_sum(
        buffer: FloatTensor<Self>,
        comm: &nccl::NcclComm,
    ) -> anyhow::Result<FloatTensor<Self>> {
        let _ = (buffer, comm);
        anyhow::bail!(
            "NCCL sums CUDA tensors only: this backend's gradients are summed on the host"
        )
    }

    /// Indices of the `k` largest values along the last dimension of a rank-3 tensor,
    /// largest first (`torch.topk(…, sorted=True)`).
    fn top_k_indices(values: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        let values = Tensor::<Self, 3>::from_primitive(TensorPrimitive::Float(values));
        values
            .argsort_descending(2)
            .narrow(2, 0, k)
            .into_primitive()
    }
}

/// A group norm's settings: `groups` groups of channels, `epsilon` added to the variance,
/// and whether SiLU follows.
#[derive(Debug, Clone, Copy)]
pub struct GroupNormOptions {
    pub groups: usize,
    pub epsilon: f64,
    pub silu: bool,
}

/// PyTorch's `group_norm` (biased variance), then SiLU if asked, as burn operations. The
/// per-channel scale and shift apply to `[B·C, H·W]` rows with one value per row:
/// burn-flex vectorises that broadcast, while a `[1, C, 1, 1]` one is walked element by
/// element.
pub fn group_norm_unfused<B: burn::tensor::backend::Backend>(
    x: Tensor<B, 4>,
    gamma: Tensor<B, 1>,
    beta: Tensor<B, 1>,
    options: GroupNormOptions,
) -> Tensor<B, 4> {
    let [b, c, h, w] = x.dims();
    let hidden = c / options.groups * h * w;
    let x = x.reshape([b, options.groups, hidden]);
    let x = x.clone() - x.sum_dim(2) / hidden as f64;
    let var = x.clone().square().sum_dim(2) / hidden as f64;
    let x = (x / var.add_scalar(options.epsilon).sqrt()).reshape([b * c, h * w]);
    let per_row = |p: Tensor<B, 1>| p.reshape([1, c]).repeat_dim(0, b).reshape([b * c, 1]);
    let y = (x * per_row(gamma) + per_row(beta)).reshape([b, c, h, w]);
    if options.silu {
        silu(y)
    } else {
        y
    }
}

/// A tensor of any rank as a flat one, and its shape to restore it.
fn flat<B: burn::tensor::backend::Backend>(t: FloatTensor<B>) -> (Tensor<B, 1>, Shape) {
    let shape = t.shape();
    let flat = B::float_reshape(t, Shape::new([shape.num_elements()]));
    (Tensor::from_primitive(TensorPrimitive::Float(flat)), shape)
}

fn unflat<B: burn::tensor::backend::Backend>(t: Tensor<B, 1>, shape: Shape) -> FloatTensor<B> {
    B::float_reshape(t.into_primitive().tensor(), shape)
}

/// `silu(gate) · value` as burn's operations.
pub fn swiglu_unfused<B: burn::tensor::backend::Backend>(
    gate: FloatTensor<B>,
    value: FloatTensor<B>,
) -> FloatTensor<B> {
    let ((gate, shape), (value, _)) = (flat::<B>(gate), flat::<B>(value));
    unflat(silu(gate) * value, shape)
}

/// [`Backend::swiglu_backward`]'s formulas as burn's operations.
pub fn swiglu_backward_unfused<B: burn::tensor::backend::Backend>(
    gate: FloatTensor<B>,
    value: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> [FloatTensor<B>; 2] {
    let ((gate, shape), (value, _), (grad, _)) =
        (flat::<B>(gate), flat::<B>(value), flat::<B>(grad));
    let sigma = sigmoid(gate.clone());
    let d_value = grad.clone() * gate.clone() * sigma.clone();
    let slope = sigma.clone() * (gate * (sigma.neg() + 1.0) + 1.0);
    let d_gate = grad * value * slope;
    [d_gate, d_value].map(|t| unflat(t, shape.clone()))
}

/// What a pooling window yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    /// The mean, over the whole window (`count_padding`) or only its part inside the input
    /// (PyTorch's `count_include_pad=False`).
    Average { count_padding: bool },
    /// The maximum (padding never wins).
    Max,
}

/// A 2-D pooling's windows: `[rows, columns]` each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub padding: [usize; 2],
    pub kind: Pool,
}

/// burn's `avg_pool2d` or `max_pool2d` (no dilation, no ceil mode).
pub fn pool2d_unfused<B: burn::tensor::backend::Backend>(
    x: FloatTensor<B>,
    options: PoolOptions,
) -> FloatTensor<B> {
    let PoolOptions {
        kernel,
        stride,
        padding,
        kind,
    } = options;
    match kind {
        Pool::Average { count_padding } => {
            B::avg_pool2d(x, kernel, stride, padding, count_padding, false)
        }
        Pool::Max => B::max_pool2d(x, kernel, stride, padding, [1, 1], false),
    }
}

/// [`group_norm_unfused`] on primitives, for backends' implementations.
pub fn group_norm_unfused_primitive<B: burn::tensor::backend::Backend>(
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    beta: FloatTensor<B>,
    options: GroupNormOptions,
) -> FloatTensor<B> {
    let x = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x));
    let [gamma, beta] =
        [gamma, beta].map(|t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)));
    group_norm_unfused(x, gamma, beta, options)
        .into_primitive()
        .tensor()
}

/// The scalars of one AdamW step (`time` counts steps from 1).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
    pub time: i32,
}

impl AdamWStep {
    /// `1 − β₁ᵗ` and `1 − β₂ᵗ`, in f32 as burn computes them.
    pub fn bias_corrections(&self) -> [f32; 2] {
        [
            1.0 - self.beta_1.powi(self.time),
            1.0 - self.beta_2.powi(self.time),
        ]
    }

    /// The decoupled weight decay factor `1 − lr·λ`.
    pub fn decay(&self) -> f64 {
        1.0 - self.lr * self.weight_decay as f64
    }
}

/// burn's `AdamW` update, operation by operation.
pub fn adamw_step_unfused<B: burn::tensor::backend::Backend>(
    param: FloatTensor<B>,
    grad: FloatTensor<B>,
    moment_1: FloatTensor<B>,
    moment_2: FloatTensor<B>,
    step: &AdamWStep,
) -> [FloatTensor<B>; 3] {
    let wrap = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t));
    let (param, grad) = (wrap(param), wrap(grad));
    let m = wrap(moment_1).mul_scalar(step.beta_1) + grad.clone().mul_scalar(1.0 - step.beta_1);
    let v = wrap(moment_2).mul_scalar(step.beta_2) + grad.square().mul_scalar(1.0 - step.beta_2);
    let [c1, c2] = step.bias_corrections();
    let delta = (m.clone() / c1) / ((v.clone() / c2).sqrt() + step.epsilon);
    let param = param.mul_scalar(step.decay()) - delta.mul_scalar(step.lr);
    [param, m, v].map(|t| t.into_primitive().tensor())
}

/// A backend's `fused` AdamW step when the parameter, gradient and both moments are f32,
/// burn's update operation by operation otherwise.
pub fn adamw_step_fused_in_f32<B: Backend>(
    tensors: [FloatTensor<B>; 4],
    step: &AdamWStep,
    fused: impl FnOnce([FloatTensor<B>; 4], &AdamWStep) -> [FloatTensor<B>; 3],
) -> [FloatTensor<B>; 3] {
    if tensors.iter().all(|t| t.dtype() == DType::F32) {
        fused(tensors, step)
    } else {
        let [param, grad, moment_1, moment_2] = tensors;
        adamw_step_unfused::<B>(param, grad, moment_1, moment_2, step)
    }
}

/// A [`Backend`] that records gradients, over a [`Backend`].
pub trait AutodiffBackend:
    Backend + burn::tensor::backend::AutodiffBackend<InnerBackend: Backend>
{
}

impl<B> AutodiffBackend for B where
    B: Backend + burn::tensor::backend::AutodiffBackend<InnerBackend: Backend>
{
}

/// A float primitive as a tensor of rank `D`, and [`primitive`] back: the seam between
/// burn's tensor API and the operations of the [`Backend`] extension.
pub(crate) fn float<B: burn::tensor::backend::Backend, const D: usize>(
    t: FloatTensor<B>,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

pub(crate) fn primitive<B: burn::tensor::backend::Backend, const D: usize>(
    t: Tensor<B, D>,
) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// `lhs @ rhs` through [`Backend::matmul`].
pub fn matmul<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>) -> Tensor<B, D> {
    float(B::matmul(primitive(lhs), primitive(rhs)))
}

/// A convolution through [`Backend::convolution`].
pub fn conv2d<B: Backend>(
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    options: ConvOptions<2>,
) -> Tensor<B, 4> {
    let out = B::convolution(
        primitive(x),
        primitive(weight),
        bias.map(primitive),
        options,
    );
    float(out)
}

/// burn's `Conv2d` module applied through [`conv2d`] (through its own forward when its
/// padding differs between sides, which [`ConvOptions`] cannot say).
pub fn conv2d_module<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [0, 0],
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            [top, left]
        }
        _ => return conv.forward(x),
    };
    let options = ConvOptions::new(conv.stride, padding, conv.dilation, conv.groups);
    let bias = conv.bias.as_ref().map(|b| b.val());
    conv2d(x, conv.weight.val(), bias, options)
}

/// burn's affine `GroupNorm` module through [`Backend::group_norm`], then SiLU if `silu`.
pub fn group_norm<B: Backend>(norm: &GroupNorm<B>, x: Tensor<B, 4>, silu: bool) -> Tensor<B, 4> {
    let param = |p: &Option<Param<Tensor<B, 1>>>| {
        let p = p.as_ref().expect("microdit's group norms are affine");
        primitive(p.val())
    };
    let options = GroupNormOptions {
        groups: norm.num_groups,
        epsilon: norm.epsilon,
        silu,
    };
    float(B::group_norm(
        primitive(x),
        param(&norm.gamma),
        param(&norm.beta),
        options,
    ))
}

/// Pooling through [`Backend::pool2d`].
pub fn pool2d<B: Backend>(x: Tensor<B, 4>, options: PoolOptions) -> Tensor<B, 4> {
    float(B::pool2d(primitive(x), options))
}

/// Exact GELU through [`Backend::gelu_exact`].
pub fn gelu_exact<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    float(B::gelu_exact(primitive(x)))
}

/// LayerNorm with a scale and no shift through [`Backend::scaled_layer_norm`].
pub fn scaled_layer_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    epsilon: f64,
) -> Tensor<B, D> {
    float(B::scaled_layer_norm(
        primitive(x),
        primitive(gamma),
        epsilon,
    ))
}

/// `silu(gate) · value` through [`Backend::swiglu`].
pub fn swiglu<B: Backend, const D: usize>(gate: Tensor<B, D>, value: Tensor<B, D>) -> Tensor<B, D> {
    float(B::swiglu(primitive(gate), primitive(value)))
}

/// AdaLN's `x · (1 + scale) + shift` through [`Backend::modulate`] (one float type).
pub fn modulate<B: Backend>(
    x: Tensor<B, 3>,
    shift: Tensor<B, 2>,
    scale: Tensor<B, 2>,
) -> Tensor<B, 3> {
    float(B::modulate(
        primitive(x),
        primitive(shift),
        primitive(scale),
    ))
}

/// `x + gate · branch` through [`Backend::gated_residual`] (one float type).
pub fn gated_residual<B: Backend>(
    x: Tensor<B, 3>,
    gate: Tensor<B, 2>,
    branch: Tensor<B, 3>,
) -> Tensor<B, 3> {
    float(B::gated_residual(
        primitive(x),
        primitive(gate),
        primitive(branch),
    ))
}

/// [`Backend::top_k_indices`] (not differentiable: the values are only compared).
pub fn top_k_indices<B: Backend>(values: Tensor<B, 3>, k: usize) -> Tensor<B, 3, Int> {
    Tensor::from_primitive(B::top_k_indices(values.into_primitive().tensor(), k))
}

/// Attention through [`Backend::scaled_dot_attention`].
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
) -> Tensor<B, 4> {
    float(B::scaled_dot_attention(
        primitive(q),
        primitive(k),
        primitive(v),
        causal,
    ))
}

/// [`attention_unfused`] on primitives, for backends' implementations.
pub fn attention_unfused_primitive<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    causal: bool,
) -> FloatTensor<B> {
    let wrap = |t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t));
    attention_unfused(wrap(q), wrap(k), wrap(v), causal)
        .into_primitive()
        .tensor()
}

/// burn's attention module (no mask, no bias).
pub fn attention_module<B: burn::tensor::backend::Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    causal: bool,
) -> FloatTensor<B> {
    let options = AttentionModuleOptions {
        is_causal: causal,
        ..Default::default()
    };
    B::attention(q, k, v, None, None, options)
}

/// Attention as three steps, scores and softmax in f32 whatever the operands' precision
/// (autocast's rule): CUDA's default.
pub fn attention_unfused<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    causal: bool,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    matmul(attention_probabilities(q, k, causal).cast(dtype), v)
}

/// `softmax((q kᵀ)·d^-½)` in f32, future keys masked when causal.
fn attention_probabilities<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    causal: bool,
) -> Tensor<B, 4> {
    let [_, _, n, d] = q.dims();
    let l = k.dims()[2];
    let scores = matmul(q, k.swap_dims(2, 3)).cast(FloatDType::F32) * (d as f64).powf(-0.5);
    let scores = if causal {
        let device = scores.device();
        let future = Tensor::<B, 2, Bool>::tril_mask([n, l], 0, &device);
        scores.mask_fill(future.unsqueeze::<4>(), f32::NEG_INFINITY)
    } else {
        scores
    };
    softmax(scores, 3)
}

/// The gradients of [`attention_unfused`] as autodiff computes them, the probabilities
/// recomputed: `dv = pᵀ g`, `ds = p ∘ (g vᵀ − rowsum(p ∘ g vᵀ))` in f32,
/// `dq = (d^-½ ds) k`, `dk = (d^-½ ds)ᵀ q`, the products in the operands' type.
pub fn attention_backward_unfused<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    grad: FloatTensor<B>,
    causal: bool,
) -> [FloatTensor<B>; 3] {
    let [q, k, v, grad] =
        [q, k, v, grad].map(|t| Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(t)));
    let dtype = q.dtype();
    let d = q.dims()[3];
    let p = attention_probabilities(q.clone(), k.clone(), causal);
    let dv = matmul(p.clone().cast(dtype).swap_dims(2, 3), grad.clone());
    let dp = matmul(grad, v.swap_dims(2, 3)).cast(FloatDType::F32);
    let ds = p.clone() * (dp.clone() - (dp * p).sum_dim(3));
    let ds = (ds * (d as f64).powf(-0.5)).cast(dtype);
    let dq = matmul(ds.clone(), k);
    let dk = matmul(ds.swap_dims(2, 3), q);
    [dq, dk, dv].map(|t| t.into_primitive().tensor())
}
