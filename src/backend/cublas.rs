//! Matrix products through cuBLAS, the library PyTorch calls, for the CUDA backend.
//!
//! cubecl's own matrix kernels reach 100–230 TFLOP/s in bf16 on an H200 where cuBLAS
//! reaches 600–770, and 20–27 TFLOP/s in exact f32 where cuBLAS reaches 40–50
//! (docs/BENCHMARKS.md). A product is planned from shapes and strides alone
//! (`gemm_plan`, tested on the CPU), then run on microdit's own stream, ordered against
//! cubecl's by `stream_order`. `MICRODIT_CUBLAS=off` keeps cubecl's kernels (`sync`:
//! host-side ordering, see `stream_order`). Without a loadable cuBLAS library
//! (`libcublas.so`, in the CUDA toolkit's `lib64`) the cubecl kernels run.

use std::sync::OnceLock;

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cudarc::cublas::{result as blas, sys as blas_sys};

use super::gemm_plan::{self, Gemm, Operand};
use super::stream_order::{self, address, OwnStream};

type Tensor = CubeTensor<CudaRuntime>;

/// Whether products go to cuBLAS: not with `MICRODIT_CUBLAS=off`, nor without the library.
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        if std::env::var("MICRODIT_CUBLAS").as_deref() == Ok("off") {
            return false;
        }
        // SAFETY: only probes whether the shared library can be opened.
        let present = unsafe { blas_sys::is_culib_present() };
        if !present {
            eprintln!(
                "microdit: cuBLAS (libcublas.so) not found on the library path: matrix products \
                 use cubecl's slower kernels; add the CUDA toolkit's lib64 to LD_LIBRARY_PATH"
            );
        }
        present
    })
}

/// How products run, for reports: cuBLAS ordered on the GPU or through the host, or
/// cubecl's kernels.
pub fn mode() -> &'static str {
    match (enabled(), stream_order::order()) {
        (false, _) => "cubecl kernels",
        (true, stream_order::Order::Handshake) => "cuBLAS, GPU-side handshake",
        (true, stream_order::Order::Sync) => "cuBLAS, host synchronisation",
    }
}

/// How `t` can be read as `batch` matrices without a copy ([`gemm_plan::operand`]).
fn operand(t: &Tensor, batch: usize) -> Option<Operand> {
    gemm_plan::operand(t.meta.shape(), t.meta.strides(), batch)
}

fn data_type(dtype: DType) -> Option<blas_sys::cudaDataType> {
    match dtype {
        DType::F32 => Some(blas_sys::cudaDataType::CUDA_R_32F),
        DType::BF16 => Some(blas_sys::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(blas_sys::cudaDataType::CUDA_R_16F),
        _ => None,
    }
}

/// `lhs [.., M, K] @ rhs [.., K, N]` by cuBLAS, or `None` when it cannot take the operands
/// (then the caller uses cubecl's kernels).
pub fn matmul(lhs: Tensor, rhs: Tensor) -> Option<Tensor> {
    let dtype = lhs.dtype;
    if !enabled() || rhs.dtype != dtype {
        return None;
    }
    let data_type = data_type(dtype)?;
    let product = gemm_plan::product(lhs.meta.shape(), rhs.meta.shape())?;
    let fits = |t: &Tensor| operand(t, product.batch);
    let lhs = if fits(&lhs).is_some() {
        lhs
    } else {
        into_contiguous(lhs)
    };
    let rhs = if fits(&rhs).is_some() {
        rhs
    } else {
        into_contiguous(rhs)
    };
    let gemm = Gemm::row_major(&product, fits(&lhs)?, fits(&rhs)?);
    let out = empty_device_contiguous_dtype(
        lhs.client.clone(),
        lhs.device.clone(),
        Shape::from(product.out_shape.clone()),
        dtype,
    );
    if product.m == 0 || product.n == 0 || product.batch == 0 {
        return Some(out);
    }
    let client = out.client.clone();
    let pointers = [&lhs, &rhs, &out].map(|t| address(&client, &t.handle));
    // Creating the handle may wait for the device: not inside the handshake.
    stream_order::prepare(&client, out.device.index, |own| {
        let stream = own.stream;
        own.blas.get_or_insert_with(|| {
            // SAFETY: a cuBLAS handle on a live stream of the current context.
            unsafe {
                let handle = blas::create_handle().expect("cuBLAS handle");
                blas::set_stream(handle, stream as blas_sys::cudaStream_t).expect("cuBLAS stream");
                handle
            }
        });
    });
    stream_order::run(&client, out.device.index, |own| {
        // SAFETY: the pointers are live cubecl allocations of the checked shapes and
        // strides, ordered against cubecl's stream by `stream_order`.
        unsafe { gemm_call(own, &gemm, data_type, pointers) }
    });
    // The operands stay alive until here, past the point where cubecl could reuse them.
    drop((lhs, rhs));
    Some(out)
}

/// Enqueues `gemm` on the own stream: `out = lhs @ rhs` row-major, i.e. column-major
/// `outᵀ [N, M] = rhsᵀ [N, K] · lhsᵀ [K, M]` (`gemm_plan`).
///
/// # Safety
/// `[lhs, rhs, out]` are live device addresses holding the planned operands.
unsafe fn gemm_call(
    own: &OwnStream,
    gemm: &Gemm,
    data_type: blas_sys::cudaDataType,
    [lhs, rhs, out]: [u64; 3],
) {
    let handle = own.blas.expect("the handle made before the handshake");
    let op = |o: &Operand| {
        if o.transposed {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1f32, 0f32);
    blas::gemm_strided_batched_ex(
        handle,
        op(&gemm.a),
        op(&gemm.b),
        gemm.m as i32,
        gemm.n as i32,
        gemm.k as i32,
        (&alpha as *const f32).cast(),
        rhs as *const _,
        data_type,
        gemm.a.ld as i32,
        gemm.a.batch_stride as i64,
        lhs as *const _,
        data_type,
        gemm.b.ld as i32,
        gemm.b.batch_stride as i64,
        (&beta as *const f32).cast(),
        out as *mut _,
        data_type,
        gemm.ldc as i32,
        gemm.stride_c as i64,
        gemm.batch as i32,
        blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
    .expect("cuBLAS product");
}
