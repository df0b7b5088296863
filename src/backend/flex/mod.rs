//! microdit's operations on burn-flex (the CPU backend): AdamW in one pass
//! ([`adamw`]), convolution as shifted products ([`conv`]) or, 3×3 at stride 1, by
//! Winograd's F(2×2, 3×3) ([`winograd`]), pooling ([`pool`]), a group
//! norm with SiLU ([`rows`]), the layer norm without a shift and its backward
//! ([`layer_norm`]), SwiGLU's gated product and exact GELU ([`activation`]), AdaLN's modulation
//! and gated residual ([`modulation`]) and attention.
//!
//! Attention: burn-flex's own attention copies q, k and v to
//! contiguous buffers (the head split leaves them strided), runs its (batch, head) pairs on
//! one thread, and its output must be copied again when heads are merged. This one reads
//! q, k, v where they lie, runs the pairs on rayon's pool, and writes its output (and
//! the gradients) head-interleaved, `[B, N, H, d]` in memory, so that merging heads back
//! (`swap_dims(1, 2).reshape(…)`) is free. The arithmetic is `attention_unfused`'s:
//! scores `(q kᵀ)·d^-½`, a row softmax, then `p v`, in f32.

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::Flex;
use burn::tensor::ops::{ConvOptions, FloatTensor, FloatTensorOps, IntTensor, ModuleOps};
use burn::tensor::{Bytes, DType, Shape};
use rayon::prelude::*;

mod activation;
mod adamw;
mod conv;
mod layer_norm;
mod modulation;
mod pool;
mod rows;
mod winograd;

use super::gelu::{gelu_exact_backward_unfused, gelu_exact_unfused};
use super::int8;
use super::layer_norm::{scaled_layer_norm_backward_unfused, scaled_layer_norm_unfused};
use super::modulation::{
    gated_residual_backward_unfused, gated_residual_unfused, modulate_backward_unfused,
    modulate_unfused,
};
use super::{
    adamw_step_fused_in_f32, attention_backward_unfused, attention_module,
    group_norm_unfused_primitive, int8_matmul_unfused, pool2d_unfused, swiglu_backward_unfused,
    swiglu_unfused, AdamWStep, AttentionSaved, GroupNormOptions, MicroditBackend, PoolOptions,
};
use modulation::Sizes;
use rows::{group_norm_row, softmax_backward_row, softmax_row};

