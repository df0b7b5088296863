//! Matrix products through cuBLAS, the library PyTorch calls, for the CUDA backend.
//!
//! cubecl's own matrix kernels reach 100–230 TFLOP/s in bf16 on an H200 where cuBLAS
//! reaches 600–770, and 20–27 TFLOP/s in exact f32 where cuBLAS reaches 40–50
//! (docs/BENCHMARKS.md). cuBLAS runs on a stream of microdit's own: cubecl does not expose
//! its stream, so the two are ordered on the GPU, with no host synchronisation, by a
//! handshake through two flag words in device memory:
//!
//! 1. a one-thread cubecl kernel writes the product's sequence number to `ready`: it runs
//!    after everything cubecl queued before, so the operands are written;
//! 2. on microdit's stream a one-thread kernel (`HANDSHAKE_PTX`) waits until `ready` holds
//!    that number, cuBLAS runs the product, and another writes the number to `done`;
//! 3. a one-thread cubecl kernel spins until `done` holds the number, so nothing cubecl
//!    queues afterwards (a reader of the result, or a new tensor reusing an operand's
//!    memory) runs before the product has finished.
//!
//! (The driver's stream memory operations, `cuStreamWaitValue32`, refuse cubecl's
//! pool-allocated memory, hence the kernels.) `MICRODIT_CUBLAS=sync` orders the two from
//! the host instead (wait for cubecl, run, wait for cuBLAS), which is also the fallback if
//! the handshake cannot be set up; `MICRODIT_CUBLAS=off` keeps cubecl's kernels. Without a
//! loadable cuBLAS library (`libcublas.so`, in the CUDA toolkit's `lib64`) the cubecl
//! kernels run.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{result as driver, sys as driver_sys};

use super::gemm_plan::{self, Gemm, Operand};

type Tensor = CubeTensor<CudaRuntime>;

/// How products reach cuBLAS, from `MICRODIT_CUBLAS` and whether the library loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// GPU-side handshake (the default).
    Handshake,
    /// Host-side synchronisation around every product.
    Sync,
    /// cubecl's own kernels.
    Off,
}

/// Set when the handshake failed to start: products fall back to host synchronisation.
static HANDSHAKE_FAILED: AtomicBool = AtomicBool::new(false);

pub fn mode() -> Mode {
    static MODE: OnceLock<Mode> = OnceLock::new();
    let mode = *MODE.get_or_init(|| {
        let asked = match std::env::var("MICRODIT_CUBLAS").as_deref() {
            Ok("off") => return Mode::Off,
            Ok("sync") => Mode::Sync,
            _ => Mode::Handshake,
        };
        // SAFETY: only probes whether the shared library can be opened.
        if unsafe { blas_sys::is_culib_present() } {
            asked
        } else {
            eprintln!(
                "microdit: cuBLAS (libcublas.so) not found on the library path: matrix products \
                 use cubecl's slower kernels; add the CUDA toolkit's lib64 to LD_LIBRARY_PATH"
            );
            Mode::Off
        }
    });
    if mode == Mode::Handshake && HANDSHAKE_FAILED.load(Ordering::Relaxed) {
        Mode::Sync
    } else {
        mode
    }
}

/// The stream side of the handshake: spin until a word reaches a value; write a word.
/// Hand-written PTX, loaded by the driver (no compiler needed).
const HANDSHAKE_PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64

.visible .entry microdit_wait(.param .u64 flag, .param .u32 value)
{
    .reg .pred %p;
    .reg .b32 %r<3>;
    .reg .b64 %rd<3>;
    ld.param.u64 %rd1, [flag];
    ld.param.u32 %r1, [value];
    cvta.to.global.u64 %rd2, %rd1;
SPIN:
    ld.volatile.global.u32 %r2, [%rd2];
    setp.lt.u32 %p, %r2, %r1;
    @%p bra SPIN;
    ret;
}

.visible .entry microdit_signal(.param .u64 flag, .param .u32 value)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<3>;
    ld.param.u64 %rd1, [flag];
    ld.param.u32 %r1, [value];
    cvta.to.global.u64 %rd2, %rd1;
    membar.gl;
    st.volatile.global.u32 [%rd2], %r1;
    ret;
}
"#;

