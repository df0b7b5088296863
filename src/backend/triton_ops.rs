//! The CUDA backend's operations on microdit's Triton kernels: FlashAttention-2 forward
//! and backward (`attention_plan`), expert-choice top-k (`top_k_plan`), and exact GELU and
//! SwiGLU's gated product each way (`elementwise_plan`), the f32 layer norm without a shift
//! each way (`layer_norm_plan`), AdaLN's modulation and the gated residual each way
//! (`token_plan`), the VAE's group norm + SiLU (`group_norm_plan`). Each returns
//! `None` where no compiled variant serves the call (or the GPU cannot load it, or
//! `MICRODIT_TRITON=off`), and the caller keeps burn's operations.

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;

use super::attention_plan::{Attention, Heads, Kind};
use super::elementwise_plan::{Chain, Elementwise};
use super::group_norm_plan::GroupNorm;
use super::launch_plan::{Arg, TritonKernel};
use super::layer_norm_plan::{rows_of, LayerNorm};
use super::stream_order::{self, address};
use super::token_plan::{TokenChain, Tokens};
use super::top_k_plan::TopK;
use super::{triton, GroupNormOptions};

type Tensor = CubeTensor<CudaRuntime>;

/// The variants `names` of the tensors' GPU, when every one is compiled and loads there.
fn kernels<const K: usize>(t: &Tensor, names: [String; K]) -> Option<[&'static TritonKernel; K]> {
    if !triton::enabled() {
        return None;
    }
    let found = names.map(|name| triton::kernel(&name));
    let all: Vec<&'static TritonKernel> = found.iter().copied().collect::<Option<_>>()?;
    all.iter()
        .all(|k| triton::available(t.device.index, k))
        .then(|| all.try_into().ok())?
}

/// One launch: a kernel, its grid and its arguments.
type Launch = (&'static TritonKernel, (u32, u32, u32), Vec<Arg>);

/// Enqueues `launches`, in order, on the own stream of `on`'s GPU, ordered against
/// cubecl's stream.
///
/// # Safety
/// Every pointer in the arguments is a live allocation of the sizes its kernel reads and
/// writes, kept alive by the caller until this returns.
unsafe fn enqueue(on: &Tensor, launches: &[Launch]) {
    let device = on.device.index;
    stream_order::run(&on.client, device, |own| {
        for (kernel, grid, args) in launches {
            triton::launch(own, device, kernel, *grid, args);
        }
    });
}

/// A tensor's device address (its view's offset included).
fn pointer(t: &Tensor) -> u64 {
    address(&t.client, &t.handle)
}

fn dtype_name(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("fp32"),
        DType::BF16 => Some("bf16"),
        DType::F16 => Some("fp16"),
        _ => None,
    }
}

fn heads(t: &Tensor) -> Option<Heads> {
    Heads::new(t.meta.shape(), t.meta.strides())
}