impl MicroditBackend for Flex {
    /// 2-D f32 products go into a buffer gemm writes without reading; burn-flex zeroes its
    /// output first, a pass over memory as long as the output (3% of the demo model's
    /// sampling step). Other products are burn-flex's.
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        let dims = |t: &FlexTensor| <[usize; 2]>::try_from(t.layout().shape().to_vec()).ok();
        let f32s = lhs.dtype() == DType::F32 && rhs.dtype() == DType::F32;
        match (f32s, dims(&lhs), dims(&rhs)) {
            (true, Some([m, k]), Some([k_rhs, n])) if k == k_rhs => {
                matmul_2d(&lhs, &rhs, [m, k, n])
            }
            _ => Self::float_matmul(lhs, rhs),
        }
    }

    fn int8_matmul(
        x: FloatTensor<Self>,
        values: IntTensor<Self>,
        scales: FloatTensor<Self>,
        row_sums: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        // An empty batch goes to the default, which needs no rows to find the shape.
        let supported = x.layout().shape()[0] > 0
            && x.dtype() == DType::F32
            && values.dtype() == DType::I8
            && scales.dtype() == DType::F32
            && row_sums.dtype() == DType::I32;
        if !supported {
            return super::primitive(int8_matmul_unfused::<Self>(
                super::float(x),
                burn::tensor::Tensor::from_primitive(values),
                super::float(scales),
            ));
        }
        let [x, values, scales, row_sums] =
            [x, values, scales, row_sums].map(|t| t.to_contiguous());
        let shape = x.layout().shape().clone();
        let (batch, m, k) = (shape[0], shape[1], shape[2]);
        let weights = int8::Rows {
            values: &values.storage::<i8>()[values.layout().start_offset()..],
            scales: self::values(&scales),
            cols: k,
        };
        let n = weights.scales.len() / batch;
        let sums = &row_sums.storage::<i32>()[row_sums.layout().start_offset()..];
        let y = int8::matmul(
            self::values(&x),
            weights,
            sums,
            batch,
            int8::Kernel::detect(),
        );
        f32_tensor(y, Shape::new([batch, m, n]))
    }

    fn convolution(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        match conv::ConvPlan::of(&x, &weight, bias.as_ref(), &options) {
            Some(plan) => plan.run(x, weight, bias),
            None => <Self as ModuleOps<Self>>::conv2d(x, weight, bias, options),
        }
    }

    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: &AdamWStep,
    ) -> [FloatTensor<Self>; 3] {
        let tensors = [param, grad, moment_1, moment_2];
        adamw_step_fused_in_f32::<Self>(tensors, step, adamw::step)
    }

    fn group_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        options: GroupNormOptions,
    ) -> FloatTensor<Self> {
        let shape = x.layout().shape().to_vec();
        let all_f32 = [&x, &gamma, &beta].iter().all(|t| t.dtype() == DType::F32);
        match <[usize; 4]>::try_from(shape) {
            Ok([_, c, _, _]) if all_f32 && c % options.groups == 0 => {
                group_norm_rows(x, gamma, beta, options)
            }
            _ => group_norm_unfused_primitive::<Self>(x, gamma, beta, options),
        }
    }

    fn pool2d(x: FloatTensor<Self>, options: PoolOptions) -> FloatTensor<Self> {
        let plan = match x.layout().shape().to_vec()[..] {
            [_, _, h, w] if x.dtype() == DType::F32 => pool::PoolPlan::new([h, w], options),
            _ => None,
        };
        match plan {
            Some(plan) => plan.run(x),
            None => pool2d_unfused::<Self>(x, options),
        }
    }

    fn gelu_exact(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match activation::fits(&[&x]) {
            true => activation::gelu(x),
            false => gelu_exact_unfused::<Self>(x),
        }
    }

    fn gelu_exact_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        match activation::fits(&[&x, &grad]) {
            true => activation::gelu_backward(x, grad),
            false => gelu_exact_backward_unfused::<Self>(x, grad),
        }
    }

    fn scaled_layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        match layer_norm::fits(&[&x], &gamma) {
            true => layer_norm::forward(x, gamma, epsilon as f32),
            false => scaled_layer_norm_unfused::<Self>(x, gamma, epsilon),
        }
    }

    fn scaled_layer_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> [FloatTensor<Self>; 2] {
        match layer_norm::fits(&[&x, &grad], &gamma) {
            true => layer_norm::backward(x, gamma, grad, epsilon as f32),
            false => scaled_layer_norm_backward_unfused::<Self>(x, gamma, grad, epsilon),
        }
    }

    fn modulate(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        scale: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match Sizes::of(&[&x], &[&shift, &scale]) {
            Some(sizes) => modulation::modulate(sizes, x, shift, scale),
            None => modulate_unfused::<Self>(x, shift, scale),
        }
    }

    fn modulate_backward(
        x: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        match Sizes::of(&[&x, &grad], &[&scale]) {
            Some(sizes) => modulation::modulate_backward(sizes, x, scale, grad),
            None => modulate_backward_unfused::<Self>(x, scale, grad),
        }
    }

    fn gated_residual(
        x: FloatTensor<Self>,
        gate: FloatTensor<Self>,
        branch: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        match Sizes::of(&[&x, &branch], &[&gate]) {
            Some(sizes) => modulation::gated_residual(sizes, x, gate, branch),
            None => gated_residual_unfused::<Self>(x, gate, branch),
        }
    }

    fn gated_residual_backward(
        gate: FloatTensor<Self>,
        branch: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 3] {
        match Sizes::of(&[&branch, &grad], &[&gate]) {
            Some(sizes) => modulation::gated_residual_backward(sizes, gate, branch, grad),
            None => gated_residual_backward_unfused::<Self>(gate, branch, grad),
        }
    }

    fn swiglu(gate: FloatTensor<Self>, value: FloatTensor<Self>) -> FloatTensor<Self> {
        match activation::fits(&[&gate, &value]) {
            true => activation::swiglu(gate, value),
            false => swiglu_unfused::<Self>(gate, value),
        }
    }

    fn swiglu_backward(
        gate: FloatTensor<Self>,
        value: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> [FloatTensor<Self>; 2] {
        match activation::fits(&[&gate, &value, &grad]) {
            true => activation::swiglu_backward(gate, value, grad),
            false => swiglu_backward_unfused::<Self>(gate, value, grad),
        }
    }

    fn scaled_dot_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        causal: bool,
    ) -> FloatTensor<Self> {
        match Heads::new([&q, &k, &v], causal) {
            Some(heads) => heads.forward([&q, &k, &v]),
            None => attention_module::<Self>(q, k, v, causal),
        }
    }

    fn scaled_dot_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        causal: bool,
        _saved: Option<AttentionSaved<Self>>,
    ) -> [FloatTensor<Self>; 3] {
        match Heads::new([&q, &k, &v, &grad], causal) {
            Some(heads) => heads.backward([&q, &k, &v, &grad]),
            None => attention_backward_unfused::<Self>(q, k, v, grad, causal),
        }
    }
}