#[cube(launch)]
fn signal(flag: &Array<Atomic<u32>>, value: u32) {
    if ABSOLUTE_POS == 0 {
        Atomic::store(&flag[0], value);
    }
}

#[cube(launch)]
fn wait_for(flag: &Array<Atomic<u32>>, value: u32) {
    if ABSOLUTE_POS == 0 {
        loop {
            if Atomic::load(&flag[0]) >= value {
                break;
            }
        }
    }
}

/// One device's cuBLAS handle, stream and handshake flags.
struct DeviceBlas {
    handle: blas_sys::cublasHandle_t,
    stream: driver_sys::CUstream,
    context: driver_sys::CUcontext,
    /// The handshake words (one u32 each, cubecl memory kept alive here) and their device
    /// addresses.
    ready: cubecl::server::Handle,
    done: cubecl::server::Handle,
    ready_ptr: u64,
    done_ptr: u64,
    /// The stream-side kernels of `HANDSHAKE_PTX` (none if they failed to load).
    kernels: Option<(driver_sys::CUfunction, driver_sys::CUfunction)>,
    sequence: u32,
}

// SAFETY: the raw handles are only used while holding the device's mutex.
unsafe impl Send for DeviceBlas {}

impl DeviceBlas {
    fn new(client: &ComputeClient<CudaRuntime>, index: usize) -> Self {
        let (context, stream) = super::cuda_runtime::own_stream(index).expect("CUDA stream");
        // SAFETY: a cuBLAS handle on a live stream of the context cubecl uses.
        unsafe {
            let handle = blas::create_handle().expect("cuBLAS handle");
            blas::set_stream(handle, stream as blas_sys::cudaStream_t).expect("cuBLAS stream");
            let word = || client.create_from_slice(u32::as_bytes(&[0]));
            let (ready, done) = (word(), word());
            let address = |h: &cubecl::server::Handle| {
                client
                    .get_resource(h.clone())
                    .expect("flag memory")
                    .resource()
                    .ptr
            };
            let (ready_ptr, done_ptr) = (address(&ready), address(&done));
            Self {
                handle,
                stream,
                context,
                ready,
                done,
                ready_ptr,
                done_ptr,
                kernels: load_handshake_kernels(),
                sequence: 0,
            }
        }
    }
}

/// The PTX kernels, or `None` (with a warning) when the driver refuses them.
fn load_handshake_kernels() -> Option<(driver_sys::CUfunction, driver_sys::CUfunction)> {
    let ptx = CString::new(HANDSHAKE_PTX).expect("PTX text");
    // SAFETY: a NUL-terminated PTX image; the functions live as long as the module, which
    // is never unloaded.
    let loaded = unsafe {
        driver::module::load_data(ptx.as_ptr() as *const c_void).and_then(|module| {
            let function = |name: &str| {
                driver::module::get_function(module, CString::new(name).expect("name"))
            };
            Ok((function("microdit_wait")?, function("microdit_signal")?))
        })
    };
    match loaded {
        Ok(kernels) => Some(kernels),
        Err(e) => {
            handshake_failed(&format!("{e:?}"));
            None
        }
    }
}

fn handshake_failed(reason: &str) {
    if !HANDSHAKE_FAILED.swap(true, Ordering::Relaxed) {
        eprintln!(
            "microdit: the GPU-side cuBLAS handshake failed ({reason}); products now \
             synchronise through the host (slower)"
        );
    }
}

/// Launches a one-thread handshake kernel on `stream`.
///
/// # Safety
/// `function` is a loaded handshake kernel and `flag` a live device address.
unsafe fn launch_flag_kernel(
    function: driver_sys::CUfunction,
    stream: driver_sys::CUstream,
    mut flag: u64,
    mut value: u32,
) -> Result<(), driver::DriverError> {
    let mut params = [
        &mut flag as *mut u64 as *mut c_void,
        &mut value as *mut u32 as *mut c_void,
    ];
    driver::launch_kernel(function, (1, 1, 1), (1, 1, 1), 0, stream, &mut params)
}