fn plan(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Option<Attention> {
    let dtype = dtype_name(q.dtype).filter(|_| k.dtype == q.dtype && v.dtype == q.dtype)?;
    Attention::new(heads(q)?, heads(k)?, heads(v)?, dtype, causal)
}

fn empty(like: &Tensor, dims: &[usize], dtype: DType) -> Tensor {
    empty_device_contiguous_dtype(
        like.client.clone(),
        like.device.clone(),
        Shape::from(dims.to_vec()),
        dtype,
    )
}

/// `[out, lse]`: `softmax(q kᵀ / √d) v` and its row log-sum-exp (f32 `[B, H, N]`).
pub fn attention_forward(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Option<[Tensor; 2]> {
    let plan = plan(q, k, v, causal)?;
    let [forward] = kernels(q, [plan.variant(Kind::Forward)])?;
    let out = empty(q, &plan.out().dims, q.dtype);
    let lse = empty(q, &plan.rows(), DType::F32);
    let [pq, pk, pv, po, pl] = [q, k, v, &out, &lse].map(pointer);
    let args = plan.forward_args([pq, pk, pv, po, pl]);
    // SAFETY: the pointers are live allocations of the planned shapes and strides.
    unsafe { enqueue(q, &[(forward, plan.grid(Kind::Forward, forward), args)]) };
    Some([out, lse])
}

/// `[dq, dk, dv]` given the output's gradient and the forward's `[out, lse]` (recomputed
/// when the forward did not keep them).
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    grad: Tensor,
    causal: bool,
    saved: Option<[Tensor; 2]>,
) -> Option<[Tensor; 3]> {
    let plan = plan(q, k, v, causal)?;
    // The kernels read dO in the operands' dtype.
    if grad.dtype != q.dtype {
        return None;
    }
    let kinds = [
        Kind::BackwardPreprocess,
        Kind::BackwardKeys,
        Kind::BackwardQueries,
    ];
    let [preprocess, keys, queries] = kernels(q, kinds.map(|kind| plan.variant(kind)))?;
    let [out, lse] = match saved {
        Some(saved) => saved,
        None => attention_forward(q, k, v, causal)?,
    };
    // The kernels read dO and O as dense `[B, H, N, d]`.
    let (grad, out) = (into_contiguous(grad), into_contiguous(out));
    let delta = empty(q, &plan.rows(), DType::F32);
    let dq = empty(q, &plan.out().dims, q.dtype);
    let [dk, dv] = [k, v].map(|t| empty(t, &plan.keys().dims, q.dtype));
    let (pq, pk, pv, pg, pl, pd) = (
        pointer(q),
        pointer(k),
        pointer(v),
        pointer(&grad),
        pointer(&lse),
        pointer(&delta),
    );
    let launches = [
        (
            preprocess,
            Kind::BackwardPreprocess,
            plan.preprocess_args([pointer(&out), pg, pd]),
        ),
        (
            keys,
            Kind::BackwardKeys,
            plan.keys_args([pq, pk, pv, pg, pl, pd, pointer(&dk), pointer(&dv)]),
        ),
        (
            queries,
            Kind::BackwardQueries,
            plan.queries_args([pq, pk, pv, pg, pl, pd, pointer(&dq)]),
        ),
    ];
    let launches = launches.map(|(kernel, kind, args)| (kernel, plan.grid(kind, kernel), args));
    // SAFETY: the pointers are live allocations of the planned shapes and strides; the
    // launches run in order on one stream (Δ before its readers).
    unsafe { enqueue(q, &launches) };
    // The inputs stay alive until here, past the point where cubecl could reuse them.
    drop((grad, out, lse, delta));
    Some([dq, dk, dv])
}

/// Indices (i32) of the `k` largest values along the last dimension of f32 `values`
/// `[N, E, T]`, largest first, ties to the smaller index.
pub fn top_k_indices(values: &Tensor, k: usize) -> Option<Tensor> {
    if values.dtype != DType::F32 {
        return None;
    }
    let plan = TopK::new(values.meta.shape(), values.meta.strides(), k)?;
    let [kernel] = kernels(values, [plan.variant()])?;
    let [n, e, _] = plan.dims;
    let out = empty(values, &[n, e, k], DType::I32);
    let args = plan.args([values, &out].map(pointer));
    // SAFETY: the pointers are live allocations of the planned shapes and strides.
    unsafe { enqueue(values, &[(kernel, plan.grid(kernel), args)]) };
    Some(out)
}

/// `chain` over same-shaped, same-dtype `inputs`: its outputs, dense, in the inputs' shape.
pub fn elementwise<const O: usize>(chain: Chain, inputs: &[Tensor]) -> Option<[Tensor; O]> {
    let first = inputs.first()?;
    let dtype = dtype_name(first.dtype)?;
    let shape = first.meta.shape().to_vec();
    let same = inputs
        .iter()
        .all(|t| t.dtype == first.dtype && t.meta.shape()[..] == shape[..]);
    let plan = Elementwise::new(chain, dtype, shape.iter().product())?;
    if !same || chain.operands() != (inputs.len(), O) {
        return None;
    }
    let [kernel] = kernels(first, [plan.variant()])?;
    let inputs: Vec<Tensor> = inputs.iter().cloned().map(into_contiguous).collect();
    let outputs: [Tensor; O] = std::array::from_fn(|_| empty(first, &shape, first.dtype));
    let pointers: Vec<u64> = inputs.iter().chain(&outputs).map(pointer).collect();
    let args = plan.args(&pointers);
    // SAFETY: the pointers are live dense allocations of `n` elements.
    unsafe { enqueue(first, &[(kernel, plan.grid(kernel), args)]) };
    // The inputs stay alive until here, past the point where cubecl could reuse them.
    drop(inputs);
    Some(outputs)
}

/// `x`'s rows and row stride as the layer norm reads them, making `x` dense when its rows
/// do not walk with one stride.
fn rows(x: Tensor) -> (Tensor, usize, usize) {
    match rows_of(x.meta.shape(), x.meta.strides()) {
        Some((rows, stride)) => (x, rows, stride),
        None => {
            let x = into_contiguous(x);
            let dims = x.meta.shape().to_vec();
            let dim = *dims.last().unwrap_or(&1);
            (x, dims.iter().product::<usize>() / dim.max(1), dim)
        }
    }
}

fn layer_norm_plan(x: &Tensor, gamma: &Tensor, epsilon: f64) -> Option<LayerNorm> {
    let dim = *x.meta.shape().last()?;
    let f32 = x.dtype == DType::F32 && gamma.dtype == DType::F32;
    let rows = x.meta.shape().iter().product::<usize>() / dim.max(1);
    let dense_gamma = gamma.meta.shape()[..] == [dim] && gamma.meta.strides()[..] == [1];
    LayerNorm::new(rows, dim, epsilon).filter(|_| f32 && dense_gamma)
}

/// The f32 layer norm without a shift, `(x − mean)·(var + ε)^-½·γ`, dense in x's shape.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, epsilon: f64) -> Option<Tensor> {
    let plan = layer_norm_plan(x, gamma, epsilon)?;
    let [forward] = kernels(x, [LayerNorm::FORWARD.to_string()])?;
    let (x_rows, _, x_stride) = rows(x.clone());
    let y = empty(x, x.meta.shape(), DType::F32);
    let args = plan.forward_args([&x_rows, gamma, &y].map(pointer), x_stride);
    // SAFETY: the pointers are live allocations of the planned rows.
    unsafe { enqueue(x, &[(forward, plan.grid(forward), args)]) };
    drop(x_rows);
    Some(y)
}