/// [`MicroditBackend::group_norm`] of f32 tensors, one (image, group) per task.
fn group_norm_rows(
    x: FlexTensor,
    gamma: FlexTensor,
    beta: FlexTensor,
    options: GroupNormOptions,
) -> FlexTensor {
    let [x, gamma, beta] = [x, gamma, beta].map(|t| t.to_contiguous());
    let shape = x.layout().shape().clone();
    let (channels, groups) = (shape[1], options.groups);
    let per_group = x.layout().num_elements() / (shape[0] * groups);
    let mut out = vec![0.0f32; x.layout().num_elements()];
    let (gamma, beta) = (values(&gamma), values(&beta));
    out.par_chunks_mut(per_group)
        .zip(values(&x).par_chunks(per_group))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let channels = (i % groups) * channels / groups..(i % groups + 1) * channels / groups;
            let (scale, shift) = (&gamma[channels.clone()], &beta[channels]);
            group_norm_row(x, out, scale, shift, options.epsilon as f32, options.silu);
        });
    FlexTensor::new(
        Bytes::from_elems(out),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// Products of at least this many multiply-adds run on rayon's threads (burn-flex's own
/// threshold for its products).
const PARALLEL_PRODUCT: usize = 192 * 192 * 192;

/// `lhs [m, k] · rhs [k, n]` for f32 matrices of any strides, into a fresh contiguous
/// buffer that is never zeroed: gemm does not read a destination it is not asked to add
/// to (and writes zeros when k is 0).
fn matmul_2d(lhs: &FlexTensor, rhs: &FlexTensor, [m, k, n]: [usize; 3]) -> FlexTensor {
    let matrix = |t: &FlexTensor| {
        let strides = t.layout().strides();
        Matrix {
            ptr: t
                .storage::<f32>()
                .as_ptr()
                .wrapping_add(t.layout().start_offset()) as *mut f32,
            row: strides[0],
            col: strides[1],
        }
    };
    let parallelism = match m.saturating_mul(n).saturating_mul(k) >= PARALLEL_PRODUCT {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    };
    let sum = Sum {
        scale: 1.0,
        accumulate: false,
        parallelism,
    };
    let mut out = Vec::<f32>::with_capacity(m * n);
    let dst = Matrix {
        ptr: out.as_mut_ptr(),
        row: n as isize,
        col: 1,
    };
    // Safety: both operands lie inside their tensors' storage at their layouts' strides;
    // gemm writes all m·n elements of the fresh buffer before its length is set.
    unsafe {
        gemm_into(dst, matrix(lhs), matrix(rhs), [m, k, n], sum);
        out.set_len(m * n);
    }
    f32_tensor(out, Shape::new([m, n]))
}

/// A contiguous f32 tensor's elements.
fn values(t: &FlexTensor) -> &[f32] {
    &t.storage::<f32>()[t.layout().start_offset()..]
}

/// A contiguous f32 tensor of `shape` holding `data`.
fn f32_tensor(data: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(data),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// One f32 matrix in a buffer: its first element and its row and column strides.
#[derive(Clone, Copy)]
struct Matrix {
    ptr: *mut f32,
    row: isize,
    col: isize,
}

impl Matrix {
    /// A contiguous row-major matrix with `cols` columns, written through `data`.
    fn dense(data: &mut [f32], cols: usize) -> Self {
        Self {
            ptr: data.as_mut_ptr(),
            row: cols as isize,
            col: 1,
        }
    }

    fn transposed(self) -> Self {
        Self {
            row: self.col,
            col: self.row,
            ..self
        }
    }
}

/// `dst = scale · lhs · rhs` for `lhs` [m, k] and `rhs` [k, n], on the calling thread.
///
/// # Safety
/// Every matrix must lie inside a live buffer; `dst` must be writable and not aliased.
unsafe fn product(dst: Matrix, lhs: Matrix, rhs: Matrix, dims: [usize; 3], scale: f32) {
    let sum = Sum {
        scale,
        accumulate: false,
        parallelism: gemm::Parallelism::None,
    };
    unsafe { gemm_into(dst, lhs, rhs, dims, sum) }
}

/// How a product meets its destination: `dst = scale · lhs · rhs`, or `dst += …` when
/// `accumulate`, on `parallelism`'s threads.
#[derive(Clone, Copy)]
struct Sum {
    scale: f32,
    accumulate: bool,
    parallelism: gemm::Parallelism,
}

/// `lhs` [m, k] times `rhs` [k, n] into `dst` [m, n] as `sum` says, through gemm.
///
/// # Safety
/// As [`product`].
unsafe fn gemm_into(dst: Matrix, lhs: Matrix, rhs: Matrix, [m, k, n]: [usize; 3], sum: Sum) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.col,
            dst.row,
            sum.accumulate,
            lhs.ptr,
            lhs.col,
            lhs.row,
            rhs.ptr,
            rhs.col,
            rhs.row,
            1.0,
            sum.scale,
            false,
            false,
            false,
            sum.parallelism,
        )
    }
}