fn devices() -> &'static Mutex<HashMap<usize, DeviceBlas>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, DeviceBlas>>> = OnceLock::new();
    DEVICES.get_or_init(Default::default)
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
    let mode = mode();
    let dtype = lhs.dtype;
    if mode == Mode::Off || rhs.dtype != dtype {
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
    let index = out.device.index;
    let mut devices = devices().lock().unwrap_or_else(|e| e.into_inner());
    let blas = devices
        .entry(index)
        .or_insert_with(|| DeviceBlas::new(&client, index));
    let mode = match (mode, blas.kernels) {
        (Mode::Handshake, None) => Mode::Sync,
        _ => mode,
    };
    blas.sequence = blas.sequence.wrapping_add(1).max(1);
    let sequence = blas.sequence;
    match mode {
        Mode::Handshake => signal::launch::<CudaRuntime>(
            &client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_single(),
            unsafe { ArrayArg::from_raw_parts(blas.ready.clone(), 1) },
            sequence,
        ),
        _ => {
            cubecl::future::block_on(client.sync()).expect("device sync");
        }
    }
    let ptr = |t: &Tensor| {
        client
            .get_resource(t.handle.clone())
            .expect("tensor memory")
            .resource()
            .ptr
    };
    let (lhs_ptr, rhs_ptr, out_ptr) = (ptr(&lhs), ptr(&rhs), ptr(&out));
    let op = |o: &Operand| {
        if o.transposed {
            blas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            blas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (alpha, beta) = (1f32, 0f32);
    // SAFETY: the pointers are live cubecl allocations of the checked shapes and strides,
    // ordered against cubecl's stream by the handshake (or host synchronisation).
    let handshake_done = unsafe {
        driver::ctx::set_current(blas.context).expect("CUDA context");
        let mode = match (mode, blas.kernels) {
            (Mode::Handshake, Some((wait, _))) => {
                match launch_flag_kernel(wait, blas.stream, blas.ready_ptr, sequence) {
                    Ok(()) => Mode::Handshake,
                    Err(e) => {
                        // cubecl's side has only signalled: wait for it from the host.
                        handshake_failed(&format!("{e:?}"));
                        cubecl::future::block_on(client.sync()).expect("device sync");
                        Mode::Sync
                    }
                }
            }
            (mode, _) => mode,
        };
        // Column-major: outᵀ [N, M] = rhsᵀ [N, K] · lhsᵀ [K, M] (`gemm_plan`).
        blas::gemm_strided_batched_ex(
            blas.handle,
            op(&gemm.a),
            op(&gemm.b),
            gemm.m as i32,
            gemm.n as i32,
            gemm.k as i32,
            (&alpha as *const f32).cast(),
            rhs_ptr as *const _,
            data_type,
            gemm.a.ld as i32,
            gemm.a.batch_stride as i64,
            lhs_ptr as *const _,
            data_type,
            gemm.b.ld as i32,
            gemm.b.batch_stride as i64,
            (&beta as *const f32).cast(),
            out_ptr as *mut _,
            data_type,
            gemm.ldc as i32,
            gemm.stride_c as i64,
            gemm.batch as i32,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .expect("cuBLAS product");
        let signalled = match (mode, blas.kernels) {
            (Mode::Handshake, Some((_, signal))) => {
                launch_flag_kernel(signal, blas.stream, blas.done_ptr, sequence).is_ok()
            }
            _ => false,
        };
        if !signalled {
            driver::stream::synchronize(blas.stream).expect("cuBLAS stream sync");
        }
        if mode == Mode::Handshake && !signalled {
            handshake_failed("signal launch");
        }
        signalled
    };
    if handshake_done {
        wait_for::launch::<CudaRuntime>(
            &client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_single(),
            unsafe { ArrayArg::from_raw_parts(blas.done.clone(), 1) },
            sequence,
        );
    }
    // The operands stay alive until here, past the point where cubecl could reuse them.
    drop((lhs, rhs));
    Some(out)
}
