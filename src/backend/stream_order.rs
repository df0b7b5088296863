//! Work on a stream of microdit's own (cuBLAS products, ahead-of-time Triton kernels),
//! ordered against cubecl's stream on the GPU.
//!
//! cubecl does not expose its stream, so the two are ordered, with no host
//! synchronisation, by a handshake through two flag words in device memory:
//!
//! 1. a one-thread cubecl kernel writes the work's sequence number to `ready`: it runs
//!    after everything cubecl queued before, so the operands are written;
//! 2. on microdit's stream a one-thread kernel (`HANDSHAKE_PTX`) waits until `ready` holds
//!    that number, the work runs, and another writes the number to `done`;
//! 3. a one-thread cubecl kernel spins until `done` holds the number, so nothing cubecl
//!    queues afterwards (a reader of the result, or a new tensor reusing an operand's
//!    memory) runs before the work has finished.
//!
//! Both sides wait until the flag has reached the number in the sequence's wrapping order
//! (`flag − number` mod 2³² below 2³¹; `reached` in `launch_plan`'s tests), so the sequence
//! may wrap around 2³² (skipping 0, the flags' initial value), and a wait whose number a
//! later one overtook still ends. cubecl's signal is flushed to the GPU at once: its queue
//! would otherwise hold it back while the own stream's wait spins. Work runs on the
//! calling thread's cubecl stream's order only: operands another thread wrote must have
//! been synchronised by then (as before for cuBLAS).
//!
//! (The driver's stream memory operations, `cuStreamWaitValue32`, refuse cubecl's
//! pool-allocated memory, hence the kernels.) `MICRODIT_CUBLAS=sync` orders the two from
//! the host instead (wait for cubecl, run, wait for the own stream), which is also the
//! fallback if the handshake cannot be set up.
//!
//! Each GPU has its own state behind its own lock, so work on several GPUs of one process
//! does not serialise.

use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use cubecl::cuda::CudaRuntime;
use cubecl::prelude::*;
use cudarc::driver::{result as driver, sys as driver_sys};

use super::launch_plan::next_sequence;

/// How work on the own stream is ordered against cubecl's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// GPU-side handshake (the default).
    Handshake,
    /// Host-side synchronisation around the work (`MICRODIT_CUBLAS=sync`).
    Sync,
}

/// Set when the handshake failed to start: work falls back to host synchronisation.
static HANDSHAKE_FAILED: AtomicBool = AtomicBool::new(false);

pub fn order() -> Order {
    static ASKED: OnceLock<Order> = OnceLock::new();
    let asked = *ASKED.get_or_init(|| match std::env::var("MICRODIT_CUBLAS").as_deref() {
        Ok("sync") => Order::Sync,
        _ => Order::Handshake,
    });
    if HANDSHAKE_FAILED.load(Ordering::Relaxed) {
        Order::Sync
    } else {
        asked
    }
}

/// The stream side of the handshake: spin until a word equals a value; write a word.
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
    sub.u32 %r2, %r2, %r1;
    setp.ge.u32 %p, %r2, 0x80000000;
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
        // The flag minus the value in the lower half (`reached` in `launch_plan`'s tests).
        loop {
            if Atomic::load(&flag[0]) - value < 0x8000_0000u32 {
                break;
            }
        }
    }
}

/// One GPU's own stream and handshake flags.
pub struct OwnStream {
    pub stream: driver_sys::CUstream,
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
    /// cuBLAS's handle on this stream, made on the first product.
    pub blas: Option<cudarc::cublas::sys::cublasHandle_t>,
}

// SAFETY: the raw handles are only used while holding the device's mutex.
unsafe impl Send for OwnStream {}

impl OwnStream {
    fn new(client: &ComputeClient<CudaRuntime>, index: usize) -> Self {
        let (context, stream) = super::cuda_runtime::own_stream(index).expect("CUDA stream");
        let word = || client.create_from_slice(u32::as_bytes(&[0]));
        let (ready, done) = (word(), word());
        // The zeros are uploaded on cubecl's stream: written before the own stream reads.
        cubecl::future::block_on(client.sync()).expect("device sync");
        let (ready_ptr, done_ptr) = (address(client, &ready), address(client, &done));
        Self {
            stream,
            context,
            ready,
            done,
            ready_ptr,
            done_ptr,
            kernels: load_handshake_kernels(),
            sequence: 0,
            blas: None,
        }
    }
}