/// The shapes of one attention call over f32 tensors `[B, H, len, d]`.
struct Heads {
    batch: usize,
    heads: usize,
    /// Query rows `N`, key rows `L`, head width `d`.
    n: usize,
    l: usize,
    d: usize,
    causal: bool,
}

/// A read-only `[B, H, len, d]` tensor: its buffer's start and its strides.
#[derive(Clone, Copy)]
struct View {
    start: *const f32,
    strides: [isize; 4],
}

impl View {
    fn of(t: &FlexTensor) -> Self {
        let s = t.layout().strides();
        Self {
            start: t.storage::<f32>()[t.layout().start_offset()..].as_ptr(),
            strides: [s[0], s[1], s[2], s[3]],
        }
    }

    /// The `[len, d]` matrix of head `h` of batch element `b` (only ever read).
    fn head(&self, b: usize, h: usize) -> Matrix {
        let [sb, sh, row, col] = self.strides;
        let at = b as isize * sb + h as isize * sh;
        Matrix {
            ptr: self.start.wrapping_offset(at) as *mut f32,
            row,
            col,
        }
    }
}

/// An output `[B, H, len, d]` stored as `[B, len, H, d]`.
struct HeadInterleaved {
    data: Vec<f32>,
    shape: [usize; 4],
}

/// Where the tasks write an [`HeadInterleaved`] output, each its own heads.
#[derive(Clone, Copy)]
struct HeadWriter {
    start: *mut f32,
    shape: [usize; 4],
}

impl HeadInterleaved {
    fn new([batch, heads, len, d]: [usize; 4]) -> Self {
        Self {
            data: vec![0.0; batch * heads * len * d],
            shape: [batch, heads, len, d],
        }
    }