/// `[dx, dγ]` of [`layer_norm`].
pub fn layer_norm_backward(
    x: &Tensor,
    gamma: &Tensor,
    grad: Tensor,
    epsilon: f64,
) -> Option<[Tensor; 2]> {
    let plan = layer_norm_plan(x, gamma, epsilon)?;
    if grad.dtype != DType::F32 || grad.meta.shape() != x.meta.shape() {
        return None;
    }
    let names = [LayerNorm::BACKWARD, LayerNorm::SUM].map(str::to_string);
    let [backward, sum] = kernels(x, names)?;
    let (x_rows, _, x_stride) = rows(x.clone());
    let (grad_rows, _, grad_stride) = rows(grad);
    let dx = empty(x, x.meta.shape(), DType::F32);
    let sums = plan.partials(backward);
    let part = empty(x, &sums.dims(), DType::F32);
    let d_gamma = empty(x, &[plan.dim], DType::F32);
    let backward_args = plan.backward_args(
        [
            pointer(&x_rows),
            pointer(gamma),
            pointer(&grad_rows),
            pointer(&dx),
            pointer(&part),
        ],
        [x_stride, grad_stride],
    );
    let sum_args = sums.args([pointer(&part), pointer(&d_gamma)]);
    let launches = [
        (backward, plan.grid(backward), backward_args),
        (sum, sums.grid(sum), sum_args),
    ];
    // SAFETY: the pointers are live allocations of the planned rows and partial sums; the
    // two launches run in order on one stream.
    unsafe { enqueue(x, &launches) };
    drop((x_rows, grad_rows, part));
    Some([dx, d_gamma])
}

/// The plan for tokens `x` `[B, N, D]` and per-sample vectors `[B, D]` of one dtype.
fn tokens_plan(x: &Tensor, vectors: &[&Tensor]) -> Option<Tokens> {
    let plan = Tokens::new(x.meta.shape(), dtype_name(x.dtype)?)?;
    let fits = vectors
        .iter()
        .all(|v| v.dtype == x.dtype && v.meta.shape()[..] == [plan.batch, plan.dim]);
    fits.then_some(plan)
}