/// The device address of a cubecl allocation.
pub fn address(client: &ComputeClient<CudaRuntime>, handle: &cubecl::server::Handle) -> u64 {
    client
        .get_resource(handle.clone())
        .expect("device memory")
        .resource()
        .ptr
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
            "microdit: the GPU-side stream handshake failed ({reason}); cuBLAS products and \
             microdit's own kernels now synchronise through the host (slower)"
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

/// GPU `index`'s own stream, made on first use. The map's lock is held only to find it.
fn device(client: &ComputeClient<CudaRuntime>, index: usize) -> Arc<Mutex<OwnStream>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<Mutex<OwnStream>>>>> = OnceLock::new();
    let mut devices = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    devices
        .entry(index)
        .or_insert_with(|| Arc::new(Mutex::new(OwnStream::new(client, index))))
        .clone()
}

fn lock(device: &Mutex<OwnStream>) -> MutexGuard<'_, OwnStream> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

/// `f` with GPU `index`'s own stream locked and its context current, outside any
/// handshake: for set-up that may wait on the device (a library handle).
pub fn prepare<T>(
    client: &ComputeClient<CudaRuntime>,
    index: usize,
    f: impl FnOnce(&mut OwnStream) -> T,
) -> T {
    let device = device(client, index);
    let mut own = lock(&device);
    // SAFETY: the context is live (retained for the process).
    unsafe { driver::ctx::set_current(own.context).expect("CUDA context") };
    f(&mut own)
}

/// Runs `work` on GPU `index`'s own stream (its context current), after everything
/// `client` queued before and before everything it queues after. `work` only enqueues:
/// nothing in it may wait for the device (see [`prepare`]).
pub fn run<T>(
    client: &ComputeClient<CudaRuntime>,
    index: usize,
    work: impl FnOnce(&mut OwnStream) -> T,
) -> T {
    let device = device(client, index);
    let mut own = lock(&device);
    let handshake = order() == Order::Handshake && own.kernels.is_some();
    own.sequence = next_sequence(own.sequence);
    let sequence = own.sequence;
    if handshake {
        signal::launch::<CudaRuntime>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_single(),
            unsafe { ArrayArg::from_raw_parts(own.ready.clone(), 1) },
            sequence,
        );
        client.flush().expect("cubecl flush");
    } else {
        super::host_sync::record();
        cubecl::future::block_on(client.sync()).expect("device sync");
    }
    // SAFETY: the context is live (retained for the process); the flag kernels were
    // loaded with it and the flags are live cubecl allocations.
    unsafe { driver::ctx::set_current(own.context).expect("CUDA context") };
    let waiting = handshake
        && match own.kernels {
            Some((wait, _)) => {
                match unsafe { launch_flag_kernel(wait, own.stream, own.ready_ptr, sequence) } {
                    Ok(()) => true,
                    Err(e) => {
                        // cubecl's side has only signalled: wait for it from the host.
                        handshake_failed(&format!("{e:?}"));
                        super::host_sync::record();
                        cubecl::future::block_on(client.sync()).expect("device sync");
                        false
                    }
                }
            }
            None => false,
        };
    let out = work(&mut own);
    let signalled = waiting
        && match own.kernels {
            Some((_, signal)) => unsafe {
                launch_flag_kernel(signal, own.stream, own.done_ptr, sequence).is_ok()
            },
            None => false,
        };
    if !signalled {
        super::host_sync::record();
        // SAFETY: a live stream of the current context.
        unsafe { driver::stream::synchronize(own.stream).expect("own stream sync") };
        if waiting {
            handshake_failed("signal launch");
        }
    } else {
        wait_for::launch::<CudaRuntime>(
            client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_single(),
            unsafe { ArrayArg::from_raw_parts(own.done.clone(), 1) },
            sequence,
        );
    }
    out
}