    fn writer(&mut self) -> HeadWriter {
        HeadWriter {
            start: self.data.as_mut_ptr(),
            shape: self.shape,
        }
    }

    fn into_tensor(self) -> FlexTensor {
        let [_, heads, len, d] = self.shape;
        let strides = vec![
            (len * heads * d) as isize,
            d as isize,
            (heads * d) as isize,
            1,
        ];
        let layout = Layout::new(Shape::from(self.shape.to_vec()), strides, 0);
        FlexTensor::new(Bytes::from_elems(self.data), layout, DType::F32)
    }
}

impl HeadWriter {
    fn head(&self, b: usize, h: usize) -> Matrix {
        let [_, heads, len, d] = self.shape;
        Matrix {
            ptr: self.start.wrapping_add((b * len * heads + h) * d),
            row: (heads * d) as isize,
            col: 1,
        }
    }
}

/// Raw pointers cross into rayon's tasks: inputs are only read, and each task writes its
/// own heads of the outputs.
struct Shared<T>(T);
unsafe impl<T> Sync for Shared<T> {}
unsafe impl<T> Send for Shared<T> {}

impl<T: Copy> Shared<T> {
    fn get(&self) -> T {
        self.0
    }
}

impl Heads {
    /// The call's shapes when every tensor is 4-d f32 with non-negative strides, k and v
    /// are `[B, H, L, d]` for q `[B, H, N, d]` and an output gradient (fourth, if given) is
    /// q's shape (what this implementation handles); `None` sends the call to the generic
    /// path.
    fn new<const N: usize>(tensors: [&FlexTensor; N], causal: bool) -> Option<Self> {
        let usable = |t: &&FlexTensor| {
            t.dtype() == DType::F32
                && t.layout().num_dims() == 4
                && t.layout().has_positive_strides()
        };
        if !tensors.iter().all(usable) {
            return None;
        }
        let [q, k, v] = [0, 1, 2].map(|i| tensors[i].layout().shape());
        let same_heads = k == v && k[0] == q[0] && k[1] == q[1] && k[3] == q[3];
        if !same_heads || tensors.get(3).is_some_and(|g| g.layout().shape() != q) {
            return None;
        }
        Some(Self {
            batch: q[0],
            heads: q[1],
            n: q[2],
            l: k[2],
            d: q[3],
            causal,
        })
    }

    fn scale(&self) -> f32 {
        (self.d as f32).powf(-0.5)
    }

    /// Runs `task(b, h, scratch)` for every (batch, head) pair on rayon's pool, with
    /// `matrices` `[N, L]` scratch matrices per thread.
    fn for_each_head(&self, matrices: usize, task: impl Fn(usize, usize, &mut [f32]) + Sync) {
        (0..self.batch * self.heads).into_par_iter().for_each_init(
            || vec![0.0f32; matrices * self.n * self.l],
            |scratch, i| task(i / self.heads, i % self.heads, scratch),
        );
    }

    /// `p = softmax((q kᵀ)·scale)` of one head into `p` [N, L]; future keys masked when
    /// causal (key j > query i, PyTorch's top-left alignment).
    ///
    /// # Safety
    /// `q` and `k` must be heads of live `[B, H, len, d]` buffers of this call's shapes.
    unsafe fn probabilities(&self, q: Matrix, k: Matrix, p: &mut [f32]) {
        let scores = Matrix::dense(p, self.l);
        unsafe {
            product(
                scores,
                q,
                k.transposed(),
                [self.n, self.d, self.l],
                self.scale(),
            )
        };
        for (i, row) in p.chunks_exact_mut(self.l).enumerate() {
            let visible = if self.causal { i + 1 } else { self.l };
            softmax_row(row, visible.min(self.l));
        }
    }

    fn forward(&self, [q, k, v]: [&FlexTensor; 3]) -> FlexTensor {
        let [q, k, v] = [q, k, v].map(View::of);
        let mut out = HeadInterleaved::new([self.batch, self.heads, self.n, self.d]);
        let (inputs, dst) = (Shared([q, k, v]), Shared(out.writer()));
        self.for_each_head(1, |b, h, p| unsafe {
            let [q, k, v] = inputs.get().map(|t| t.head(b, h));
            self.probabilities(q, k, p);
            product(
                dst.get().head(b, h),
                Matrix::dense(p, self.l),
                v,
                [self.n, self.l, self.d],
                1.0,
            );
        });
        out.into_tensor()
    }