/// A token chain's forward from its operands in the kernel's order (modulation: x, shift,
/// scale; gated residual: x, gate, branch); the result dense in x's shape.
pub fn token_forward(chain: TokenChain, operands: [&Tensor; 3]) -> Option<Tensor> {
    let [x, a, b] = operands;
    let (vectors, tokens) = match chain {
        TokenChain::ModulateForward => (vec![a, b], vec![]),
        TokenChain::GatedResidualForward => (vec![a], vec![b]),
        _ => return None,
    };
    let plan = tokens_plan(x, &vectors)?;
    if tokens
        .iter()
        .any(|t| t.dtype != x.dtype || t.meta.shape() != x.meta.shape())
    {
        return None;
    }
    let [kernel] = kernels(x, [plan.variant(chain)])?;
    let inputs = operands.map(|t| into_contiguous(t.clone()));
    let y = empty(x, x.meta.shape(), x.dtype);
    let pointers: Vec<u64> = inputs.iter().chain([&y]).map(pointer).collect();
    let args = plan.args(&pointers);
    // SAFETY: dense allocations of the planned tokens and vectors.
    unsafe { enqueue(x, &[(kernel, plan.grid(kernel), args)]) };
    drop(inputs);
    Some(y)
}

/// A token chain's backward from `inputs` (modulation: x, scale, grad; gated residual:
/// gate, branch, grad): the tokens' gradient and the vectors' (`[d_shift, d_scale]`;
/// `[d_gate]`).
pub fn token_backward(chain: TokenChain, inputs: [&Tensor; 3]) -> Option<(Tensor, Vec<Tensor>)> {
    let (tokens, vectors) = match chain {
        TokenChain::ModulateBackward => (inputs[0], [inputs[1]]),
        TokenChain::GatedResidualBackward => (inputs[1], [inputs[0]]),
        _ => return None,
    };
    let plan = tokens_plan(tokens, &vectors)?;
    let grad = inputs[2];
    if grad.dtype != tokens.dtype || grad.meta.shape() != tokens.meta.shape() {
        return None;
    }
    let [backward, sum] = kernels(tokens, [plan.variant(chain), plan.sum_variant()])?;
    let inputs = inputs.map(|t| into_contiguous(t.clone()));
    let d_tokens = empty(tokens, tokens.meta.shape(), tokens.dtype);
    let sums = plan.partials(chain, backward);
    let part = empty(tokens, &sums.dims(), DType::F32);
    let d_vectors: Vec<Tensor> = (0..chain.sums())
        .map(|_| empty(tokens, &[plan.batch, plan.dim], tokens.dtype))
        .collect();
    let pointers: Vec<u64> = inputs
        .iter()
        .chain([&d_tokens, &part])
        .map(pointer)
        .collect();
    let mut launches = vec![(backward, plan.grid(backward), plan.args(&pointers))];
    // Each vector's partials are B consecutive groups of the buffer: its own sum.
    let per_vector = sums.split(plan.batch);
    let vector_bytes = (per_vector.dims().iter().product::<usize>() * 4) as u64;
    for (k, d_vector) in d_vectors.iter().enumerate() {
        let part_k = pointer(&part) + k as u64 * vector_bytes;
        let args = per_vector.args([part_k, pointer(d_vector)]);
        launches.push((sum, per_vector.grid(sum), args));
    }
    // SAFETY: dense allocations of the planned tokens, vectors and partial sums; the
    // launches run in order on one stream.
    unsafe { enqueue(tokens, &launches) };
    drop((inputs, part));
    Some((d_tokens, d_vectors))
}

/// The group norm (+ SiLU) of `x` `[B, C, H, W]` with per-channel γ, β, dense in x's shape.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    options: GroupNormOptions,
) -> Option<Tensor> {
    let plan = GroupNorm::new(x.meta.shape(), options, dtype_name(x.dtype)?)?;
    let vectors_fit = [gamma, beta]
        .iter()
        .all(|v| v.dtype == x.dtype && v.meta.shape()[..] == [plan.channels]);
    if !vectors_fit {
        return None;
    }
    let [kernel] = kernels(x, [plan.variant()])?;
    let inputs = [x, gamma, beta].map(|t| into_contiguous(t.clone()));
    let y = empty(x, x.meta.shape(), x.dtype);
    let [px, pg, pb] = inputs.each_ref().map(pointer);
    let args = plan.args([px, pg, pb, pointer(&y)]);
    // SAFETY: dense allocations of the planned image and per-channel vectors.
    unsafe { enqueue(x, &[(kernel, plan.grid(kernel), args)]) };
    drop(inputs);
    Some(y)
}
