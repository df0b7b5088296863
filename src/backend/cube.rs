//! microdit's operations on burn's cubecl backend (CUDA):
//! - matrix products by cuBLAS (`cublas.rs`), or, without it, by cubecl kernels with fixed
//!   strategies instead of burn's autotuned ones: f32 products on the f32 units (burn's
//!   accelerated kernels round f32 operands to TF32, a 1e-3 relative error), and a cold
//!   start that compiles one kernel per strategy and shape class instead of benchmarking
//!   some thirty candidates for every new shape;
//! - attention and expert-choice top-k by microdit's ahead-of-time Triton kernels
//!   (`triton_ops.rs`) where a compiled variant serves the call, else attention from those
//!   products and top-k by burn's sort; exact GELU and SwiGLU's product likewise (one
//!   kernel each way instead of several of burn's), the f32 layer norm, AdaLN's
//!   modulation, the gated residual and the VAE's group norm (+ SiLU);
//! - f32 convolutions as shifted products on cuBLAS (`shifted_conv.rs`), exact where
//!   burn's use TF32;
//! - AdamW in one kernel per parameter.

use std::sync::OnceLock;

use burn::tensor::ops::{AttentionModuleOptions, ConvOptions, FloatTensor, IntTensor, ModuleOps};
use burn::tensor::{DType, Tensor, TensorPrimitive};
use burn_cubecl::kernel::attention::{attention as cube_attention, AttentionStrategy};
use burn_cubecl::kernel::matmul::{init_matmul_output, matmul as cube_matmul, MatmulStrategy};
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubek::attention::routines::blackbox_accelerated::BlackboxAcceleratedStrategy;
use cubek::matmul::components::tile::TileMatmulKind;
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::{launch_ref, Strategy};
use cubek::matmul::routines::double_buffering::DoubleBufferingArgs;
use cubek::matmul::routines::simple::SimpleArgs;
use cubek::matmul::routines::simple_unit::SimpleUnitSelectionArgs;
use cubek::matmul::routines::{BlueprintStrategy, TileSizeSelection};
use cubek::std::InputBinding;

use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::std::tensor::layout::linear::LinearView;
use cubecl::{calculate_cube_count_elemwise, tensor_vector_size_parallel};

use cubecl::cuda::CudaRuntime;

use super::elementwise_plan::Chain;
use super::shifted_conv::{self, ShiftedConv};
use super::token_plan::TokenChain;
use super::{
    adamw_step_fused_in_f32, attention_backward_unfused, attention_unfused_primitive, cublas, gelu,
    group_norm_unfused_primitive, layer_norm, modulation, swiglu_backward_unfused, swiglu_unfused,
    top_k_indices_sorted, triton_ops, AdamWStep, AttentionSaved, GroupNormOptions, MicroditBackend,
};

/// How half-precision products are computed: a fixed tensor-core strategy, or burn's
/// autotuner (`MICRODIT_MATMUL=autotune`: best kernels, minutes of benchmarking on a cold
/// start unless the autotune cache already knows the shapes).
#[derive(Clone)]
enum HalfMatmul {
    Fixed(Strategy),
    Autotune,
}

fn half_matmul() -> &'static HalfMatmul {
    static CHOICE: OnceLock<HalfMatmul> = OnceLock::new();
    CHOICE.get_or_init(|| {
        let simple = |kind| SimpleArgs {
            multi_rows: false,
            tile_matmul: kind,
        };
        let double = |kind| DoubleBufferingArgs {
            specialized: false,
            tile_matmul: kind,
        };
        let name = std::env::var("MICRODIT_MATMUL").unwrap_or_default();
        HalfMatmul::Fixed(match name.as_str() {
            "autotune" => return HalfMatmul::Autotune,
            "simple-cmma" => Strategy::SimpleCyclicCmma(BlueprintStrategy::Inferred(simple(
                TileMatmulKind::Cmma,
            ))),
            "double-mma" => {
                Strategy::DoubleCyclicMma(BlueprintStrategy::Inferred(double(TileMatmulKind::Mma)))
            }
            "specialized-mma" => {
                Strategy::SpecializedCyclicMma(BlueprintStrategy::Inferred(().into()))
            }
            "simple-tma-mma" => {
                Strategy::SimpleTmaMma(BlueprintStrategy::Inferred(simple(TileMatmulKind::Mma)))
            }
            "specialized-tma-mma" => {
                Strategy::SpecializedTmaMma(BlueprintStrategy::Inferred(().into()))
            }
            _ => {
                Strategy::SimpleCyclicMma(BlueprintStrategy::Inferred(simple(TileMatmulKind::Mma)))
            }
        })
    })
}