    /// `[dq, dk, dv]` from the output's gradient `g`, recomputing `p`:
    /// `dv = pᵀ g`, `ds = p ∘ (g vᵀ − rowsum(p ∘ g vᵀ))`, `dq = scale · ds k`,
    /// `dk = scale · dsᵀ q` (softmax's backward as autodiff computes it).
    fn backward(&self, [q, k, v, g]: [&FlexTensor; 4]) -> [FlexTensor; 3] {
        let inputs = Shared([q, k, v, g].map(View::of));
        let (n, l, d) = (self.n, self.l, self.d);
        let mut grads = [n, l, l].map(|len| HeadInterleaved::new([self.batch, self.heads, len, d]));
        let dst = Shared(grads.each_mut().map(|t| t.writer()));
        self.for_each_head(2, |b, h, scratch| unsafe {
            let [q, k, v, g] = inputs.get().map(|t| t.head(b, h));
            let [dq, dk, dv] = dst.get().map(|t| t.head(b, h));
            let (p, ds) = scratch.split_at_mut(n * l);
            self.probabilities(q, k, p);
            product(dv, Matrix::dense(p, l).transposed(), g, [l, n, d], 1.0);
            product(Matrix::dense(ds, l), g, v.transposed(), [n, d, l], 1.0);
            for (ds_row, p_row) in ds.chunks_exact_mut(l).zip(p.chunks_exact(l)) {
                softmax_backward_row(ds_row, p_row);
            }
            let ds = Matrix::dense(ds, l);
            product(dq, ds, k, [n, l, d], self.scale());
            product(dk, ds.transposed(), q, [l, n, d], self.scale());
        });
        grads.map(HeadInterleaved::into_tensor)
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::silu;
    use burn::tensor::backend::Backend as BurnBackend;
    use burn::tensor::ops::FloatTensorOps;
    use burn::tensor::{ElementConversion, Tensor, TensorData, TensorPrimitive};

    use crate::backend::{
        attention, attention_backward_unfused, attention_unfused, group_norm_unfused, swiglu,
        swiglu_backward_unfused, Cpu, GroupNormOptions, MicroditBackend, Trainable,
    };

    type Ad = Trainable<Cpu>;

    /// A deterministic `[b, len, width]` tensor of values in (−1, 1).
    fn values<B: BurnBackend>([b, len, width]: [usize; 3], seed: f32) -> Tensor<B, 3> {
        let data = (0..b * len * width)
            .map(|i| (i as f32 * 0.731 + seed).sin())
            .collect::<Vec<_>>();
        Tensor::from_data(TensorData::new(data, [b, len, width]), &Default::default())
    }

    /// q [B, H, N, d] and k, v [B, H, L, d] as the model makes them: heads split off a
    /// fused projection, so all three are strided views.
    fn heads<B: BurnBackend>([b, h, n, l, d]: [usize; 5]) -> [Tensor<B, 4>; 3] {
        let split = |t: Tensor<B, 3>, len| t.reshape([b, len, h, d]).swap_dims(1, 2);
        let [q, _] = <[_; 2]>::try_from(values::<B>([b, n, 2 * h * d], 0.3).chunk(2, 2)).unwrap();
        let [k, v] = <[_; 2]>::try_from(values::<B>([b, l, 2 * h * d], 1.7).chunk(2, 2)).unwrap();
        [split(q.mul_scalar(3.0), n), split(k, l), split(v, l)]
    }

    fn relative_error<B: BurnBackend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
        let diff = (a - b.clone()).powi_scalar(2).sum().sqrt().into_scalar();
        let norm = b.powi_scalar(2).sum().sqrt().into_scalar();
        diff.elem::<f32>() / norm.elem::<f32>()
    }