/// f32 products: plain f32 units (the "unit" kernels compute in the operands' type).
fn f32_matmul() -> Strategy {
    Strategy::SimpleUnit(BlueprintStrategy::Inferred(SimpleUnitSelectionArgs {
        tile_size: TileSizeSelection::MaxTileSize,
    }))
}

fn launch<R: CubeRuntime>(
    strategy: &Strategy,
    lhs: burn_cubecl::tensor::CubeTensor<R>,
    rhs: burn_cubecl::tensor::CubeTensor<R>,
) -> Result<burn_cubecl::tensor::CubeTensor<R>, String> {
    let (dtype, rhs_dtype) = (lhs.dtype, rhs.dtype);
    let out = init_matmul_output(&lhs, &rhs, dtype);
    let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems {
        lhs: dtype.into(),
        rhs: rhs_dtype.into(),
        out: dtype.into(),
    });
    let client = out.client.clone();
    launch_ref(
        strategy,
        &client,
        InputBinding::new(lhs.binding(), dtype.into()),
        InputBinding::new(rhs.binding(), rhs_dtype.into()),
        out.clone().binding(),
        &mut dtypes,
    )
    .map_err(|e| format!("{e:?}"))?;
    Ok(out)
}

/// One AdamW step in one pass: reads the parameter, gradient and moments once and writes
/// the three results (burn's composite update makes about fifteen passes).
#[cube(launch, address_type = "dynamic")]
#[allow(clippy::too_many_arguments)]
fn adamw_kernel<N: Size>(
    param: &LinearView<Vector<f32, N>>,
    grad: &LinearView<Vector<f32, N>>,
    moment_1: &LinearView<Vector<f32, N>>,
    moment_2: &LinearView<Vector<f32, N>>,
    param_out: &mut LinearView<Vector<f32, N>, ReadWrite>,
    moment_1_out: &mut LinearView<Vector<f32, N>, ReadWrite>,
    moment_2_out: &mut LinearView<Vector<f32, N>, ReadWrite>,
    scalars: &Array<f32>,
) {
    if !param_out.is_in_bounds(ABSOLUTE_POS) {
        terminate!();
    }
    // [β₁, 1−β₁, β₂, 1−β₂, 1−β₁ᵗ, 1−β₂ᵗ, ε, 1−lr·λ, lr]
    let g = grad[ABSOLUTE_POS];
    let m = moment_1[ABSOLUTE_POS] * Vector::new(scalars[0]) + g * Vector::new(scalars[1]);
    let v = moment_2[ABSOLUTE_POS] * Vector::new(scalars[2]) + (g * g) * Vector::new(scalars[3]);
    let m_hat = m / Vector::new(scalars[4]);
    let v_hat = v / Vector::new(scalars[5]);
    let delta = m_hat / (v_hat.sqrt() + Vector::new(scalars[6]));
    param_out[ABSOLUTE_POS] =
        param[ABSOLUTE_POS] * Vector::new(scalars[7]) - delta * Vector::new(scalars[8]);
    moment_1_out[ABSOLUTE_POS] = m;
    moment_2_out[ABSOLUTE_POS] = v;
}

fn fused_adamw<R: CubeRuntime>(
    tensors: [CubeTensor<R>; 4],
    step: &AdamWStep,
) -> [CubeTensor<R>; 3] {
    let [param, grad, moment_1, moment_2] = tensors;
    let client = param.client.clone();
    let [c1, c2] = step.bias_corrections();
    let scalars = [
        step.beta_1,
        1.0 - step.beta_1,
        step.beta_2,
        1.0 - step.beta_2,
        c1,
        c2,
        step.epsilon,
        step.decay() as f32,
        step.lr as f32,
    ];
    let scalars = client.create_from_slice(f32::as_bytes(&scalars));
    let out = || {
        empty_device_dtype(
            client.clone(),
            param.device.clone(),
            param.meta.shape().clone(),
            DType::F32,
        )
    };
    let outputs = [out(), out(), out()];
    let inputs = [&param, &grad, &moment_1, &moment_2];
    let vector_size = inputs
        .iter()
        .chain(outputs.iter().collect::<Vec<_>>().iter())
        .map(|t| {
            tensor_vector_size_parallel(
                client.io_optimized_vector_sizes(4),
                t.meta.shape(),
                t.meta.strides(),
                t.meta.num_dims() - 1,
            )
        })
        .min()
        .unwrap_or(1)
        .max(1);
    let address_type = inputs
        .iter()
        .map(|t| t.required_address_type())
        .chain(outputs.iter().map(|t| t.required_address_type()))
        .max()
        .unwrap_or_default();
    let working_units = param.meta.num_elements() / vector_size;
    let cube_dim = CubeDim::new(&client, working_units);
    let cube_count = calculate_cube_count_elemwise(&client, working_units, cube_dim);
    let view = |t: &CubeTensor<R>| t.clone().into_linear_view();
    adamw_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        address_type,
        vector_size,
        view(&param),
        view(&grad),
        view(&moment_1),
        view(&moment_2),
        view(&outputs[0]),
        view(&outputs[1]),
        view(&outputs[2]),
        unsafe { ArrayArg::from_raw_parts(scalars, 9) },
    );
    outputs
}

impl<F: FloatElement, I: IntElement, BT: BoolElement> MicroditBackend
    for CubeBackend<CudaRuntime, F, I, BT>
{
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: &AdamWStep,
    ) -> [FloatTensor<Self>; 3] {
        let tensors = [param, grad, moment_1, moment_2];
        adamw_step_fused_in_f32::<Self>(tensors, step, fused_adamw)
    }

    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        if let Some(out) = cublas::matmul(lhs.clone(), rhs.clone()) {
            return out;
        }
        let strategy = match (lhs.dtype, half_matmul()) {
            (DType::F32, _) => f32_matmul(),
            (_, HalfMatmul::Fixed(strategy)) => strategy.clone(),
            (dtype, HalfMatmul::Autotune) => {
                return cube_matmul(lhs, rhs, None, MatmulStrategy::default(), dtype)
                    .expect("autotuned matmul")
            }
        };
        // A strategy that cannot take a shape (alignment, sizes) falls back to the naive
        // kernel, which takes any.
        launch(&strategy, lhs.clone(), rhs.clone())
            .or_else(|_| launch(&Strategy::Naive, lhs, rhs))
            .expect("matmul kernel")
    }

    fn convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        // In f32 as shifted products on cuBLAS, exact; burn's convolution uses TF32.
        let dims = |t: &FloatTensor<Self>| <[usize; 4]>::try_from(t.meta.shape().to_vec()).ok();
        let plan = (x.dtype == DType::F32 && weight.dtype == DType::F32)
            .then(|| ShiftedConv::new(dims(&x)?, dims(&weight)?, &options))
            .flatten();
        match plan {
            Some(plan) => {
                let tensor = |t| Tensor::<Self, 4>::from_primitive(TensorPrimitive::Float(t));
                let bias =
                    bias.map(|b| Tensor::<Self, 1>::from_primitive(TensorPrimitive::Float(b)));
                shifted_conv::conv2d(tensor(x), tensor(weight), bias, &plan)
                    .into_primitive()
                    .tensor()
            }
            None => <Self as ModuleOps<Self>>::conv2d(x, weight, bias, options),
        }
    }

    fn scaled_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        match triton_ops::layer_norm(&x, &gamma, epsilon) {
            Some(y) => y,
            None => layer_norm::scaled_layer_norm_unfused::<Self>(x, gamma, epsilon),
        }
    }

    fn scaled_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> [FloatTensor<Self>; 2] {
        match triton_ops::layer_norm_backward(&x, &gamma, grad.clone(), epsilon) {
            Some(grads) => grads,
            None => layer_norm::scaled_layer_norm_backward_unfused::<Self>(x, gamma, grad, epsilon),
        }
    }

    fn modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match triton_ops::token_forward(TokenChain::ModulateForward, [&x, &shift, &scale]) {
            Some(y) => y,
            None => modulation::modulate_unfused::<Self>(x, shift, scale),
        }
    }

    fn modulate_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        match triton_ops::token_backward(TokenChain::ModulateBackward, [&x, &scale, &grad]) {
            Some((dx, d_vectors)) => match <[_; 2]>::try_from(d_vectors) {
                Ok([d_shift, d_scale]) => [dx, d_shift, d_scale],
                Err(_) => unreachable!("two sums"),
            },
            None => modulation::modulate_backward_unfused::<Self>(x, scale, grad),
        }
    }

    fn gated_residual(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        branch: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match triton_ops::token_forward(TokenChain::GatedResidualForward, [&x, &gate, &branch]) {
            Some(y) => y,
            None => modulation::gated_residual_unfused::<Self>(x, gate, branch),
        }
    }

    fn gated_residual_backward(
        gate: FloatTensor<Self>,
        branch: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        let inputs = [&gate, &branch, &grad];
        match triton_ops::token_backward(TokenChain::GatedResidualBackward, inputs) {
            // dx is the output's gradient itself.
            Some((d_branch, mut d_gate)) => [grad.clone(), d_gate.remove(0), d_branch],
            None => modulation::gated_residual_backward_unfused::<Self>(gate, branch, grad),
        }
    }

    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        options: GroupNormOptions,
    ) -> FloatTensor<Self> {
        match triton_ops::group_norm(&x, &gamma, &beta, options) {
            Some(y) => y,
            None => group_norm_unfused_primitive::<Self>(x, gamma, beta, options),
        }
    }

    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match triton_ops::elementwise(Chain::GeluForward, std::slice::from_ref(&x)) {
            Some([y]) => y,
            None => gelu::gelu_exact_unfused::<Self>(x),
        }
    }

    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        match triton_ops::elementwise(Chain::GeluBackward, &[x.clone(), grad.clone()]) {
            Some([dx]) => dx,
            None => gelu::gelu_exact_backward_unfused::<Self>(x, grad),
        }
    }

    fn swiglu(gate: FloatTensor<Self>, value: FloatTensor<Self>) -> FloatTensor<Self> {
        match triton_ops::elementwise(Chain::SwigluForward, &[gate.clone(), value.clone()]) {
            Some([out]) => out,
            None => swiglu_unfused::<Self>(gate, value),
        }
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        value: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        let inputs = [gate.clone(), value.clone(), grad.clone()];
        match triton_ops::elementwise(Chain::SwigluBackward, &inputs) {
            Some(grads) => grads,
            None => swiglu_backward_unfused::<Self>(gate, value, grad),
        }
    }

    fn top_k_indices(values: FloatTensor<Self>, k: usize) -> IntTensor<Self> {
        // The kernel writes i32 indices: the backend's own integers only when they are i32.
        let indices = (I::dtype() == DType::I32)
            .then(|| triton_ops::top_k_indices(&values, k))
            .flatten();
        indices.unwrap_or_else(|| {
            // burn-cubecl has no sort of its own: burn's argsort reads the values back.
            super::host_sync::record();
            top_k_indices_sorted::<Self>(values, k)
        })
    }

    fn scaled_dot_attention_saving(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> (FloatTensor<Self>, Option<AttentionSaved<Self>>) {
        match triton_ops::attention_forward(&q, &k, &v, causal) {
            Some([out, lse]) => (out.clone(), Some(AttentionSaved { out, lse })),
            None => (Self::scaled_dot_attention(q, k, v, causal), None),
        }
    }

    fn scaled_dot_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        causal: bool,
        saved: Option<AttentionSaved<Self>>,
    ) -> [FloatTensor<Self>; 3] {
        let saved = saved.map(|s| [s.out, s.lse]);
        match triton_ops::attention_backward(&q, &k, &v, grad.clone(), causal, saved) {
            Some(grads) => grads,
            None => attention_backward_unfused::<Self>(q, k, v, grad, causal),
        }
    }

    fn scaled_dot_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self> {
        if let Some([out, _]) = triton_ops::attention_forward(&q, &k, &v, causal) {
            return out;
        }
        let unfused = |q, k, v| attention_unfused_primitive::<Self>(q, k, v, causal);
        // cubecl's flash attention (half precision only: its inner products use tensor
        // cores) on request; by default the three steps, whose products go to cuBLAS.
        if q.dtype == DType::F32 || std::env::var("MICRODIT_ATTENTION").as_deref() != Ok("flash") {
            return unfused(q, k, v);
        }
        let options = AttentionModuleOptions {
            is_causal: causal,
            ..Default::default()
        };
        let flash = AttentionStrategy::FlashBlackboxAccelerated(BlackboxAcceleratedStrategy {
            num_planes: 4,
            seq_q: 1,
            seq_kv: 1,
        });
        match cube_attention(q.clone(), k.clone(), v.clone(), None, None, options, flash) {
            Ok(out) => out,
            Err(_) => unfused(q, k, v),
        }
    }

    fn nccl_sum(
        buffer: FloatTensor<Self>,
        comm: &super::nccl::NcclComm,
    ) -> anyhow::Result<FloatTensor<Self>> {
        comm.sum_tensor(buffer)
    }
}