    /// The one-pass group norm (with and without SiLU) against burn's operations, on
    /// values far from zero mean, where a careless variance loses digits.
    /// The 2-D products against burn-flex's: contiguous, transposed and sliced operands,
    /// odd sizes, an empty inner dimension, and one above the parallel threshold.
    #[test]
    fn two_dimensional_products_equal_burns() {
        let cases = [
            ([5, 7], [7, 3]),
            ([64, 1], [1, 33]),
            ([4, 0], [0, 6]),
            ([200, 190], [190, 210]),
        ];
        for ([m, k], [_, n]) in cases {
            let matrix = |rows: usize, cols: usize, seed: f32| {
                let data = (0..rows * cols)
                    .map(|i| (i as f32 * 0.731 + seed).sin())
                    .collect();
                Tensor::<Cpu, 2>::from_data(
                    TensorData::new(data, [rows, cols]),
                    &Default::default(),
                )
            };
            let (a, b) = (matrix(m, k, 0.3), matrix(n, k, 1.1));
            let c = matrix(k + 2, n, 2.2).slice([1..k + 1, 0..n]);
            for (lhs, rhs) in [(a.clone(), b.clone().transpose()), (a.clone(), c.clone())] {
                let prim = |t: Tensor<Cpu, 2>| t.into_primitive().tensor();
                let ours = Cpu::matmul(prim(lhs.clone()), prim(rhs.clone()));
                let burns = <Cpu as FloatTensorOps<Cpu>>::float_matmul(prim(lhs), prim(rhs));
                let wrap = |t| Tensor::<Cpu, 2>::from_primitive(TensorPrimitive::Float(t));
                let (ours, burns) = (wrap(ours), wrap(burns));
                assert_eq!(ours.dims(), [m, n]);
                ours.into_data()
                    .assert_approx_eq::<f32>(&burns.into_data(), Default::default());
            }
        }
    }

    #[test]
    fn group_norm_equals_burns_operations() {
        for (shape, groups, silu) in [([2, 6, 5, 7], 3, true), ([1, 8, 4, 9], 8, false)] {
            let [b, c, h, w] = shape;
            let x = values::<Cpu>([b, c, h * w], 0.4)
                .reshape(shape)
                .add_scalar(20.0);
            let gamma = values::<Cpu>([1, 1, c], 1.1).reshape([c]).add_scalar(1.0);
            let beta = values::<Cpu>([1, 1, c], 2.2).reshape([c]);
            let options = GroupNormOptions {
                groups,
                epsilon: 1e-6,
                silu,
            };
            let steps = group_norm_unfused(x.clone(), gamma.clone(), beta.clone(), options);
            let [x, gamma, beta] = [
                x.into_primitive().tensor(),
                gamma.into_primitive().tensor(),
                beta.into_primitive().tensor(),
            ];
            let fused = Tensor::<Cpu, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(
                Cpu::group_norm(x, gamma, beta, options),
            ));
            let err = relative_error(fused, steps);
            assert!(err < 1e-5, "{shape:?}: {err}");
        }
    }

    /// SwiGLU in one pass each way against autodiff of burn's `silu(gate) · value`.
    #[test]
    fn swiglu_and_its_gradients_equal_burns_operations() {
        let shape = [3, 7, 37];
        let inputs = || {
            let gate = values::<Ad>(shape, 0.2).mul_scalar(6.0).require_grad();
            [gate, values::<Ad>(shape, 1.9).require_grad()]
        };
        let weights = values::<Ad>(shape, 2.9);
        let run = |fused: bool| {
            let [gate, value] = inputs();
            let out = if fused {
                swiglu(gate.clone(), value.clone())
            } else {
                silu(gate.clone()) * value.clone()
            };
            let g = (out.clone() * weights.clone()).sum().backward();
            [out.inner(), gate.grad(&g).unwrap(), value.grad(&g).unwrap()]
        };
        let steps = run(false);
        for (i, (fused, steps)) in run(true).into_iter().zip(steps.clone()).enumerate() {
            let err = relative_error(fused.unsqueeze::<4>(), steps.unsqueeze::<4>());
            assert!(err < 1e-6, "output {i}: {err}");
        }
        // The default backward's formulas (what CUDA runs) against autodiff's.
        let [gate, value] = inputs().map(|t| t.inner().into_primitive().tensor());
        let grad = weights.inner().into_primitive().tensor();
        let formulas = swiglu_backward_unfused::<Cpu>(gate, value, grad);
        for (i, (formula, autodiff)) in formulas.into_iter().zip(&steps[1..]).enumerate() {
            let formula = Tensor::<Cpu, 3>::from_primitive(TensorPrimitive::Float(formula));
            let err = relative_error(formula.unsqueeze::<4>(), autodiff.clone().unsqueeze());
            assert!(err < 1e-6, "gradient {i}: {err}");
        }
    }

    const CASES: [([usize; 5], bool); 2] = [([2, 3, 5, 7, 4], false), ([2, 2, 6, 6, 8], true)];

    #[test]
    fn attention_equals_the_unfused_steps() {
        for (shape, causal) in CASES {
            let [q, k, v] = heads::<Cpu>(shape);
            let fused = attention(q.clone(), k.clone(), v.clone(), causal);
            let steps = attention_unfused(q, k, v, causal);
            let err = relative_error(fused, steps);
            assert!(err < 1e-6, "{shape:?} causal {causal}: {err}");
        }
    }

    /// Values wider than the keys are outside the kernel's shapes: the generic path
    /// takes them.
    #[test]
    fn values_of_another_width_take_the_generic_path() {
        let [q, k, _] = heads::<Cpu>([2, 3, 5, 7, 4]);
        let v = values::<Cpu>([2 * 3, 7, 6], 0.9).reshape([2, 3, 7, 6]);
        let fused = attention(q.clone(), k.clone(), v.clone(), false);
        assert_eq!(fused.dims(), [2, 3, 5, 6]);
        let err = relative_error(fused, attention_unfused(q, k, v, false));
        assert!(err < 1e-6, "{err}");
    }

    #[test]
    fn attention_gradients_equal_autodiff_of_the_unfused_steps() {
        for (shape, causal) in CASES {
            let grads = |fused: bool| {
                let [q, k, v] = heads::<Ad>(shape).map(|t| t.require_grad());
                let out = if fused {
                    attention(q.clone(), k.clone(), v.clone(), causal)
                } else {
                    attention_unfused(q.clone(), k.clone(), v.clone(), causal)
                };
                // A weighted sum, so that each output element has its own gradient.
                let [b, h, n, d] = out.dims();
                let weights = values::<Ad>([b * h, n, d], 2.9).reshape([b, h, n, d]);
                let g = (out * weights).sum().backward();
                [q, k, v].map(|t| t.grad(&g).unwrap())
            };
            for (i, (fused, steps)) in grads(true).into_iter().zip(grads(false)).enumerate() {
                let err = relative_error(fused, steps);
                assert!(err < 1e-5, "{shape:?} causal {causal}, input {i}: {err}");
            }
        }
    }

    /// The default backward (what CUDA runs) against this backend's own.
    #[test]
    fn default_attention_backward_equals_the_cpu_kernel() {
        for (shape, causal) in CASES {
            let [b, h, n, _, d] = shape;
            let [q, k, v] = heads::<Cpu>(shape).map(|t| t.into_primitive().tensor());
            let grad = values::<Cpu>([b * h, n, d], 2.9).reshape([b, h, n, d]);
            let grad = grad.into_primitive().tensor();
            let kernel = Cpu::scaled_dot_attention_backward(
                q.clone(),
                k.clone(),
                v.clone(),
                grad.clone(),
                causal,
                None,
            );
            let steps = attention_backward_unfused::<Cpu>(q, k, v, grad, causal);
            for (i, (a, b)) in kernel.into_iter().zip(steps).enumerate() {
                let wrap =
                    |t| Tensor::<Cpu, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(t));
                let err = relative_error(wrap(a), wrap(b));
                assert!(err < 1e-5, "{shape:?} causal {causal}, input {i}: {err}");
            }
        }
    }
}
